"""The flow-matching transformer families' networks: FLUX.1-format and SD3-format backbones, their text embeddings,
and the tiny teachers' parts (DESIGN.md §4).

Both are diffusers transformers that predict the rectified-flow velocity (:mod:`fewstep.core.flow`) from latents, a
sequence of text tokens and a pooled text vector. fewstep's denoisers work on the latents as an image [B, C, H, W]
(what the codec makes, what zero-shot editing and img2img touch); the wrappers here turn that into what each
transformer takes, exactly as its diffusers pipeline does:

- :class:`FluxBackbone` (``FluxPipeline.__call__`` and its ``_pack_latents`` / ``_unpack_latents`` /
  ``_prepare_latent_image_ids``, diffusers 0.42 ``pipelines/flux/pipeline_flux.py``): the latents packed into 2×2
  patches as tokens, positional ids (0, row, col) for them and zeros for the text, the timestep as t ∈ [0, 1]
  (``timestep / 1000``), and — for a guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev) — the
  guidance scale itself as ``guidance``.
- :class:`SD3Backbone` (``StableDiffusion3Pipeline.__call__``): the latents as they are (the transformer patchifies),
  the timestep as t·1000.

The text embeddings are one function per family (:func:`flux_embeddings`, :func:`sd3_embeddings`), the
pipelines' ``encode_prompt`` without the batching options, so conditioning at sampling and training (where the text
encoders learn with the transformer) is one formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .wrapped import WrappedUNet


# --- backbones ------------------------------------------------------------------------------------------------
def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C] (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=None) -> Tensor:
    """The (0, row, col) position of each packed token (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class PackedNoise:
    """A generator's noise in FLUX's packed layout: FlowMatchLCMScheduler (and every stochastic step of FluxPipeline)
    draws ``randn(packed_latents.shape)``, so the same seed gives the same image only if fewstep draws its step noise
    as [B, HW/4, 4C] too and unpacks it (the initial latents are drawn unpacked, as ``prepare_latents`` does)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def randn_like(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        z = torch.randn((b, (h // 2) * (w // 2), 4 * c), generator=self.generator, dtype=x.dtype)
        return unpack_latents(z, h, w).to(x.device)


class FluxBackbone(WrappedUNet):
    """``net(x [B, C, H, W], t·1000, encoder_hidden_states, pooled_projections[, guidance_scale])`` → the velocity
    [B, C, H, W] of a ``FluxTransformer2DModel`` (module docstring). The guidance scale is passed only to a
    transformer with a guidance embedding (:attr:`takes_guidance`); FluxPipeline gives it the scale s itself."""

    @property
    def takes_guidance(self) -> bool:
        return bool(getattr(self.unet.config, "guidance_embeds", False))

    def step_noise(self, generator: torch.Generator) -> PackedNoise:
        """Where a sampler's step noise comes from (:class:`PackedNoise`, FluxPipeline's layout)."""
        return PackedNoise(generator)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                guidance_scale: Tensor | float | None = None):
        b, _, h, w = sample.shape
        guidance = None
        if self.takes_guidance:
            scale = 1.0 if guidance_scale is None else guidance_scale
            guidance = torch.as_tensor(scale, dtype=torch.float32, device=sample.device).reshape(-1).expand(b)
        out = self.unet(hidden_states=pack_latents(sample), timestep=timestep.expand(b) / 1000, guidance=guidance,
                        pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                        txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype),
                        img_ids=latent_image_ids(h // 2, w // 2, sample.device, sample.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)


class SD3Backbone(WrappedUNet):
    """``net(x, t·1000, encoder_hidden_states, pooled_projections)`` → an ``SD3Transformer2DModel``'s velocity."""

    takes_guidance = False

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor):
        return self.unet(hidden_states=sample, timestep=timestep.expand(len(sample)),
                         encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                         return_dict=False)[0]


FLOW_BACKBONES = {"FluxTransformer2DModel": FluxBackbone, "SD3Transformer2DModel": SD3Backbone}


def flow_backbone(net: nn.Module) -> nn.Module | None:
    """``net`` (a diffusers FLUX / SD3 transformer) in its wrapper; None for any other network."""
    cls = FLOW_BACKBONES.get(type(net).__name__)
    return cls(net) if cls else None


# --- text embeddings (one formula for sampling and training) ----------------------------------------------------
def flux_embeddings(encoders: Sequence[nn.Module], ids: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(T5's last hidden states [B, L, D], CLIP's pooled output [B, P]): what a FLUX transformer is conditioned on
    (``FluxPipeline._get_t5_prompt_embeds`` / ``_get_clip_prompt_embeds``). ``encoders`` = (CLIP, T5), ``ids`` =
    their token ids."""
    clip, t5 = encoders
    pooled = clip(ids[0], output_hidden_states=False).pooler_output
    return t5(ids[1], output_hidden_states=False)[0], pooled


def sd3_embeddings(encoders: Sequence[nn.Module], ids: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """SD3's joint text tokens and pooled vector (``StableDiffusion3Pipeline.encode_prompt``, clip_skip None): the
    two CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens after them along
    the sequence; the pooled vector is both CLIPs' projected pooled outputs side by side. ``encoders`` = (CLIP-L,
    CLIP-G, T5 — or :class:`AbsentT5` for a folder without one)."""
    clip_l, clip_g, t5 = encoders
    first = clip_l(ids[0], output_hidden_states=True)
    second = clip_g(ids[1], output_hidden_states=True)
    clip_tokens = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    t5_tokens = t5(ids[2])[0]
    clip_tokens = F.pad(clip_tokens, (0, t5_tokens.shape[-1] - clip_tokens.shape[-1]))
    return torch.cat([clip_tokens, t5_tokens], dim=-2), torch.cat([first[0], second[0]], dim=-1)


class AbsentT5(nn.Module):
    """SD3 without its T5 (``text_encoder_3=None``): zeros of the transformer's joint attention width for every
    token, as ``StableDiffusion3Pipeline._get_t5_prompt_embeds`` returns then (its ``max_sequence_length`` tokens)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, ids: Tensor) -> tuple[Tensor]:
        return (torch.zeros(*ids.shape, self.width, device=ids.device),)


# --- the tiny teachers' parts -------------------------------------------------------------------------------------
@dataclass
class TinyFlowConfig:
    """Sizes of the embedded FLUX- and SD3-format teachers: the emoji-sd VAE's 8×8×4 latents (16 tokens of 2×2
    patches), CLIP text encoders as emoji-sd's, and a small T5 encoder with its own tokenizer."""

    image_size: int = 32
    vocab_size: int = 1024                         # the CLIP BPE (fewstep.nets.unets.build_tokenizer)
    max_length: int = 32                           # CLIP and T5 tokens; the longest caption has 21 CLIP tokens
    text_width: int = 64                           # each CLIP's width
    text_layers: int = 2
    t5_vocab_size: int = 1024                      # the T5 Unigram vocabulary, learned from the captions
    t5_width: int = 64
    t5_layers: int = 2
    width: int = 128                               # transformer width: heads × head_dim
    head_dim: int = 32
    layers: int = 2                                # FLUX double-stream blocks / SD3 joint blocks
    single_layers: int = 4                         # FLUX single-stream blocks (SD3 has none: its joint blocks + these)


def build_t5_tokenizer(captions: Sequence[str], vocab_size: int = 1024, max_length: int = 32):
    """A ``T5TokenizerFast`` whose SentencePiece-style Unigram model is learned from ``captions`` (T5's normalizer
    and ▁ pre-tokenizer, ``</s>`` appended, ``<pad>`` id 0, as t5-v1_1's tokenizer has), so FluxPipeline and
    StableDiffusion3Pipeline tokenize with it as with google/t5-v1_1-xxl's, only with a vocabulary of this data."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Replace("\u2028", " "), normalizers.Replace("\u2029", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(list(captions), trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                    unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=max_length)


def build_t5(cfg: TinyFlowConfig, tokenizer) -> nn.Module:
    """A small ``T5EncoderModel`` (t5-v1_1's gated-GELU feed-forward, relative position buckets)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=cfg.t5_width, d_kv=16, d_ff=2 * cfg.t5_width, num_layers=cfg.t5_layers,
        num_heads=cfg.t5_width // 16, relative_attention_num_buckets=8, relative_attention_max_distance=cfg.max_length,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def build_flux_transformer(cfg: TinyFlowConfig, latent_channels: int, guidance_embeds: bool = False) -> nn.Module:
    """A ``FluxTransformer2DModel`` on 2×2-packed latents; RoPE's three axes split the head dimension as FLUX's
    (16, 56, 56) of 128 do, in proportion."""
    from diffusers import FluxTransformer2DModel

    side = (cfg.head_dim * 7 // 16) // 2 * 2
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=cfg.layers,
                                  num_single_layers=cfg.single_layers, attention_head_dim=cfg.head_dim,
                                  num_attention_heads=cfg.width // cfg.head_dim, joint_attention_dim=cfg.t5_width,
                                  pooled_projection_dim=cfg.text_width, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(cfg.head_dim - 2 * side, side, side))


def build_sd3_transformer(cfg: TinyFlowConfig, latent_channels: int, latent_size: int) -> nn.Module:
    """An ``SD3Transformer2DModel`` with 2×2 patches; ``layers + single_layers / 2`` joint blocks (a joint block
    has both streams' weights, about two single-stream blocks' worth), so it has about the FLUX teacher's size."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=latent_size, patch_size=2, in_channels=latent_channels,
                                 out_channels=latent_channels, num_layers=cfg.layers + cfg.single_layers // 2,
                                 attention_head_dim=cfg.head_dim, num_attention_heads=cfg.width // cfg.head_dim,
                                 joint_attention_dim=cfg.t5_width, caption_projection_dim=cfg.width,
                                 pooled_projection_dim=2 * cfg.text_width, pos_embed_max_size=latent_size)


def student_has_guidance(transformer: nn.Module) -> bool:
    """Whether :func:`flow_student` of ``transformer`` takes the guidance scale (FLUX's guidance embedding; SD3 has
    none)."""
    return type(transformer).__name__ == "FluxTransformer2DModel"


def flow_student(transformer: nn.Module) -> nn.Module:
    """The LCD student of a flow transformer, starting as the teacher's conditional velocity: a FLUX transformer
    gets FLUX.1-dev's guidance input (rebuilt from its config with ``guidance_embeds``, the teacher's weights
    loaded, the new guidance MLP's last layer zero-initialised so it adds nothing until it trains — the guidance
    distillation of Meng et al. 2023 in FLUX's own embedding, so FluxPipeline feeds it ``guidance_scale``); an SD3
    transformer has no such input, so its student is a copy that distils one guidance scale."""
    import copy

    if not student_has_guidance(transformer) or transformer.config.guidance_embeds:
        return copy.deepcopy(transformer)
    student = type(transformer).from_config({**transformer.config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_text_embed.guidance_embedder.") for k in missing):
        raise ValueError(f"the FLUX teacher does not fit its guidance-embedded student (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    last = student.time_text_embed.guidance_embedder.linear_2
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return student.to(transformer.dtype)


def tiny_flux(cfg: TinyFlowConfig, clip_tokenizer, t5_tokenizer, latent_channels: int, latent_size: int):
    """The tiny FLUX-format teacher's text encoders (CLIP, T5) and transformer, untrained."""
    from .unets import build_text_encoder

    return ([build_text_encoder(cfg, clip_tokenizer), build_t5(cfg, t5_tokenizer)],
            build_flux_transformer(cfg, latent_channels))


def tiny_sd3(cfg: TinyFlowConfig, clip_tokenizer, t5_tokenizer, latent_channels: int, latent_size: int):
    """The tiny SD3-format teacher's text encoders (CLIP-L- and CLIP-G-shaped, both projecting; T5) and transformer."""
    from .unets import build_text_encoder

    clips = [build_text_encoder(cfg, clip_tokenizer, projection_dim=cfg.text_width) for _ in range(2)]
    return clips + [build_t5(cfg, t5_tokenizer)], build_sd3_transformer(cfg, latent_channels, latent_size)
