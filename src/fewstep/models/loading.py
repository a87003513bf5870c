"""What loading a pipeline's parts needs, below both folder loaders (:mod:`.folders` for the UNet families,
:mod:`.flow_pipelines` for FLUX and SD3): text encoders that refuse silently random weights, and diffusers'
pipeline classes by name."""

from __future__ import annotations

from pathlib import Path

from ..errors import FewstepError


def load_text_encoder(cls, folder: Path, kw: dict):
    """A text encoder whose every weight came from its files. transformers fills a weight its files lack with a
    random one and only logs it, so a folder saved in another transformers' layout (transformers 5 names a
    ``CLIPTextModel``'s weights without the ``text_model.`` prefix that 4.x looks for) would run with a random text
    encoder; that is refused here in one line."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()        # not its load report: what did not load is said below
    try:
        model, info = cls.from_pretrained(folder, output_loading_info=True, **transformers_kwargs(kw))
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        import transformers

        total = len(model.state_dict())
        why = ("none of its weights has the name transformers looks for: saved by another transformers version (a "
               "transformers-5 folder needs transformers>=5.25: pip install -U 'transformers>=5.25')"
               if len(missing) == total else "its weight files are incomplete or of another architecture")
        raise FewstepError(f"the text encoder in {folder} did not load: {len(missing)} of its {total} weights are not "
                           f"in its files (e.g. {missing[0]}), and transformers {transformers.__version__} would run "
                           f"it with random weights; {why}")
    return model


def transformers_kwargs(kw: dict) -> dict:
    """transformers' names for the same loading options (``dtype`` for ``torch_dtype``)."""
    return {"use_safetensors": True, "dtype": kw["torch_dtype"], **({"variant": kw["variant"]} if kw["variant"] else {})}


def pipeline_class(name: str = "StableDiffusionPipeline"):
    """A diffusers pipeline class by name. The first import of diffusers' SD pipelines makes transformers
    print that its CLIP/SigLIP image processors would like torchvision; fewstep builds its pipelines
    without a feature extractor, so that notice is silenced here."""
    import diffusers
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return getattr(diffusers, name)
    finally:
        transformers_logging.set_verbosity(verbosity)
