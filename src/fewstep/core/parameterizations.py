"""The parameterization registry: every noise space fewstep knows, each registered once (DESIGN.md §2).

A :class:`NoiseSpace` is what a family of models shares: its schedule class (training levels, sampling grids,
model time ↔ σ, the prior), the adapter that turns a backbone into the one σ-space denoiser contract
``denoiser(x, σ, **cond) -> x0`` (:mod:`fewstep.core.denoisers`), where its consistency boundary lies, and the
diffusers schedulers that run its models. A :class:`Parameterization` is what a ``fewstep.json`` names: a space
and the network's scalings in it — a diffusion denoiser D, or a consistency function f whose scalings enforce the
space's boundary condition (``cm``, ``lcm``). In the flow and TrigFlow spaces x̂_0 meets f(x, 0) = x by itself, so
their diffusion and consistency models share one parameterization (``fewstep.json``'s ``kind`` tells them apart).

=============  ==========================  ==============================  ===================================
name           space (schedule)            network                         diffusers scheduler
=============  ==========================  ==============================  ===================================
``edm``        EDM σ (:class:`EDMSchedule`)  D, Karras preconditioning       ``EDMEulerScheduler``
``cm``         EDM σ                       f, Song et al. 2023 App. C       ``CMStochasticIterativeScheduler``
``vp``         discrete VP (:class:`VPSchedule`)  ε / v / x0 UNet          ``DDIMScheduler`` (and the rest)
``lcm``        discrete VP                 f, LCM's c_skip/c_out (eq. 9)    ``LCMScheduler``
``tcd``        discrete VP                 ε UNet; f(x_t, t, s) = DDIM t→s  ``TCDScheduler``
``flow``       rectified flow (:mod:`.flow`)  velocity; f is the same       ``FlowMatchEulerDiscreteScheduler``
``trigflow``   TrigFlow (:mod:`.trigflow`)  σ_d·F; f is the same             ``SCMScheduler``
``trigflow-edm`` TrigFlow                  f over an EDM backbone (sCD/sCT)  ``SCMScheduler``
=============  ==========================  ==============================  ===================================

Adding a noise space is one module that defines its schedule and adapter and calls :func:`register_space` (and
:func:`register` for a consistency form with scalings of its own; :mod:`fewstep.core.flow` is the worked example),
plus its import in ``fewstep/core/__init__.py``
(importing any ``fewstep.core`` module runs it first, so every space is registered before a lookup).
Nothing above ``core`` branches on a space: it asks the registry (``parameterization(config.parameterization)``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Callable, Protocol

from torch import Tensor, nn

from .denoisers import EDMDenoiser, LCMConsistency, VPDenoiser, cm_scalings
from .schedules import EDMSchedule, VPSchedule, append_zero, lcm_timesteps


class DenoiserOptions(Protocol):
    """What an adapter may read off a model's config (``fewstep.models.config.ModelConfig`` has these)."""

    prediction_type: str
    timestep_scaling: float
    original_inference_steps: int


Builder = Callable[[nn.Module, Any, DenoiserOptions], nn.Module]


@dataclass(frozen=True)
class NoiseSpace:
    """One noise space (module docstring)."""

    name: str
    schedule: type                              # its schedule class; fewstep.json's "schedule" holds its fields
    build: Builder                              # (backbone, schedule, options) -> the diffusion denoiser D(x, σ)
    consistency: str                            # the parameterization a consistency model of this space has
    boundary: Callable[[Any], float]            # schedule -> the σ where f(x, σ) = x (multistep sampling re-noises
                                                # to √(σ'² − boundary²)): σmin in EDM space, 0 elsewhere
    diffusers_scheduler: str                    # what runs its diffusion models in diffusers
    consistency_scheduler: str                  # ... and its consistency models
    default_sampler: str = "dpmpp-2m"           # the teacher sampler a new model of this space defaults to
    continuous: str = ""                        # the parameterization its continuous-time (sCM) students take:
                                                # "" = ``consistency`` (EDM's: "trigflow-edm", :mod:`.trigflow`)


@dataclass(frozen=True)
class Parameterization:
    """What ``fewstep.json``'s ``parameterization`` names (module docstring)."""

    name: str
    space: NoiseSpace
    build: Builder                              # (backbone, schedule, options) -> the σ-space network
    grid: Callable[..., Tensor] | None = None   # its own sampling grid (schedule, options, steps, strength), if any

    def make_schedule(self, values: dict[str, Any] | None = None):
        """Its space's schedule from ``fewstep.json``'s ``schedule`` fields (the defaults where empty)."""
        return self.space.schedule(**(values or {}))


def schedule_fields(schedule: Any) -> dict[str, Any]:
    """The fields a schedule is made from (``fewstep.json``'s ``schedule``): its dataclass's init fields, not the
    tables it derives from them (VPSchedule's ᾱ)."""
    return {f.name: getattr(schedule, f.name) for f in fields(schedule) if f.init}


SPACES: dict[str, NoiseSpace] = {}
PARAMETERIZATIONS: dict[str, Parameterization] = {}


def register_space(space: NoiseSpace) -> NoiseSpace:
    """Register a space and its diffusion parameterization (named like the space, its ``build``)."""
    SPACES[space.name] = space
    register(Parameterization(space.name, space, space.build))
    return space


def register(param: Parameterization) -> Parameterization:
    PARAMETERIZATIONS[param.name] = param
    return param


def parameterization(name: str) -> Parameterization:
    """The registered parameterization ``name``; a ValueError naming the known ones otherwise."""
    try:
        return PARAMETERIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown parameterization {name!r} (one of {', '.join(PARAMETERIZATIONS)})") from None


def consistency_of(space: NoiseSpace | str) -> Parameterization:
    """The consistency-function parameterization of a space (what CD/CT/LCD students of its teachers are)."""
    space = SPACES[space] if isinstance(space, str) else space
    return parameterization(space.consistency)


def continuous_of(space: NoiseSpace | str) -> Parameterization:
    """What a continuous-time consistency (sCD/sCT) student of the space's teachers is: TrigFlow's consistency
    function over the teacher's backbone (``trigflow-edm`` for EDM, ``trigflow`` itself), else its consistency one."""
    space = SPACES[space] if isinstance(space, str) else space
    return parameterization(space.continuous or space.consistency)


# --- EDM σ space (Karras et al. 2022) and its consistency models (Song et al. 2023) ---------------------------
def _edm(net: nn.Module, schedule: EDMSchedule, options: Any) -> nn.Module:
    return EDMDenoiser(net, sigma_data=schedule.sigma_data)


def _cm(net: nn.Module, schedule: EDMSchedule, options: Any) -> nn.Module:
    return EDMDenoiser(net, sigma_data=schedule.sigma_data, scalings=partial(cm_scalings, sigma_min=schedule.sigma_min))


EDM = register_space(NoiseSpace("edm", EDMSchedule, _edm, "cm", lambda s: float(s.sigma_min), "EDMEulerScheduler",
                                "CMStochasticIterativeScheduler", continuous="trigflow-edm"))
register(Parameterization("cm", EDM, _cm))


# --- discrete VP (DDPM, Stable Diffusion) and latent consistency models (Luo et al. 2023) ----------------------
def _vp(net: nn.Module, schedule: VPSchedule, options: Any) -> nn.Module:
    return VPDenoiser(net, schedule, getattr(options, "prediction_type", "epsilon"))


def _lcm(net: nn.Module, schedule: VPSchedule, options: Any) -> nn.Module:
    return LCMConsistency(_vp(net, schedule, options), getattr(options, "timestep_scaling", 10.0))


def _lcm_grid(schedule: VPSchedule, options: Any, steps: int, strength: float) -> Tensor:
    """LCMScheduler.set_timesteps: the skipped grid of ``original_inference_steps``, truncated for img2img."""
    ts = lcm_timesteps(steps, options.original_inference_steps, schedule.num_train_timesteps, strength)
    return append_zero(schedule.sigmas[ts]).float()


VP = register_space(NoiseSpace("vp", VPSchedule, _vp, "lcm", lambda s: 0.0, "DDIMScheduler", "LCMScheduler"))
register(Parameterization("lcm", VP, _lcm, grid=_lcm_grid))


# --- trajectory consistency models (Zheng et al. 2024): an ε/v/x0 UNet like a VP teacher's (no boundary scalings:
# f_θ(x_t, t, s) is the DDIM step t → s with its ε, TCD eq. 9 and scheduling_tcd.py:656–668), sampled on LCM's
# skipped grid (TCDScheduler.set_timesteps, scheduling_tcd.py:481–587, is LCMScheduler's).
register(Parameterization("tcd", VP, _vp, grid=_lcm_grid))
