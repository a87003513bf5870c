"""A style LoRA τ_style (the LCM-LoRA paper's fine-tuned models, Luo et al. 2023b §3): the ordinary
diffusion loss of the base (:class:`fewstep.objectives.denoising.DenoisingLoss`: ε-prediction for SD/SDXL, the
rectified-flow velocity loss for FLUX/SD3, whose adapters are saved under "transformer.") on a captioned set's
VAE latents and cached prompt embeddings, only the adapters trained (text encoder and VAE frozen),
captions dropped to the empty prompt so classifier-free guidance keeps working. Combined with an
LCM-LoRA it samples in a few steps with no further training (θ_pre + λ1·τ_style + λ2·τ_LCM)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FewstepError
from ..models.data import ImageData
from ..models.handle import Model, raw_backbone
from ..models.loras import save_lora
from ..nets.lora import add_lora, trainable_fraction
from ..objectives.base import unwrap
from ..objectives.denoising import DenoisingLoss
from ..training import TrainConfig
from .common import Run, readme


def train_style_lora(base: Model, data: ImageData, out: str | Path, config: TrainConfig, rank: int = 8,
                     caption_dropout: float = 0.1, command: str = "", accelerator=None) -> Path | None:
    """Train a style LoRA of ``base`` (a diffusion pipeline) on ``data`` and save it at ``out``."""
    if not base.diffusers_pipeline or base.config.kind != "diffusion":   # its LoRA is saved in diffusers' format
        raise FewstepError(f"{base.path} is not a diffusion pipeline; a style LoRA fine-tunes one, e.g. models/emoji-sd")
    run = Run(config, command, accelerator)
    tensors = base.training_data(data)
    params = add_lora(base.backbone, rank)
    objective = DenoisingLoss(base.schedule, base.conditioner.training_condition(caption_dropout))
    result = run.fit(base.denoiser.train(), objective, tensors,
                     {"rank": rank, "caption_dropout": caption_dropout, "dataset": data.name}, params=params)
    if result is None:
        return None
    unet = raw_backbone(unwrap(result.ema).net)        # SDXL's UNet sits inside AddedCondUNet
    lora, total = trainable_fraction(unet)
    info = {"kind": "style", "base": str(base.path), "dataset": data.name, "rank": rank, "trainable_parameters": lora,
            "base_parameters": total, "training": run.record("style-lora", result, base.path)}
    what = (f"A style LoRA for `{base.path}` fine-tuned on `{data.name}` ({len(data)} images), rank {rank}. Combine it "
            f"with an LCM-LoRA of the same base (`fewstep distill --method lcm-lora --teacher {base.path} ...`) and "
            f"sample in 4 steps with no further training:")
    usage = (f"```\nfewstep sample --model {base.path} --lora {out}:1.0 --lora LCM-LORA-OF-{Path(str(base.path)).name}:1.0 "
             f"--steps 4\n```")
    return save_lora(out, unet, info, readme(Path(out).name, what, usage, command), pipeline=base.diffusers_pipeline)
