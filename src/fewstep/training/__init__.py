"""The one training loop (:func:`train`) every method runs on, and its :class:`TrainConfig`."""

from .loop import TrainConfig, TrainResult, latest_checkpoint, train

__all__ = ["TrainConfig", "TrainResult", "latest_checkpoint", "train"]
