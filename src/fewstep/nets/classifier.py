"""A small CNN classifier per data set: it checks conditional samples (does a sample drawn for
class c classify as c, the CPU analogue of CLIP score) and gives the features for FID/KID
(DESIGN.md §5). Saved as safetensors + JSON like every fewstep model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import trange

from ..errors import FewstepError
from ..io.atomic import atomic_path


@dataclass
class ClassifierConfig:
    channels: int = 1
    image_size: int = 16
    num_classes: int = 10
    width: int = 32
    class_names: list[str] = field(default_factory=list)
    dataset: str = ""
    heldout_accuracy: float | None = None
    training: dict = field(default_factory=dict)


class Classifier(nn.Module):
    """conv-conv-pool ×2, conv, global average pool → ``features`` (4·width) → linear logits."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w, c = config.width, config.channels

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU()]

        self.body = nn.Sequential(*block(c, w), *block(w, w), nn.AvgPool2d(2),
                                  *block(w, 2 * w), *block(2 * w, 2 * w), nn.AvgPool2d(2),
                                  *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (the FID/KID embedding)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Class probabilities, batched."""
        self.eval()
        return torch.cat([self(x[i:i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)])


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts of up to 1 pixel (reflect-padded) and slight Gaussian noise: enough for the
    classifier to judge generated samples, which are never pixel-perfect."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w] + 0.05 * torch.randn(x.shape, generator=generator)


def train_classifier(data, heldout=None, epochs: int = 60, batch_size: int = 128,
                     lr: float = 2e-3, width: int = 32, seed: int = 0, progress: bool = True) -> Classifier:
    """Train with AdamW and a cosine LR; report held-out accuracy in the config when given."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier(ClassifierConfig(data.channels, data.image_size, data.num_classes, width,
                                        data.class_names, data.name))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(data) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    for _ in trange(epochs, disable=not progress, desc="classifier"):
        model.train()
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_augment(data.images[idx], g)), data.labels[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    if heldout is not None:
        model.config.heldout_accuracy = accuracy(model, heldout.images, heldout.labels)
    return model


def accuracy(model: Classifier, images: Tensor, labels: Tensor) -> float:
    return float((model.predict(images).argmax(-1) == labels).float().mean())


def save_classifier(model: Classifier, folder: str | Path, command: str = "") -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.config.training = {"command": command}
    with atomic_path(folder, directory=True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# {folder.name}\n\nA {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k-parameter CNN classifier "
            f"on `{model.config.dataset}`; held-out accuracy {model.config.heldout_accuracy:.4f}.\n"
            f"Used for conditional accuracy and as the FID/KID feature network.\n\nTrained with:\n\n```\n{command}\n```\n")
    return folder


def load_classifier(folder: str | Path) -> Classifier:
    folder = Path(folder)
    try:
        config = ClassifierConfig(**json.loads((folder / "config.json").read_text()))
        model = Classifier(config)
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        raise FewstepError(f"cannot load classifier {folder}: {e}") from None
    return model.eval()
