"""FLUX- and SD3-format pipeline folders: the flow-matching transformer families, each a :class:`FlowFamily` — a
conditioner (its text encoders and one embedding formula), a codec (the VAE with its shift and scaling factors) and
a transformer backbone (:mod:`fewstep.nets.flow_transformers`) — over the registered ``flow`` noise space
(:mod:`fewstep.core.flow`).

A folder is diffusers' own layout (``FluxPipeline.from_pretrained`` / ``StableDiffusion3Pipeline.from_pretrained``
load it unchanged), read from safetensors only:

    FLUX:  transformer/ (FluxTransformer2DModel)  vae/  text_encoder/ + tokenizer/ (CLIP)  text_encoder_2/ +
           tokenizer_2/ (T5)  scheduler/ (FlowMatchEulerDiscreteScheduler; FlowMatchLCMScheduler for an LCM)
    SD3:   transformer/ (SD3Transformer2DModel)  vae/  text_encoder/, text_encoder_2/ (CLIP-L, CLIP-G, both with
           projection) + tokenizers  text_encoder_3/ + tokenizer_3/ (T5, optional as in diffusers)  scheduler/

The variants of these families that take more than a prompt (FLUX Fill / Redux / Kontext / Control, SD3 ControlNet
and img2img-only pipelines' extra parts) are refused by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import FewstepError
from ..nets.flow_transformers import AbsentT5, flux_embeddings, sd3_embeddings, tiny_flux, tiny_sd3
from .codecs import VAECodec
from .conditioners import PooledTextConditioner
from .config import ModelConfig, scheduler_fields
from .handle import Model
from .loading import load_text_encoder, pipeline_class


@dataclass(frozen=True)
class FlowFamily:
    """What one flow-matching pipeline family is made of (module docstring)."""

    pipeline: str                                   # the diffusers pipeline class
    transformer: str                                # its transformer class
    encoders: tuple[tuple[str, str, str], ...]      # (part, tokenizer part, transformers class) per text encoder
    embed: Callable                                 # (encoders, ids) -> (text tokens, pooled)
    base_grid: str                                  # FlowSchedule.base_grid: how the pipeline hands out its times
    max_sequence_length: int                        # the pipeline's default T5 length
    name: str                                       # `train-teacher --family` NAME, and what READMEs call it
    title: str
    packed: bool                                    # 2×2 latents per token (FLUX), or patchified inside (SD3)
    pooled_width: str                               # the CLIP config field the pooled vector's width is
    cfg_argument: str                               # the pipeline call's guidance scale (FLUX's "true CFG")
    cfg_negative: bool                              # ... which needs a negative prompt to run CFG at all (FLUX)
    default_shift: float                            # the tiny teacher's scheduler shift (FLUX.1-schnell's, SD3's)
    tiny: Callable                                  # (sizes, clip tok, T5 tok, latent channels, size) -> (encoders,
                                                    # transformer): the tiny teacher's untrained parts
    optional: tuple[str, ...] = ()                  # encoders the pipeline runs without (SD3's T5)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("transformer", "vae", "scheduler") + tuple(p for e in self.encoders for p in e[:2])

    def latent_channels(self, transformer_config) -> int:
        """Channels of the VAE latents the transformer denoises (FLUX packs 2×2 of them into one token)."""
        channels = transformer_config["in_channels"]
        return channels // 4 if self.packed else channels

    def guidance_args(self, scale: float) -> str:
        """The pipeline call's classifier-free guidance at ``scale`` (1 = none), as a README shows it."""
        negative = ", negative_prompt=''" if self.cfg_negative and scale != 1 else ""
        return f"{self.cfg_argument}={scale:g}{negative}"


FAMILIES: dict[str, FlowFamily] = {
    "FluxPipeline": FlowFamily("FluxPipeline", "FluxTransformer2DModel",
                               (("text_encoder", "tokenizer", "CLIPTextModel"),
                                ("text_encoder_2", "tokenizer_2", "T5EncoderModel")),
                               flux_embeddings, "flux", 512, "flux", "FLUX.1", True, "hidden_size", "true_cfg_scale",
                               True, 1.0, tiny_flux),
    "StableDiffusion3Pipeline": FlowFamily("StableDiffusion3Pipeline", "SD3Transformer2DModel",
                                           (("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
                                            ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
                                            ("text_encoder_3", "tokenizer_3", "T5EncoderModel")),
                                           sd3_embeddings, "scheduler", 256, "sd3", "SD3", False, "projection_dim",
                                           "guidance_scale", False, 3.0, tiny_sd3, optional=("text_encoder_3",)),
}
FAMILY_OF_TRANSFORMER = {f.transformer: f for f in FAMILIES.values()}
FAMILY_NAMED = {f.name: f for f in FAMILIES.values()}

UNSUPPORTED = {   # pipelines of these families that need more than a prompt: what they are, for the refusal
    "FluxFillPipeline": "FLUX Fill (inpainting with a mask input)", "FluxPriorReduxPipeline": "FLUX Redux",
    "FluxKontextPipeline": "FLUX Kontext (image editing)", "FluxControlPipeline": "FLUX Control (Canny/Depth)",
    "FluxControlNetPipeline": "FLUX ControlNet", "StableDiffusion3ControlNetPipeline": "SD3 ControlNet",
    "StableDiffusion3InpaintPipeline": "SD3 inpainting", "FluxInpaintPipeline": "FLUX inpainting",
}


def flow_family(index: dict, folder: Path) -> FlowFamily | None:
    """The family of a pipeline folder's ``model_index.json``; None for a UNet pipeline; refused for the variants
    fewstep does not run."""
    name = index.get("_class_name", "")
    if name in UNSUPPORTED:
        raise FewstepError(f"{folder} is a {UNSUPPORTED[name]} pipeline ({name}); fewstep takes text-to-image "
                           f"FluxPipeline and StableDiffusion3Pipeline folders (use its base model's folder)")
    if name in FAMILIES:
        return FAMILIES[name]
    if "transformer" in index or (folder / "transformer").is_dir():
        raise FewstepError(f"{folder} is a {name or 'transformer'} pipeline; fewstep takes FluxPipeline and "
                           f"StableDiffusion3Pipeline folders among the transformer families")
    return None


def load_flow_parts(folder: Path, family: FlowFamily, dtype: torch.dtype, variant: str | None,
                    skip: tuple[str, ...] = ()) -> dict:
    """The parts of a FLUX / SD3 folder (safetensors only), its parts' configs checked against each other first;
    the networks named in ``skip`` (read from elsewhere: a single file's transformer) are not loaded, their
    configs still checked (tokenizers are always the folder's)."""
    import diffusers
    import transformers

    missing = [p for p in family.parts if not (folder / p).is_dir() and
               not any(p in e[:2] and e[0] in family.optional for e in family.encoders)]
    if missing:
        raise FewstepError(f"{folder} lacks {', '.join(missing)}/: not a {family.pipeline} folder")
    check_flow_parts_fit(folder, family)
    kw = {"use_safetensors": True, "torch_dtype": dtype, "variant": variant}
    parts = {name: getattr(diffusers, cls).from_pretrained(folder / name, **kw)
             for name, cls in (("transformer", family.transformer), ("vae", "AutoencoderKL")) if name not in skip}
    for encoder, tokenizer, cls in family.encoders:
        if not (folder / encoder).is_dir():                        # SD3 without T5: zeros, as diffusers
            parts[encoder], parts[tokenizer] = None, None
            continue
        if encoder not in skip:
            parts[encoder] = load_text_encoder(getattr(transformers, cls), folder / encoder, kw)
        tok_cls = transformers.T5TokenizerFast if cls == "T5EncoderModel" else transformers.CLIPTokenizer
        parts[tokenizer] = tok_cls.from_pretrained(folder / tokenizer)
    return parts


def check_flow_parts_fit(folder: Path, family: FlowFamily) -> None:
    """The transformer, VAE and text encoders' configs agree (read before any weights)."""
    from .config import read_json

    transformer = read_json(folder / "transformer" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    if family.latent_channels(transformer) != vae.get("latent_channels"):
        raise FewstepError(f"{folder}: the VAE makes {vae.get('latent_channels')}-channel latents but the "
                           f"{family.transformer} takes {transformer.get('in_channels')} input channels; the parts do "
                           f"not belong together")
    widths = {e[0]: read_json(folder / e[0] / "config.json") for e in family.encoders if (folder / e[0]).is_dir()}
    t5 = widths.get(family.encoders[-1][0], {}).get("d_model")
    if t5 is not None and t5 != transformer.get("joint_attention_dim"):
        raise FewstepError(f"{folder}: the T5 encoder's width {t5} is not the transformer's joint_attention_dim "
                           f"{transformer.get('joint_attention_dim')}; the parts do not belong together")
    pooled = sum(widths[e[0]].get(family.pooled_width, 0)
                 for e in family.encoders if e[2].startswith("CLIP") and e[0] in widths)
    if pooled != transformer.get("pooled_projection_dim"):
        raise FewstepError(f"{folder}: the CLIP encoders' pooled width {pooled} is not the transformer's "
                           f"pooled_projection_dim {transformer.get('pooled_projection_dim')}")


def new_flow_pipeline(config: ModelConfig, family: FlowFamily, transformer, vae, path: Path | str = "",
                      scheduler_config: dict | None = None, **encoders_and_tokenizers) -> Model:
    """A FLUX / SD3 pipeline model from its parts (a loaded folder, a tiny teacher being built): its schedule from
    the scheduler config on the family's grid, a dynamic shift taken at the model's own size."""
    scheduler_config = scheduler_config or {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0,
                                            "num_train_timesteps": 1000}
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = config.image_size // factor
    seq_len = (latent_size // 2) ** 2
    config = dataclasses.replace(config, **scheduler_fields(scheduler_config, family.base_grid, seq_len))
    encoders = [encoders_and_tokenizers.get(e[0]) for e in family.encoders]
    tokenizers = [encoders_and_tokenizers.get(e[1]) for e in family.encoders]
    lengths = [None if e[2].startswith("CLIP") else
               min(family.max_sequence_length, getattr(t, "model_max_length", family.max_sequence_length))
               for e, t in zip(family.encoders, tokenizers)]
    if family.pipeline == "StableDiffusion3Pipeline" and encoders[2] is None:   # no T5: zeros, as diffusers
        encoders[2] = AbsentT5(transformer.config.joint_attention_dim)
        tokenizers[2], lengths[2] = tokenizers[0], family.max_sequence_length   # ids only shape the zeros
    conditioner = PooledTextConditioner(tokenizers, encoders, family.embed, False, str(path), lengths,
                                        family.pipeline)
    parts = {"vae": vae, "scheduler_config": scheduler_config, "family": family.pipeline,
             **{k: v for k, v in encoders_and_tokenizers.items() if v is not None}}
    codec = VAECodec(vae, family.latent_channels(transformer.config), latent_size)
    return Model(config, transformer, conditioner, codec, Path(path), parts)


def flow_scheduler_config(model) -> dict:
    """The scheduler a flow model is saved with: its own, FlowMatchLCMScheduler for a consistency model (an LCM of
    the flow ODE: x̂_0 = x_t − t·v, then re-noised along the flow), FlowMatchEulerDiscreteScheduler otherwise."""
    config = dict(model.parts.get("scheduler_config") or {})
    lcm = model.config.kind == "consistency"
    config["_class_name"] = "FlowMatchLCMScheduler" if lcm else "FlowMatchEulerDiscreteScheduler"
    return config


def flow_pipeline_of(model, transformer=None):
    """The model as its family's diffusers pipeline (``transformer`` instead of its own, if given)."""
    import diffusers

    config = flow_scheduler_config(model)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    family = FAMILIES[model.parts["family"]]
    parts = {p: model.parts.get(p) for e in family.encoders for p in e[:2]}
    return pipeline_class(family.pipeline)(transformer=model.backbone if transformer is None else transformer,
                                           vae=model.parts["vae"], scheduler=scheduler, **parts)
