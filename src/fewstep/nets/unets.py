"""The networks fewstep builds from scratch: the pixel-space class-conditional UNet, and the parts of the
tiny Stable-Diffusion-format pipeline (DESIGN.md §4): a CLIP BPE tokenizer learned offline from the
captions, a small AutoencoderKL, a CLIPTextModel and a UNet2DConditionModel with cross-attention — all
diffusers/transformers classes, so the result is an ordinary diffusers pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from diffusers import UNet2DModel

from ..errors import FewstepError


def build_unet(image_size: int, channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> UNet2DModel:
    """A small class-conditional UNet2DModel: 3 levels (width, 2·width, 2·width), self-attention at the
    middle level, class embeddings with one extra "null" class for classifier-free guidance.
    At width 32 and 16×16 it has 1.6M parameters and trains at ~1.5 it/s at batch 128 on 2 CPU cores."""
    if width < 8 or width % 8:
        raise FewstepError(f"UNet width must be a positive multiple of 8 (group norm of 8 groups), got {width}")
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_classes + 1 if num_classes else None,
        norm_num_groups=8, attention_head_dim=min(32, 2 * width), dropout=dropout)


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


def build_text_encoder(cfg: TinySDConfig, tokenizer, width: int | None = None, projection_dim: int | None = None):
    """A CLIPTextModel of ``cfg``'s sizes (``width`` instead of ``cfg.text_width``); with ``projection_dim`` a
    CLIPTextModelWithProjection (SDXL's second encoder, whose projected pooled output the UNet takes)."""
    import transformers

    width = width or cfg.text_width
    cls = transformers.CLIPTextModelWithProjection if projection_dim else transformers.CLIPTextModel
    return cls(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=width // 16,
        max_position_embeddings=cfg.max_length, projection_dim=projection_dim or width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_cond_unet(cfg: TinySDConfig, **changes):
    """The tiny teacher's cross-attention UNet; ``changes`` override its UNet2DConditionModel arguments."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        **{"cross_attention_dim": cfg.text_width, "attention_head_dim": [c // cfg.head_dim for c in cfg.unet_channels],
           "norm_num_groups": 16, **changes})
