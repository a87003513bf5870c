"""Stable-Diffusion-format pipelines: build, train, save and load them in diffusers' own layout.

A fewstep latent model IS a diffusers pipeline folder (``model_index.json``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``) that
``StableDiffusionPipeline.from_pretrained`` (a teacher) or ``LatentConsistencyModelPipeline``
(an LCM) loads unchanged, plus a ``fewstep.json`` of fewstep's own (sampler defaults, the command
that made it). Any local SD 1.x / 2.x folder works as a teacher too.

The embedded text-to-image teacher (DESIGN.md §4) is built here from scratch: a CLIP BPE
tokenizer trained offline on the emoji captions, a small CLIPTextModel trained jointly with a
UNet2DConditionModel (cross-attention) on the latents of a small AutoencoderKL (32×32×3 → 8×8×4),
Stable Diffusion's scaled-linear 1000-step schedule and ε-prediction.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .denoisers import VPDenoiser
from .errors import FewstepError
from .schedules import VPSchedule

CONFIG_NAME = "fewstep.json"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Stable Diffusion 1.x's scheduler (CompVis/stable-diffusion-v1-4 scheduler_config.json), so that
# LCMScheduler.from_config / DDIMScheduler.from_config give what SD users get.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                    timestep_spacing="leading")


@dataclass
class TinySDConfig:
    """Sizes of the embedded teacher: small enough to train on 2 CPU cores in about an hour
    (the VAE's 32×32 level is the expensive part, hence its 16 channels there)."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 64)   # two downsamplings: 32×32 → 8×8 latents
    latent_channels: int = 4
    vocab_size: int = 1024                         # BPE merges learned from the captions
    max_length: int = 32                           # tokens incl. bos/eos; the longest caption has 21
    text_width: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 64)   # 1.5M parameters
    unet_layers: int = 1
    head_dim: int = 16


# --- building ---------------------------------------------------------------------------------
def build_tokenizer(captions: Sequence[str], vocab_size: int = 1024, max_length: int = 32):
    """A CLIPTokenizer whose BPE is learned from ``captions`` with CLIP's own normalizer and
    pre-tokenizer (NFC, lowercase, CLIP's regex split, byte-level alphabet, ``</w>`` word ends),
    so it tokenizes like openai/clip-vit-large-patch14, only with a vocabulary of this data.
    Built with ``vocab=``/``merges=`` (transformers 5 ignores ``vocab_file=``; DESIGN.md §7)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    seed_vocab = {tok: i for i, tok in enumerate(alphabet + [a + "</w>" for a in alphabet] + specials)}
    seed = CLIPTokenizer(vocab=seed_vocab, merges=[])   # only to borrow CLIP's normalizer + pre-tokenizer
    bpe = Tokenizer(models.BPE(unk_token=specials[1], end_of_word_suffix="</w>"))
    bpe.normalizer = seed.backend_tokenizer.normalizer
    bpe.pre_tokenizer = seed.backend_tokenizer.pre_tokenizer
    bpe.train_from_iterator(list(captions), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, end_of_word_suffix="</w>",
        show_progress=False))
    vocab = bpe.get_vocab()
    merges = [tuple(m) if isinstance(m, (tuple, list)) else tuple(m.split(" "))
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_vae(cfg: TinySDConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=8,
                         sample_size=cfg.image_size)


def build_text_encoder(cfg: TinySDConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_width // 16,
        max_position_embeddings=cfg.max_length, projection_dim=cfg.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_cond_unet(cfg: TinySDConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_width, attention_head_dim=[c // cfg.head_dim for c in cfg.unet_channels],
        norm_num_groups=16)


# --- a loaded pipeline as fewstep sees it -----------------------------------------------------------
@dataclass
class LatentModel:
    """A text-to-image latent diffusion model: the diffusers parts plus fewstep's view of them
    (a σ-space denoiser over the UNet, the VP schedule, the latent scaling)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict
    path: Path
    info: dict = field(default_factory=dict)      # fewstep.json (empty for a folder fewstep did not write)

    @property
    def schedule(self) -> VPSchedule:
        return VPSchedule.from_diffusers_config(self.scheduler_config)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def denoiser(self) -> VPDenoiser:
        """x0-prediction in σ space; a UNet with ``time_cond_proj_dim`` takes ``guidance_scale`` as an input."""
        from .guided import GuidedUNet

        dim = self.unet.config.time_cond_proj_dim
        return VPDenoiser(GuidedUNet(self.unet, dim) if dim else self.unet, self.schedule, self.prediction_type)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return c.in_channels, c.sample_size, c.sample_size

    @property
    def is_lcm(self) -> bool:
        """A latent consistency model (Luo et al. 2023): LCD-made, or a base model with an LCM-LoRA."""
        return self.info.get("kind") == "lcm"

    # sampling defaults (fewstep.json; an LCM samples with its consistency sampler on its distilled grid)
    @property
    def default_sampler(self) -> str:
        return "consistency" if self.is_lcm else self.info.get("default_sampler", "dpmpp-2m")

    @property
    def default_steps(self) -> int:
        return int(self.info.get("default_steps", 4 if self.is_lcm else 25))

    @property
    def default_guidance_scale(self) -> float:
        return float(self.info.get("default_guidance_scale", 3.0))

    @property
    def original_inference_steps(self) -> int:
        """The skipped grid an LCM was distilled on (LCMScheduler's ``original_inference_steps``)."""
        return int(self.scheduler_config.get("original_inference_steps", 50))

    @property
    def takes_guidance(self) -> bool:
        """An LCD or guided-distillation student takes the guidance scale as an input (``timestep_cond``,
        one pass per step); a teacher or an LCM-LoRA does not (CFG around it)."""
        return bool(self.unet.config.time_cond_proj_dim)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids padded to the tokenizer's length; a longer prompt is cut, with a warning
        (as diffusers' pipelines do), since the text encoder has no positions beyond it."""
        limit = self.tokenizer.model_max_length
        prompts = list(prompts)
        out = self.tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]  # one batched call, untruncated
        long = [p for p, n in zip(prompts, lengths) if n > limit]
        if long:
            warnings.warn(f"{len(long)} prompt(s) longer than the tokenizer's {limit} tokens were truncated, "
                          f"e.g. {long[0][:60]!r}", stacklevel=2)
        return out.input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """CLIP hidden states [B, L, D] (the last layer, as StableDiffusionPipeline uses them)."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenize(prompts).to(device))[0]

    @torch.no_grad()
    def encode_images(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """VAE posterior means × scaling factor: the latents diffusion runs on."""
        out = [self.vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
        return torch.cat(out) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 256) -> Tensor:
        out = [self.vae.decode(latents[i:i + batch_size] / self.scaling_factor).sample
               for i in range(0, len(latents), batch_size)]
        return torch.cat(out).clamp(-1, 1)

    def to(self, device: str | torch.device) -> "LatentModel":
        for part in (self.unet, self.vae, self.text_encoder):
            part.to(device)
        return self


def is_pipeline_folder(folder: str | Path) -> bool:
    return (Path(folder) / "model_index.json").exists()


def load_latent_model(folder: str | Path, device: str | torch.device = "cpu") -> LatentModel:
    """Load the parts of a local diffusers SD-style folder (weights from safetensors only), with
    checks that say what is wrong before anything runs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FewstepError(f"model folder {folder} does not exist")
    if not is_pipeline_folder(folder):
        raise FewstepError(f"{folder} is not a diffusers pipeline folder (no model_index.json); a teacher for "
                           f"lcd/lcf/lcm-lora must be a Stable-Diffusion-style folder (unet/, vae/, text_encoder/, "
                           f"tokenizer/, scheduler/), e.g. models/emoji-sd")
    missing = [p for p in PIPELINE_PARTS if not (folder / p).is_dir()]
    if missing:
        raise FewstepError(f"{folder} lacks {', '.join(missing)}/: not a Stable-Diffusion-style pipeline")
    if (folder / "text_encoder_2").is_dir():
        raise FewstepError(f"{folder} is an SDXL-style pipeline (two text encoders); fewstep's latent methods "
                           f"take SD 1.x/2.x-style folders so far")
    _check_parts_fit(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except Exception as e:  # diffusers/transformers raise OSError/ValueError/safetensors errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"cannot load the pipeline in {folder} (missing or corrupt weights): {first}") from None
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    info = json.loads((folder / CONFIG_NAME).read_text()) if (folder / CONFIG_NAME).exists() else {}
    model = LatentModel(unet, vae, text_encoder, tokenizer, scheduler_config, folder, info)
    for part in (unet, vae, text_encoder):
        part.requires_grad_(False).eval()
    return model.to(device)


def _check_parts_fit(folder: Path) -> None:
    """The parts' configs agree (read before any weights, so the error names the real problem)."""
    try:
        unet, vae, text = (json.loads((folder / part / "config.json").read_text())
                           for part in ("unet", "vae", "text_encoder"))
    except (OSError, ValueError) as e:
        raise FewstepError(f"{folder}: a part's config.json is missing or corrupt: {e}") from None
    if vae.get("latent_channels") != unet.get("in_channels"):
        raise FewstepError(f"{folder}: the VAE makes {vae.get('latent_channels')}-channel latents but the UNet takes "
                           f"{unet.get('in_channels')} channels; the parts do not belong together")
    if text.get("hidden_size") != unet.get("cross_attention_dim"):
        raise FewstepError(f"{folder}: the text encoder's width {text.get('hidden_size')} is not the UNet's "
                           f"cross_attention_dim {unet.get('cross_attention_dim')}")


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


def save_pipeline(folder: str | Path, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer,
                  info: dict, scheduler: str = "DDIMScheduler", scheduler_config: dict | None = None,
                  readme: str = "") -> Path:
    """Write a diffusers pipeline folder atomically: a StableDiffusionPipeline for a teacher, a
    LatentConsistencyModelPipeline (with LCMScheduler) for an LCM, plus ``fewstep.json``."""
    import diffusers

    sched = getattr(diffusers, scheduler).from_config(scheduler_config or SD_SCHEDULER)
    cls = pipeline_class("LatentConsistencyModelPipeline" if info.get("kind") == "lcm" else "StableDiffusionPipeline")
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if readme:
            (tmp / "README.md").write_text(readme)
    return folder
