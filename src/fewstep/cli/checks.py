"""What a sampling command asks of the model it loaded, checked before any sampling: flags that do not apply to
this model are errors that say so (never silently ignored), a size far past what the model was trained on needs
--allow-large, and the images asked for must fit in memory (an estimate, before anything is allocated)."""

from __future__ import annotations

import argparse

from ..errors import FewstepError
from ..io.budget import check_memory, images_bytes

AREA = 16          # --height × --width up to 16× the model's own area (4× a side: SD 1.5's 512² → 2048²) without
                   # --allow-large; beyond, a 32² model at 2048² runs minutes a step and draws nothing it learned


def check_flags_apply(args: argparse.Namespace, model) -> None:
    """``--rho``, ``--clamp-x0`` and ``--sigmas`` only where they change something for ``model``."""
    from ..core.schedules import EDMSchedule

    rho, sigmas = getattr(args, "rho", None), getattr(args, "sigmas", None)
    if rho is not None:
        if sigmas is not None:
            raise FewstepError("--rho shapes the Karras grid that --sigmas replaces; give one of them")
        if model.config.param.grid is not None:
            raise FewstepError(f"--rho shapes the Karras grid of EDM σ-space models; {model.path} is a "
                               f"{model.config.parameterization} model sampled on its own timestep grid: leave --rho out")
        if not isinstance(model.schedule, EDMSchedule):
            raise FewstepError(f"--rho shapes the Karras grid of EDM σ-space models; {model.path} is a "
                               f"{model.config.param.space.name}-space model sampled on its own grid: leave --rho out")
    if getattr(args, "clamp_x0", False) and not model.codec.pixels:
        raise FewstepError(f"--clamp-x0 clips a pixel model's x0-estimates to the images' range [-1, 1]; {model.path} "
                           f"denoises VAE latents, which have no such range: leave --clamp-x0 out")


def check_sample_request(args: argparse.Namespace, model, total: int) -> None:
    """:func:`check_flags_apply`; ``--height``/``--width`` within :data:`AREA` times the model's own area unless
    --allow-large; ``total`` images of that size (and a network batch of their latents) within free memory."""
    check_flags_apply(args, model)
    channels, h, w = model.shape
    f = model.codec.factor
    height, width = getattr(args, "height", None) or h * f, getattr(args, "width", None) or w * f
    ratio = height * width / (h * f * w * f)
    if ratio > AREA and not getattr(args, "allow_large", False):
        raise FewstepError(f"--height {height} --width {width} is {ratio:,.0f}× the area of the {w * f}×{h * f} images "
                           f"{model.path} was trained on (up to {AREA}× without --allow-large, e.g. "
                           f"{4 * h * f}×{4 * w * f}): each step takes far longer and draws nothing it learned; pass "
                           f"--allow-large if you mean it")
    out_channels = model.config.channels if model.codec.pixels else 3
    batch = min(total, getattr(args, "batch_size", None) or 256)
    need = images_bytes(total, out_channels, height, width, copies=2) + \
        images_bytes(batch, channels, height // f, width // f, copies=4)
    check_memory(need, f"{total:,} image(s) of {width}×{height}", "ask for fewer images (--num, prompts) or smaller "
                 "ones (--height/--width)")
