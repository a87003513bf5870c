"""The specs of the files fewstep reads (:mod:`fewstep.io.validate` has the machinery): :data:`MODEL_CONFIG`
(``fewstep.json``), :data:`SCHEDULES` (its ``schedule``, per schedule class), :data:`PART_CONFIG` (a pipeline
part's ``config.json`` or ``scheduler_config.json``, keyed by field name so that UNets, transformers, VAEs, text
encoders and schedulers of any family share it), :data:`LORA_INFO` (a LoRA folder's ``fewstep.json`` or a LoRA
file's metadata), :data:`CHECKPOINT_STATE` (a checkpoint's ``state.json``) and :data:`METRICS_RECORD` (a line of
``metrics.jsonl``). A leaf like its machinery: the schedule classes and registries are passed in."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import FewstepError
from .validate import (
    FIX,
    Field,
    check_fields,
    field_error,
    parse_json,
    problem,
    show_value,
    spec_of_dataclass,
    text_lines,
)

# --- fewstep.json ------------------------------------------------------------------------------------
STEPS = 1000                         # the most sampling steps a model may default to (fewstep.cli.args.LIMITS)
TIMESTEPS = 100_000                  # a discrete schedule's training timesteps (every diffusers model: 1000)
GUIDANCE = Field("number", "a guidance scale, 1 = none", 0.0, 100.0)

MODEL_CONFIG: dict[str, Field] = {
    "kind": Field("str", "what the model computes", choices=("diffusion", "consistency")),
    "parameterization": Field("str", "its noise space and output scaling"),   # choices: the registry's (parse_config)
    "schedule": Field("dict", "its noise schedule's settings"),
    "prediction_type": Field("str", "what the network predicts", choices=("epsilon", "v_prediction", "sample")),
    "image_size": Field("int", "the images' side in pixels", 1, 16384),
    "channels": Field("int", "image channels", 1, 64),
    "class_names": Field("list", "its classes", items=Field("str"), length=(0, 100_000)),
    "dataset": Field("str", "the data set it was trained on"),
    "default_sampler": Field("str", "the sampler it runs by default"),           # choices: the solvers' (parse_config)
    "default_steps": Field("int", "the step count it samples by default", 1, STEPS),
    "default_guidance_scale": GUIDANCE,
    "sampling_sigmas": Field("dict", "stored n-step noise-level grids",
                             items=Field("list", items=Field("number", lo=0.0), length=(2, STEPS + 1))),
    "guidance_range": Field("list", "the guidance scales [min, max] it was trained on", items=GUIDANCE,
                            length=(0, 2)),
    "embedding_dim": Field("int", "the width of its guidance-scale embedding", 1, 65536),
    "serves_steps": Field("list", "the step counts its students serve", items=Field("int", lo=1, hi=STEPS),
                          length=(0, 64)),
    "original_inference_steps": Field("int", "the skipped timestep grid an LCM was distilled on", 1, TIMESTEPS),
    "timestep_scaling": Field("number", "LCM's timestep scaling of c_skip/c_out", 0.0, 1e6, lo_open=True),
    "loras": Field("list", "the LoRAs fused in", items=Field("dict"), length=(0, 1000)),
    "training": Field("dict", "how it was trained"),
    "format_version": Field("int", "the fewstep.json format", 1),   # hi: the reader's FORMAT_VERSION (parse_config)
}


def check_model_config(raw: Mapping[str, Any], where: str | Path, fields_of: type, kinds: Iterable[str],
                       parameterizations: Iterable[str], samplers: Iterable[str], format_version: int) -> None:
    """A ``fewstep.json`` (already upgraded to ``format_version``) against :data:`MODEL_CONFIG` and the rules
    between its fields; ``fields_of`` the ModelConfig dataclass (a field added there is known, type-checked),
    ``kinds``/``parameterizations``/``samplers`` the names this fewstep knows."""
    version = raw.get("format_version", format_version)
    if isinstance(version, int) and not isinstance(version, bool) and version > format_version:
        raise FewstepError(f"{where} was written by a newer fewstep (format_version {version}; this one reads up to "
                           f"{format_version}): upgrade fewstep (pip install -U fewstep) to load it")
    spec = {**spec_of_dataclass(fields_of, MODEL_CONFIG),
            "kind": dataclasses.replace(MODEL_CONFIG["kind"], choices=tuple(kinds)),
            "parameterization": dataclasses.replace(MODEL_CONFIG["parameterization"],
                                                    choices=tuple(parameterizations)),
            "default_sampler": dataclasses.replace(MODEL_CONFIG["default_sampler"], choices=tuple(samplers)),
            "format_version": dataclasses.replace(MODEL_CONFIG["format_version"], hi=format_version)}
    check_fields(raw, spec, where)
    lo_hi = raw.get("guidance_range") or []
    if len(lo_hi) == 1 or len(lo_hi) == 2 and lo_hi[0] > lo_hi[1]:
        raise field_error(where, "guidance_range", lo_hi, MODEL_CONFIG["guidance_range"],
                          "not a range [min, max] with min <= max")
    for key, grid in (raw.get("sampling_sigmas") or {}).items():
        name = f"sampling_sigmas[{key!r}]"
        if not re.fullmatch(r"[1-9][0-9]{0,3}", str(key)) or int(key) > STEPS:
            raise FewstepError(f"{where}: sampling_sigmas has the key {key!r}; its keys are step counts 1 to "
                               f"{STEPS} (\"2\": [80, 0.8, 0]) — {FIX}")
        if len(grid) != int(key) + 1 or grid[-1] != 0 or any(a <= b for a, b in zip(grid, grid[1:])):
            raise FewstepError(f"{where}: {name} is {show_value(grid)}; the grid of {key} step(s) must be {int(key) + 1} "
                               f"noise levels, strictly decreasing, ending in 0 — {FIX}")


def check_schedule(cls: type, raw: Any, where: str | Path, space: str) -> None:
    """``fewstep.json``'s ``schedule`` against the spec of its schedule class (:data:`SCHEDULES`, by class name
    up its bases) and the rules between the fields (σmin < σmax, β_start < β_end, …)."""
    if not isinstance(raw, dict):
        raise field_error(where, "schedule", raw, MODEL_CONFIG["schedule"])
    known: dict[str, Field] = {}
    for base in reversed(cls.__mro__):
        known.update(SCHEDULES.get(base.__name__, {}))
    spec = spec_of_dataclass(cls, known)
    check_fields(raw, spec, where, prefix="schedule.")
    values = {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.default is not dataclasses.MISSING}
    values.update(raw)
    for rule in SCHEDULE_RULES:
        message = rule(values)
        if message:
            raise FewstepError(f"{where}: the {space} schedule's {message} — {FIX}")


SIGMA = dict(lo=0.0, hi=1e5, lo_open=True)
SCHEDULES: dict[str, dict[str, Field]] = {
    "EDMSchedule": {
        "sigma_min": Field("number", "the smallest noise level σmin", **SIGMA),
        "sigma_max": Field("number", "the largest noise level σmax", **SIGMA),
        "rho": Field("number", "ρ of the Karras step grid", 0.0, 100.0, lo_open=True),
        "sigma_data": Field("number", "the data's standard deviation σ_data", **SIGMA),
        "p_mean": Field("number", "the mean of training ln σ", -20.0, 20.0),
        "p_std": Field("number", "the spread of training ln σ", 0.0, 20.0, lo_open=True),
    },
    "TrigFlowSchedule": {
        "intermediate_t": Field("number", "the middle time of TrigFlow's 2-step grid", 0.0, math.pi / 2,
                                lo_open=True, hi_open=True),
    },
    "VPSchedule": {
        "beta_schedule": Field("str", "how β grows over the timesteps",
                               choices=("linear", "scaled_linear", "squaredcos_cap_v2")),
        "num_train_timesteps": Field("int", "the training timesteps T", 2, TIMESTEPS),
        "beta_start": Field("number", "the first β", 0.0, 1.0, lo_open=True, hi_open=True),
        "beta_end": Field("number", "the last β", 0.0, 1.0, lo_open=True, hi_open=True),
    },
    "FlowSchedule": {
        "shift": Field("number", "the time shift of the flow grid", 0.0, 1000.0, lo_open=True),
        "num_train_timesteps": Field("int", "the training timesteps T", 2, TIMESTEPS),
        "logit_mean": Field("number", "the mean of the training times' logit", -20.0, 20.0),
        "logit_std": Field("number", "the spread of the training times' logit", 0.0, 20.0, lo_open=True),
        "t_max": Field("number", "the largest flow time", 0.0, 1.0, lo_open=True, hi_open=True),
        "base_grid": Field("str", "the unshifted sampling times", choices=("scheduler", "flux")),
    },
}


def _sigma_order(v: Mapping[str, Any]) -> str | None:
    lo, hi = v.get("sigma_min"), v.get("sigma_max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and not lo < hi:
        return (f"sigma_min {lo:g} is not below sigma_max {hi:g}: the noise levels run from σmin up to σmax, "
                f"so σmin < σmax (EDM: 0.002 and 80)")
    return None


def _beta_order(v: Mapping[str, Any]) -> str | None:
    lo, hi = v.get("beta_start"), v.get("beta_end")
    if v.get("beta_schedule") in ("linear", "scaled_linear") and isinstance(lo, (int, float)) \
            and isinstance(hi, (int, float)) and not lo < hi:
        return (f"beta_start {lo:g} is not below beta_end {hi:g}: β grows over the timesteps (Stable Diffusion: "
                f"0.00085 to 0.012)")
    return None


SCHEDULE_RULES: list[Callable[[Mapping[str, Any]], str | None]] = [_sigma_order, _beta_order]


# --- a pipeline part's config.json / scheduler_config.json (diffusers, transformers) -----------------
def _counts(meaning: str, hi: int, lo: int = 1, null: bool = False, nested: bool = False) -> Field:
    """An integer or a list of integers (per block) in [lo, hi]."""
    item = Field("int", lo=lo, hi=hi)
    if nested:
        item = Field("int|list", lo=lo, hi=hi, items=Field("int", lo=lo, hi=hi), length=(0, 256))
    return Field("int|list", meaning, lo, hi, items=item, length=(1, 64), null=null)


WIDTH = 65_536                       # channels, hidden sizes: SD's widest is 1280, FLUX's 3072, T5-XXL's 4096
PART_CONFIG: dict[str, Field] = {
    # diffusers models: UNet2DModel, UNet2DConditionModel, AutoencoderKL/Tiny, FLUX/SD3 transformers
    "in_channels": Field("int", "input channels", 1, 4096),
    "out_channels": Field("int|list", "output channels", 1, 4096, items=Field("int", lo=1, hi=4096), null=True),
    "latent_channels": Field("int", "latent channels", 1, 4096),
    "sample_size": Field("int|list", "the trained image or latent side", 1, 16384,
                         items=Field("int", lo=1, hi=16384), length=(1, 2), null=True),
    "layers_per_block": _counts("layers in each block, 2 in Stable Diffusion", 32),
    "block_out_channels": Field("list", "the width of each resolution", items=Field("int", lo=1, hi=WIDTH),
                                length=(1, 16)),
    "norm_num_groups": Field("int", "group-norm groups", 1, WIDTH, null=True),
    "attention_head_dim": _counts("attention head width", WIDTH, null=True),
    "num_attention_heads": _counts("attention heads", 4096, null=True),
    "cross_attention_dim": _counts("the text embedding width", WIDTH * 4, null=True),
    "transformer_layers_per_block": _counts("transformer layers per block, 1, 2 and 10 in SDXL", 256, nested=True),
    "time_cond_proj_dim": Field("int", "the guidance embedding width", 1, WIDTH, null=True),
    "num_class_embeds": Field("int", "class embeddings", 1, 10**6, null=True),
    "scaling_factor": Field("number", "the latents' scaling factor, 0.18215 in Stable Diffusion", 0.0, 1e4, lo_open=True),
    "shift_factor": Field("number", "the latents' shift", -1e4, 1e4, null=True),
    "latents_mean": Field("list", "per-channel latent means", items=Field("number"), null=True),
    "latents_std": Field("list", "per-channel latent spreads", items=Field("number", lo=0.0, lo_open=True),
                         null=True),
    "num_layers": Field("int", "transformer layers", 1, 1024),
    "num_single_layers": Field("int", "single-stream transformer layers", 0, 1024),
    "patch_size": Field("int", "the patch side", 1, 1024, null=True),
    "joint_attention_dim": Field("int", "the text embedding width", 1, WIDTH * 4),
    "pooled_projection_dim": Field("int", "the pooled text embedding width", 1, WIDTH * 4),
    "encoder_block_out_channels": Field("list", "a tiny VAE's encoder widths", items=Field("int", lo=1, hi=WIDTH),
                                        length=(1, 16)),
    "decoder_block_out_channels": Field("list", "a tiny VAE's decoder widths", items=Field("int", lo=1, hi=WIDTH),
                                        length=(1, 16)),
    "num_encoder_blocks": Field("list", "a tiny VAE's encoder blocks", items=Field("int", lo=0, hi=32), length=(1, 16)),
    "num_decoder_blocks": Field("list", "a tiny VAE's decoder blocks", items=Field("int", lo=0, hi=32), length=(1, 16)),
    "latent_magnitude": Field("number", "a tiny VAE's latent range", 0.0, 1e4, lo_open=True),
    "latent_shift": Field("number", "a tiny VAE's latent shift", -1e4, 1e4),
    # transformers text encoders (CLIP, T5)
    "hidden_size": Field("int", "the hidden width", 1, WIDTH),
    "intermediate_size": Field("int", "the MLP width", 1, WIDTH * 4),
    "num_hidden_layers": Field("int", "transformer layers", 1, 1024),
    "max_position_embeddings": Field("int", "the longest token sequence", 1, 1 << 20),
    "vocab_size": Field("int", "the vocabulary size", 1, 10**7),
    "projection_dim": Field("int", "the projection width", 1, WIDTH),
    "d_model": Field("int", "the hidden width", 1, WIDTH),
    "d_ff": Field("int", "the MLP width", 1, WIDTH * 4),
    "num_heads": Field("int", "attention heads", 1, 4096),
    # diffusers schedulers
    "num_train_timesteps": Field("int", "the training timesteps T, 1000 in Stable Diffusion", 2, TIMESTEPS,
                                 null=True),     # (UNet2DModel's config holds it too, as null)
    "beta_start": Field("number", "the first β, 0.00085 in Stable Diffusion", 0.0, 1.0, lo_open=True, hi_open=True),
    "beta_end": Field("number", "the last β, 0.012 in Stable Diffusion", 0.0, 1.0, lo_open=True, hi_open=True),
    "beta_schedule": Field("str", "how β grows", choices=("linear", "scaled_linear", "squaredcos_cap_v2")),
    "prediction_type": Field("str", "what the network predicts",
                             choices=("epsilon", "v_prediction", "sample", "flow_prediction")),
    "timestep_spacing": Field("str", "how sampling timesteps are spaced", choices=("leading", "trailing",
                                                                                    "linspace")),
    "steps_offset": Field("int", "the timestep offset", 0, TIMESTEPS),
    "original_inference_steps": Field("int", "an LCM's skipped timestep grid, 50 in LCM", 1, TIMESTEPS),
    "timestep_scaling": Field("number", "LCM's timestep scaling, 10 in LCM", 0.0, 1e6, lo_open=True),
    "shift": Field("number", "the flow time shift", 0.0, 1000.0, lo_open=True),
    "trained_betas": Field("list", "explicit βs", null=True, items=Field("number", lo=0.0, hi=1.0)),
}


def check_part_config(raw: Mapping[str, Any], where: str | Path) -> None:
    """A diffusers or transformers ``config.json`` / ``scheduler_config.json`` of a pipeline part: every field of
    :data:`PART_CONFIG` it holds in bounds (a typo such as ``layers_per_block`` 100000 would otherwise build for
    minutes before the weights fail to fit), and the rules between them; other keys are diffusers' business."""
    fix = "correct the config, or re-save the pipeline with diffusers or fewstep"
    check_fields(raw, PART_CONFIG, where, unknown="ignore", fix=fix)
    message = _beta_order(raw)
    if message:
        raise FewstepError(f"{where}: {message} — {fix}")
    steps, total = raw.get("original_inference_steps"), raw.get("num_train_timesteps", 1000)
    if isinstance(steps, int) and isinstance(total, int) and steps > total:
        raise FewstepError(f"{where}: original_inference_steps {steps} is more than num_train_timesteps {total}: an "
                           f"LCM's grid skips along the training timesteps (LCM: 50 of 1000) — {fix}")
    if raw.get("trained_betas") is not None:
        raise FewstepError(f"{where}: trained_betas is set; fewstep builds the schedule from beta_schedule, "
                           f"beta_start and beta_end and would ignore it — set it to null if those describe the "
                           f"same schedule")


# --- a LoRA's record --------------------------------------------------------------------------------
LORA_WEIGHT = Field("number", "a LoRA weight λ, in ComfyUI's range", -100.0, 100.0)
LORA_INFO: dict[str, Field] = {
    "kind": Field("str", "what the adapter is", choices=("lcm-lora", "tcd-lora", "style", "lora", "lora-set")),
    "base": Field("str", "the model it was made for"),
    "dataset": Field("str", "the data it was trained on"),
    "rank": Field("int", "the adapters' rank", 1, 65536),
    "alpha": Field("number", "the adapters' α, scaling them by α/rank", 0.0, 1e6, lo_open=True),
    "format": Field("str", "its key layout"),
    "original_inference_steps": Field("int", "the skipped timestep grid an LCM-LoRA samples on, 50 in LCM", 1, 1000),
    "guidance_range": Field("list", "the guidance scales [min, max] it learned", items=GUIDANCE, length=(2, 2)),
    "trainable_parameters": Field("int", "its parameter count", 0),
    "base_parameters": Field("int", "its base's parameter count", 0),
    "training": Field("dict", "how it was trained"),
    "loras": Field("list", "a set's members", items=Field("dict"), length=(1, 1000)),
    "command": Field("str", "the command that wrote it"),
}
LORA_SET_ENTRY: dict[str, Field] = {
    "path": Field("str", "the member's path inside the set"),
    "weight": LORA_WEIGHT,
    "kind": Field("str", "what the member is", choices=("lcm-lora", "tcd-lora", "style", "lora")),
    "source": Field("str", "where the member came from"),
    "original_inference_steps": LORA_INFO["original_inference_steps"],
}


def check_lora_info(raw: Mapping[str, Any], where: str | Path) -> Mapping[str, Any]:
    """A LoRA folder's ``fewstep.json`` (or a LoRA file's fewstep metadata) against :data:`LORA_INFO`; a set's
    members against :data:`LORA_SET_ENTRY` (each a relative path inside the set). Returns ``raw``."""
    fix = "correct the file, or re-save the LoRA with fewstep"
    kind = raw.get("kind")
    if kind in ("diffusion", "consistency") or "schedule" in raw or "class_names" in raw:
        raise FewstepError(f"{where} describes a model, not a LoRA; give --lora a LoRA folder (e.g. "
                           f"models/emoji-lcm-lora) or file")
    if kind == "tiny-vae":
        raise FewstepError(f"{where} describes a tiny VAE (for --tiny-vae), not a LoRA")
    check_fields(raw, LORA_INFO, where, fix=fix)
    lo_hi = raw.get("guidance_range")
    if lo_hi and lo_hi[0] > lo_hi[1]:
        raise field_error(where, "guidance_range", lo_hi, LORA_INFO["guidance_range"],
                          "not a range [min, max] with min <= max", fix)
    for i, entry in enumerate(raw.get("loras") or []):
        check_fields(entry, LORA_SET_ENTRY, where, prefix=f"loras[{i}].", fix=fix)
        path = entry.get("path")
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
            raise FewstepError(f"{where}: loras[{i}].path {show_value(path)} is not a path inside the set's folder; a "
                               f"set names its members relative to itself — {fix}")
    return raw


# --- a training run's files -------------------------------------------------------------------------
CHECKPOINT_STATE: dict[str, Field] = {
    "step": Field("int", "the optimizer steps done", 0, 10**12),
    "elapsed_seconds": Field("number", "the training time so far", 0.0),
    "config": Field("dict", "the run's settings"),
    "ema": Field("dict", "the weight EMA's state", null=True),
    "partial": Field("bool", "whether only the trained entries are saved"),
    "optimizer_param_groups": Field("list", "the optimizer's settings", items=Field("dict")),
    "optimizer_values": Field("dict", "the optimizer's scalar state"),
}


def check_checkpoint_state(state: Mapping[str, Any], where: str | Path, step: int | None = None) -> None:
    """A checkpoint's ``state.json``: the fields :data:`CHECKPOINT_STATE` names typed and in bounds, ``step`` the
    one its folder is named after (``step-0000100``: 100). Other keys are passed over (the training loop's to
    add)."""
    fix = "delete this checkpoint folder to resume from an earlier one"
    for key in ("step", "config", "optimizer_param_groups"):
        if key not in state:
            raise FewstepError(f"{where}: no {key!r}; not a state.json fewstep wrote — {fix}")
    check_fields(state, CHECKPOINT_STATE, where, unknown="ignore", fix=fix)
    if step is not None and state["step"] != step:
        raise FewstepError(f"{where}: step is {show_value(state['step'])} but the folder is the checkpoint of step "
                           f"{step} — {fix}")


METRICS_RECORD = Field("int", "the step a record was logged at", 0, 10**12)


def metrics_records(path: str | Path) -> list[tuple[str, int]]:
    """The lines of a run's ``metrics.jsonl`` with their steps; a line that is not a JSON object with an integer
    "step" is one error naming the line (a log fewstep wrote holds none)."""
    out = []
    fix = "delete that line (or the file) to resume"
    try:
        lines = text_lines(path, "metrics log", max_bytes=1 << 30)
    except FewstepError as e:
        raise FewstepError(f"{e}; or delete it to resume (it is only the log)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = parse_json(line, where, "one JSON object per line")
        except FewstepError as e:
            raise FewstepError(f"{e} — {fix}") from None
        step = record.get("step") if isinstance(record, dict) else None
        if problem(step, METRICS_RECORD) is not None:
            raise FewstepError(f"{where} is not a record fewstep wrote (a JSON object with an integer \"step\") — {fix}")
        out.append((line, int(step)))
    return out
