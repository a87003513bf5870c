"""Training past one process's memory: accelerate's FSDP (fully sharded data parallel), version 2.

Under ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes N`` each process holds 1/N of:

- the student's weights, their gradients and the optimizer's moments: ``Accelerator.prepare`` applies torch's
  ``fully_shard`` (FSDP2), which turns every parameter into a DTensor sharded on its first dimension over the N
  processes and all-gathers one wrapped block at a time for its forward and backward;
- the weight EMA (diffusers' ``EMAModel`` built over those sharded parameters, so its shadow copies are sharded
  the same way and its update is shard-local);
- an objective's target network (the consistency target, :class:`fewstep.objectives.consistency.EMACopy`): made
  from the student before sharding, sharded the same way (:func:`shard`), updated shard by shard;
- the frozen teacher a recipe names (``Run.fit(frozen=[teacher.denoiser])``: CD, LCD, TCD, guided, sCD): sharded
  with the same policy and all-gathered block by block for each of its (no-grad) forwards. A frozen module a
  recipe does not name (a pipeline's VAE and text encoders, progressive distillation's round teachers, ACT's small
  discriminator and sCM's weighting network, whose gradients their objectives all-reduce) stays replicated, whole
  on every process, and :mod:`fewstep.training.memory` counts it so;
- a LoRA run's frozen base, which is part of the student module: sharded with it (the adapters train, the base's
  shards just sit there), and LCM-LoRA's adapters-off teacher and target adapter run on those shards.

Gradient accumulation reduce-scatters every micro-batch (accelerate's ``no_sync`` would hold full gradients until
the last one). Where an objective would skip a network call for data on one process only (a consistency target
whose pairs all sit at σ = 0), it calls it anyway under FSDP: every process must take part in the all-gathers.

Checkpoints and the final model are gathered to full tensors one tensor at a time (:func:`gathered`) and written
by the main process only, so they are the very files a single-process run writes: a model folder is an ordinary
diffusers / fewstep folder, and a run may resume at another process count (:func:`scattered` cuts each process's
shard out of the full tensors). The price is that the main process holds the full checkpoint in host memory
while it writes it (weights, EMA, target and moments: up to 20 bytes per trained parameter in fp32).

Which blocks are wrapped (sharded and gathered as one unit): the launcher's ``--fsdp_auto_wrap_policy`` if one is
given; otherwise fewstep wraps each block a model names in its ``_no_split_modules`` (diffusers sets them for
``UNet2DConditionModel`` — ``BasicTransformerBlock``, ``ResnetBlock2D``, … — for SD3's and FLUX's transformers,
transformers for CLIP's encoder layers), or, for a model naming none (``UNet2DModel``), each ``ResnetBlock2D``
and ``Attention``; and the diffusers / transformers model itself around them (:func:`block_classes`). That is
accelerate's ``TRANSFORMER_BASED_WRAP`` with those classes.

accelerate 1.16 turns ``--use_fsdp`` into FSDP only on accelerator devices (``AcceleratorState`` sets
``DistributedType.FSDP`` for MULTI_GPU, MULTI_XPU, …, never for MULTI_CPU); on CPU processes (``ACCELERATE_USE_CPU=1``,
gloo; DESIGN.md §7) :func:`make_accelerator` switches the state to FSDP with the same plugin accelerate builds from
the launcher's ``FSDP_*`` variables, so a CPU run takes the code path a GPU run takes (torch's FSDP2 runs on CPU
tensors over gloo). FSDP1 (``--fsdp_version 1``) is refused: its flat parameters are not the model's own.

Followed: accelerate's FSDP guide (https://huggingface.co/docs/accelerate/usage_guides/fsdp) and its FSDP1 → FSDP2
notes (https://huggingface.co/docs/accelerate/concept_guides/fsdp1_vs_fsdp2); torch's ``fully_shard``
(https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) and DTensor
(https://docs.pytorch.org/docs/stable/distributed.tensor.html: ``full_tensor``, ``distribute_tensor`` with
``src_data_rank=None`` to cut the local shard without communication).
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FewstepError

FALLBACK_BLOCKS = ("ResnetBlock2D", "Attention")   # diffusers' blocks, for a model whose classes name none
CODEC_METHODS = ("encode", "decode")    # a model called through these (a VAE) is no unit of its own (block_classes)


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (``accelerate launch --use_fsdp`` sets ``ACCELERATE_USE_FSDP=true``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(mixed_precision: str = "no"):
    """The run's ``Accelerator``, FSDP on CPU processes too (module docstring)."""
    from accelerate import Accelerator

    return enable_fsdp(Accelerator(mixed_precision=mixed_precision))


def enable_fsdp(acc):
    """``acc`` under FSDP2 where the launcher asked for FSDP: accelerate's own state on accelerator devices; on
    multi-process CPU (where accelerate ignores ``--use_fsdp``) the state switched to FSDP with the plugin built
    from the launcher's ``FSDP_*`` variables. FSDP1 is refused in one line."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    if not fsdp_requested():
        return acc
    if acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise FewstepError("fewstep trains under FSDP2 only: launch with --use_fsdp --fsdp_version 2 "
                           "(FSDP1's flat parameters are not the model's own)")
    return acc


def is_sharded(acc) -> bool:
    """The run shards its weights (FSDP)."""
    from accelerate.utils import DistributedType

    return acc is not None and acc.distributed_type == DistributedType.FSDP


def block_classes(model: nn.Module) -> list[str]:
    """The class names FSDP wraps one by one in ``model``: every ``_no_split_modules`` entry of its modules that
    it instantiates (or :data:`FALLBACK_BLOCKS` where none is named), and each diffusers / transformers model inside
    it (a class with ``_no_split_modules``, the UNet, a text encoder), so that a call into that model from any
    wrapper — the student's denoiser, a teacher's, LCM-LoRA's adapters-off teacher on the student's own UNet —
    gathers its parameters, not only a call through the root. A VAE is the exception: it is called through
    ``encode``/``decode``, around which FSDP gathers nothing (their outputs hold no tensor for its backward hooks), so
    its own parameters stay with the unit around it, whose forward runs."""
    present = {type(m).__name__ for m in model.modules()}
    named = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    blocks = sorted(named & present) or sorted(set(FALLBACK_BLOCKS) & present)
    models = sorted({type(m).__name__ for m in model.modules() if m is not model and hasattr(m, "_no_split_modules")
                     and not any(callable(getattr(m, name, None)) for name in CODEC_METHODS)})
    return blocks + [m for m in models if m not in blocks]


def largest_unit(model: nn.Module, classes: list[str] | None = None) -> int:
    """The parameters of ``model``'s largest FSDP unit under the wrap of ``classes`` (default
    :func:`block_classes`): a unit owns the parameters of its module that no unit inside it owns; the root is one."""
    classes = set(block_classes(model) if classes is None else classes)
    units = [model] + [m for m in model.modules() if m is not model and type(m).__name__ in classes]
    owner: dict[int, int] = {}
    for i, unit in enumerate(units):          # outer units first: an inner unit takes its parameters over
        for p in unit.parameters():
            owner[id(p)] = i
    sizes = [0] * len(units)
    for p in {id(p): p for p in model.parameters()}.values():
        sizes[owner[id(p)]] += p.numel()
    return max(sizes)


def default_wrap_policy(acc, model: nn.Module) -> None:
    """Where the launcher chose no ``--fsdp_auto_wrap_policy``: accelerate's transformer-based policy on
    :func:`block_classes` of ``model`` (module docstring), made again for each model a process trains (accelerate
    binds the policy to the classes of the model it prepares). Called before ``prepare``."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = acc.state.fsdp_plugin
    ours = getattr(plugin, "_fewstep_wrap", False)      # set for an earlier model of this process (a VAE stage)
    if ours or (plugin.auto_wrap_policy is None and "FSDP_AUTO_WRAP_POLICY" not in os.environ):
        classes = block_classes(model)
        plugin.auto_wrap_policy = transformer_auto_wrap_policy if classes else None
        plugin.transformer_cls_names_to_wrap = classes or None
        plugin._fewstep_wrap = True


def _wraps(plugin, module: nn.Module) -> bool:
    """Whether ``plugin``'s policy makes ``module`` a unit of its own (what accelerate's
    ``fsdp2_prepare_auto_wrap_policy`` decides for the student)."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    fn = plugin.auto_wrap_policy
    fn = fn.func if isinstance(fn, functools.partial) else fn
    if fn is transformer_auto_wrap_policy:
        return type(module).__name__ in (plugin.transformer_cls_names_to_wrap or ())
    if fn is size_based_auto_wrap_policy:
        return (plugin.min_num_params or 0) > 0 and sum(p.numel() for p in module.parameters()) > plugin.min_num_params
    return False


def shard(acc, module: nn.Module) -> nn.Module:
    """``module`` (a frozen teacher, a target copy) sharded in place as the student is: the same policy, mesh and
    settings, with no optimizer. Its forward then all-gathers unit by unit; its parameters stay DTensors (the root
    too reshards after its forward: no backward follows to do it, and the target's update is shard by shard)."""
    from accelerate.utils.fsdp_utils import get_module_children_bottom_up
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(module, FSDPModule):
        return module
    plugin = acc.state.fsdp_plugin
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    module.to(acc.device)
    for sub in get_module_children_bottom_up(module)[:-1]:
        if not isinstance(sub, FSDPModule) and _wraps(plugin, sub):
            fully_shard(sub, **kwargs)
    fully_shard(module, **{**kwargs, "reshard_after_forward": True})   # no backward follows to reshard the root
    return module


def local_numel(module: nn.Module) -> int:
    """The parameter elements this process holds of ``module`` (its shards under FSDP, all of it otherwise)."""
    return sum(_local(p).numel() for p in module.parameters())


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gathered(tensors: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    """``tensors`` with every DTensor replaced by its full tensor, on the CPU (a collective: every process calls
    it with the same keys in the same order; one tensor is gathered at a time). ``keep`` False: the process only
    takes part, and keeps nothing (the values become None)."""
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        if _is_dtensor(v):
            full = v.full_tensor().detach().cpu()
            out[k] = full if keep else None
        else:
            out[k] = v if keep else None
    return out


def scattered(full: dict[str, Tensor], like: dict[str, Any]) -> dict[str, Any]:
    """``full`` tensors cut to this process's shard wherever ``like`` holds a DTensor of the same name (its mesh and
    placements; no communication: every process holds the full tensors it read), the rest as they are."""
    from torch.distributed.tensor import distribute_tensor

    out: dict[str, Any] = {}
    for k, v in full.items():
        ref = like.get(k)
        if _is_dtensor(ref) and torch.is_tensor(v):
            out[k] = distribute_tensor(v.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                                       src_data_rank=None)
        else:
            out[k] = v
    return out


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory), its buffers real: the plain
    module a gathered state dict is loaded into (:func:`unsharded`). Made before sharding."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def unsharded(skeleton_: nn.Module, full: dict[str, Tensor]) -> nn.Module:
    """``skeleton_`` (:func:`skeleton`) holding the full state dict ``full``: an ordinary module."""
    skeleton_.load_state_dict(full, assign=True)
    return skeleton_
