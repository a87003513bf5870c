"""The math, torch only: noise schedules and grids, the one denoiser contract and its scalings
(EDM, consistency boundary conditions, VP adapters), classifier-free guidance, ODE/SDE solvers, and the
exact denoiser of a finite data set. Nothing here knows about files, models or training."""

from . import flow, trigflow  # noqa: F401  (the noise spaces beyond EDM and VP register themselves)
