"""The σ grid a model samples ``steps`` steps on, and where image-to-image starts on it.

- A grid stored in the model's ``sampling_sigmas`` (tuned by ``fewstep eval --tune-sigmas``, or a
  progressive student's own) comes first, for the model's default sampler.
- A parameterization with a grid of its own (the LCM's skipped grid, :func:`fewstep.core.schedules.lcm_timesteps` =
  ``LCMScheduler.set_timesteps``), truncated by ``strength`` as diffusers' LCM img2img does.
- Otherwise the schedule's ``sampling_grid`` (its noise space's, :mod:`fewstep.core.parameterizations`): EDM's
  Karras grid (DDIM's uniform-timestep one for ``ddim``), diffusers' "trailing" VP timesteps, the shifted flow grid
  of ``FlowMatchEulerDiscreteScheduler``, TrigFlow's.

img2img (SDEdit, Meng et al. 2022) runs the last ⌊strength·N⌋ steps of the N-step grid: diffusers'
rule (``init_timestep = int(num_inference_steps * strength)``), the one rule for every model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FewstepError


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first level SDEdit runs from on an N-step grid: N − ⌊strength·N⌋ (diffusers' rule)."""
    if not 0 < strength <= 1:
        raise FewstepError(f"strength must be in (0, 1], got {strength}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise FewstepError(f"strength {strength:g} of {steps} steps runs no step; raise --strength to at least "
                           f"{1 / steps:.2g} or use more --steps")
    return steps - run


def sampling_grid(model, steps: int, sampler: str | None = None, strength: float = 1.0,
                  rho: float | None = None) -> Tensor:
    """The decreasing σ grid (ending in 0) of ``steps`` steps of ``model`` with ``sampler`` (default: the
    model's), the part an img2img of ``strength`` runs (module docstring). ``rho``: the ρ of an EDM-space
    model's Karras grid instead of its schedule's (7; ρ = 3 suits Heun at 2–4 steps, BENCHMARKS.md)."""
    if steps < 1:
        raise FewstepError(f"steps must be at least 1, got {steps}")
    config, schedule = model.config, model.schedule
    if config.param.grid is not None:     # a parameterization with its own grid (LCM's skipped one)
        if not 0 < strength <= 1:
            raise FewstepError(f"strength must be in (0, 1], got {strength}")
        try:
            return config.param.grid(schedule, config, steps, strength)
        except ValueError as e:
            raise FewstepError(str(e)) from None
    sampler = sampler or config.default_sampler
    stored = config.sampling_sigmas.get(str(steps))
    if stored is not None and rho is None and sampler == config.default_sampler:
        grid = torch.tensor(stored, dtype=torch.float32)
    else:
        try:
            grid = schedule.sampling_grid(steps, sampler, rho)
        except ValueError as e:
            raise FewstepError(str(e)) from None
    start = img2img_start(steps, strength)       # the checks and diffusers' UNet pipelines' rounding
    own = getattr(schedule, "img2img_start", None)   # a space whose pipelines round it otherwise (flow)
    return grid[own(steps, strength) if own is not None and strength < 1 else start:]
