"""The tiny autoencoder (TAESD, Bohan 2023, "Tiny AutoEncoder for Stable Diffusion"): diffusers'
``AutoencoderTiny``, sized for a pipeline's latents. It encodes images straight to the pipeline's *scaled*
latents and decodes them back (``scaling_factor`` 1), so diffusers pipelines take it as ``pipe.vae``
unchanged, as they take ``madebyollin/taesd``; StreamDiffusion (Kodaira et al. 2023) decodes with it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import FewstepError


def build_tiny_vae(latent_channels: int, factor: int, width: int = 16, decoder_blocks: Sequence[int] = (2, 1, 0),
                   encoder_blocks: Sequence[int] = (1, 1, 1)):
    """An ``AutoencoderTiny`` with log2(``factor``) ×2 up/downsamplings at a constant ``width`` (TAESD keeps
    one width too: 64). Blocks are TAESD's conv-ReLU residual blocks, one count per resolution, lowest first
    for the decoder; diffusers pipelines read the spatial factor off ``len(block_out_channels)``."""
    levels = round(math.log2(factor)) + 1
    if 2 ** (levels - 1) != factor:
        raise FewstepError(f"a tiny VAE upsamples by powers of 2; the pipeline's VAE factor is {factor}")
    if len(decoder_blocks) != levels or len(encoder_blocks) != levels:
        raise FewstepError(f"give {levels} decoder and encoder block counts (one per resolution) for factor {factor}")
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=latent_channels,
                           encoder_block_out_channels=(width,) * levels, decoder_block_out_channels=(width,) * levels,
                           num_encoder_blocks=tuple(encoder_blocks), num_decoder_blocks=tuple(decoder_blocks),
                           scaling_factor=1.0)
