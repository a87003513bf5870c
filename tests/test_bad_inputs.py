"""Every bad input is one line (issue 31 items 1 and 5): a table of one row per bad file or flag — the command,
the mutation of a file it reads, the fragments the one line must hold (the field or flag, the bound) — run
in-process; each must exit 2 with one line on stderr and no traceback, and write nothing.

The files are the shipped models' (emoji-sd, emoji-lcm, emoji-lcm-lora) linked into a scratch folder with their
JSON copied, or a tiny pixel model: each row changes one config field, one safetensors header entry or one
weight, or a checkpoint's state.json / metrics.jsonl, or passes one out-of-range flag. The rules themselves live
in ``fewstep.io.validate`` (file specs), ``fewstep.io.weights`` (headers, finiteness), ``fewstep.io.budget``
(memory estimates) and ``fewstep.cli.args`` (flag bounds)."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, save_pixel_model, tiny_unet

from fewstep.core.schedules import EDMSchedule
from fewstep.models.config import ModelConfig
from fewstep.models.folders import shipped_models_dir

MODELS = shipped_models_dir()
DEEP = "[" * 100_000 + "]" * 100_000
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


# --- making the bad files ---------------------------------------------------------------------------------
def link_model(src: Path, dst: Path) -> Path:
    """``src`` rebuilt at ``dst``: JSON files copied (the rows change them), everything else symlinked."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".json":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    return dst


def set_json(rel: str, change):
    """A mutation: the JSON file ``rel`` with ``change(raw)`` applied (a dict update; or a function returning
    the new file's text)."""
    def apply(folder: Path) -> None:
        path = folder / rel
        raw = json.loads(path.read_text())
        if callable(change):
            text = change(raw)
            path.write_text(text if isinstance(text, str) else json.dumps(raw))
        else:
            raw.update(change)
            path.write_text(json.dumps(raw))
    return apply


def set_schedule(**fields):
    return set_json("fewstep.json", lambda raw: raw["schedule"].update(fields))


def raw_json(rel: str, text: str):
    """A mutation: the file ``rel`` replaced by ``text`` (invalid JSON, Infinity, deep nesting)."""
    def apply(folder: Path) -> None:
        (folder / rel).write_text(text)
    return apply


def with_value(rel: str, key: str, literal: str):
    """A mutation: ``key`` set to a JSON literal Python's json writes only this way (Infinity, NaN)."""
    def apply(folder: Path) -> None:
        raw = json.loads((folder / rel).read_text())
        raw[key] = "@@"
        (folder / rel).write_text(json.dumps(raw).replace('"@@"', literal))
    return apply


def safetensors_edit(rel: str, change):
    """A mutation of a safetensors file: ``change(header, body)`` on its first 2-D+ float32 tensor's entry."""
    def apply(folder: Path) -> None:
        path = folder / rel
        data = path.resolve().read_bytes()
        path.unlink()
        n = struct.unpack("<Q", data[:8])[0]
        header, body = json.loads(data[8:8 + n]), bytearray(data[8 + n:])
        name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) > 1)
        change(header[name], body)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(body))
    return apply


def relabel(dtype: str, factor: int = 1):
    """The tensor's bytes relabelled as ``dtype`` (its last dimension × ``factor`` so the byte count still fits)."""
    def change(entry, body):
        entry["dtype"] = dtype
        entry["shape"][-1] *= factor
    return change


def put(value: float):
    def change(entry, body):
        start = entry["data_offsets"][0]
        body[start:start + 4] = np.array([value], np.float32).tobytes()
    return change


def header_length(rel: str, n: int):
    def apply(folder: Path) -> None:
        path = folder / rel
        data = path.resolve().read_bytes()
        path.unlink()
        path.write_bytes(struct.pack("<Q", n) + data[8:])
    return apply


def write_file(name: str, data: bytes | str):
    def apply(folder: Path) -> None:
        path = folder / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return apply


def write_tar(name: str, members: list[tuple[str, bytes]]):
    """A mutation: a webdataset shard ``name`` holding ``members`` (name, bytes)."""
    def apply(folder: Path) -> None:
        import io
        import tarfile

        with tarfile.open(folder / name, "w") as tar:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return apply


# --- the table ------------------------------------------------------------------------------------------
# (id, base, mutation, argv, fragments): base names the folder a row starts from ("pixel": a tiny pixel model;
# "sd", "lcm", "lora", "tiny": the shipped emoji-sd, emoji-lcm, emoji-lcm-lora, emoji-tiny-vae; "run": a work
# folder holding a 1-step checkpoint; None: an empty folder, a flag only). In argv, {m} is the row's folder, {out}
# its output folder ({png}: file), {sd}, {lcm}, {lora} and {pixel} the unchanged starting folders.
SAMPLE = ["sample", "--model", "{m}", "--steps", "1", "--num", "1", "--out", "{png}"]
SD = ["sample", "--model", "{m}", "--steps", "2", "--num", "1", "--out", "{png}"]
ON_SD = ["sample", "--model", "{sd}", "--lora", "{m}", "--steps", "2", "--num", "1", "--out", "{png}"]
RESUME = ["train", "--method", "ct", "--steps", "1", "--batch", "8", "--width", "8", "--checkpoint-every", "1",
          "--no-progress", "--work-dir", "{m}", "--out", "{out}"]
U, V, S, F = "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "fewstep.json"

ROWS = [
    # fewstep.json of a pixel model: schedule, grids, sizes, types, structure
    ("sigma_min negative", "pixel", set_schedule(sigma_min=-1.0), SAMPLE, ["schedule.sigma_min", "(0,"]),
    ("sigma_min above sigma_max", "pixel", set_schedule(sigma_min=100.0), SAMPLE, ["sigma_min 100", "sigma_max 80"]),
    ("rho zero", "pixel", set_schedule(rho=0.0), SAMPLE, ["schedule.rho", "(0, 100]"]),
    ("sigma_data zero", "pixel", set_schedule(sigma_data=0.0), SAMPLE, ["schedule.sigma_data"]),
    ("schedule string for a number", "pixel", set_schedule(sigma_max="80"), SAMPLE, ["schedule.sigma_max", "a string"]),
    ("schedule unknown key", "pixel", set_schedule(sigmamax=80.0), SAMPLE, ["'schedule.sigmamax'", "sigma_max"]),
    ("schedule a list", "pixel", set_json(F, {"schedule": [1, 2]}), SAMPLE, ["schedule", "an array", "an object"]),
    ("sampling_sigmas increasing", "pixel", set_json(F, {"sampling_sigmas": {"2": [0.5, 80.0, 0.0]}}), SAMPLE,
     ["sampling_sigmas['2']", "strictly decreasing"]),
    ("sampling_sigmas negative", "pixel", set_json(F, {"sampling_sigmas": {"2": [80.0, -1.0, 0.0]}}), SAMPLE,
     ["sampling_sigmas['2'][1]", "too small"]),
    ("sampling_sigmas key", "pixel", set_json(F, {"sampling_sigmas": {"two": [80.0, 1.0, 0.0]}}), SAMPLE,
     ["sampling_sigmas", "'two'", "step counts"]),
    ("default_steps 1e9", "pixel", set_json(F, {"default_steps": 10**9}), SAMPLE, ["default_steps", "[1, 1,000]"]),
    ("default_steps 0", "pixel", set_json(F, {"default_steps": 0}), SAMPLE, ["default_steps", "too small"]),
    ("default_steps a string", "pixel", set_json(F, {"default_steps": "4"}), SAMPLE, ["default_steps", "a string"]),
    ("default_steps a boolean", "pixel", set_json(F, {"default_steps": True}), SAMPLE, ["default_steps", "a boolean"]),
    ("image_size lying 30000", "pixel", set_json(F, {"image_size": 30000}), SAMPLE, ["image_size", "16,384"]),
    ("image_size disagreeing with the UNet", "pixel", set_json(F, {"image_size": 16}), SAMPLE,
     ["image_size is 16", "sample_size is 8"]),
    ("image_size negative", "pixel", set_json(F, {"image_size": -1}), SAMPLE, ["image_size", "too small"]),
    ("channels 0", "pixel", set_json(F, {"channels": 0}), SAMPLE, ["channels", "[1, 64]"]),
    ("channels disagreeing with the UNet", "pixel", set_json(F, {"channels": 3}), SAMPLE,
     ["channels is 3", "in_channels is 1"]),
    ("class_names empty on a conditional UNet", "pixel", set_json(F, {"class_names": []}), SAMPLE,
     ["class_names is empty", "num_class_embeds"]),
    ("class_names an object", "pixel", set_json(F, {"class_names": {"a": 1}}), SAMPLE, ["class_names", "a list"]),
    ("class_names of numbers", "pixel", set_json(F, {"class_names": [1, 2, 3]}), SAMPLE, ["class_names[0]"]),
    ("unknown key", "pixel", set_json(F, {"defualt_steps": 4}), SAMPLE, ["'defualt_steps'", "did you mean"]),
    ("deep nesting", "pixel", set_json(F, lambda raw: json.dumps(raw)[:-1] + ', "training": ' + DEEP + "}"), SAMPLE,
     ["fewstep.json", "nested more than"]),
    ("top level a list", "pixel", set_json(F, lambda raw: json.dumps([raw])), SAMPLE, ["fewstep.json", "a JSON array"]),
    ("not JSON", "pixel", raw_json(F, "{not json"), SAMPLE, ["fewstep.json", "not valid JSON"]),
    ("embedding_dim 0", "pixel", set_json(F, {"embedding_dim": 0}), SAMPLE, ["embedding_dim", "too small"]),
    ("default guidance negative", "pixel", set_json(F, {"default_guidance_scale": -5.0}), SAMPLE,
     ["default_guidance_scale", "[0, 100]"]),
    ("default guidance 1e9", "pixel", set_json(F, {"default_guidance_scale": 1e9}), SAMPLE,
     ["default_guidance_scale", "too large"]),
    ("timestep_scaling inf", "pixel", with_value(F, "timestep_scaling", "Infinity"), SAMPLE,
     ["timestep_scaling", "not finite"]),
    ("guidance_range inverted", "pixel", set_json(F, {"guidance_range": [4.0, 1.0]}), SAMPLE,
     ["guidance_range", "min <= max"]),
    ("guidance_range of three", "pixel", set_json(F, {"guidance_range": [1.0, 2.0, 3.0]}), SAMPLE,
     ["guidance_range", "3 items"]),
    ("serves_steps 0", "pixel", set_json(F, {"serves_steps": [0]}), SAMPLE, ["serves_steps[0]", "too small"]),
    ("original_inference_steps 0", "pixel", set_json(F, {"original_inference_steps": 0}), SAMPLE,
     ["original_inference_steps", "too small"]),
    ("format_version from the future", "pixel", set_json(F, {"format_version": 99}), SAMPLE,
     ["newer fewstep", "format_version 99"]),
    ("unknown sampler", "pixel", set_json(F, {"default_sampler": "plms"}), SAMPLE, ["default_sampler", "one of"]),
    ("unknown prediction_type", "pixel", set_json(F, {"prediction_type": "x0"}), SAMPLE, ["prediction_type"]),
    ("kind a number", "pixel", set_json(F, {"kind": 3}), SAMPLE, ["kind", "a number"]),
    ("loras not objects", "pixel", set_json(F, {"loras": [1]}), SAMPLE, ["loras[0]", "an object"]),
    # a pixel model's unet/config.json and weights
    ("unet layers_per_block 100000", "pixel", set_json(U, {"layers_per_block": 100000}), SAMPLE,
     ["layers_per_block", "32"]),
    ("unet block_out_channels a string", "pixel", set_json(U, {"block_out_channels": "abc"}), SAMPLE,
     ["block_out_channels", "a string"]),
    ("unet config a list", "pixel", set_json(U, lambda raw: json.dumps([raw])), SAMPLE, ["unet/config.json", "a JSON array"]),
    ("unet weights relabelled int32", "pixel", safetensors_edit(UNET_WEIGHTS, relabel("I32")), SAMPLE,
     ["stored as I32", "floating point"]),
    ("unet weights stored as int8", "pixel", safetensors_edit(UNET_WEIGHTS, relabel("I8", 4)), SAMPLE,
     ["stored as I8"]),
    ("unet weight +inf", "pixel", safetensors_edit(UNET_WEIGHTS, put(np.inf)), SAMPLE, ["holds inf"]),
    ("unet weight NaN", "pixel", safetensors_edit(UNET_WEIGHTS, put(np.nan)), SAMPLE, ["holds NaN"]),
    ("unet weight 3e38", "pixel", safetensors_edit(UNET_WEIGHTS, put(3e38)), SAMPLE, ["3e+38"]),
    ("unet header length past the file", "pixel", header_length(UNET_WEIGHTS, 10**12), SAMPLE,
     ["header length", "does not fit"]),
    ("unet tensor offsets past the file", "pixel",
     safetensors_edit(UNET_WEIGHTS, lambda entry, body: entry["data_offsets"].__setitem__(1, 10**12)), SAMPLE,
     ["spans bytes", "corrupt"]),
    # a pipeline's configs (the shipped emoji-sd and emoji-lcm)
    ("sd unet layers_per_block 100000", "sd", set_json(U, {"layers_per_block": 100000}), SD, ["layers_per_block"]),
    ("sd unet sample_size 0", "sd", set_json(U, {"sample_size": 0}), SD, ["sample_size", "too small"]),
    ("sd unet deep nesting", "sd", set_json(U, lambda raw: json.dumps(raw)[:-1] + ', "x": ' + DEEP + "}"), SD,
     ["unet/config.json", "nested"]),
    ("sd vae scaling_factor inf", "sd", with_value(V, "scaling_factor", "Infinity"), SD,
     ["scaling_factor", "not finite"]),
    ("sd vae scaling_factor 0", "sd", set_json(V, {"scaling_factor": 0.0}), SD, ["scaling_factor", "(0,"]),
    ("sd vae sample_size 30000", "sd", set_json(V, {"sample_size": 30000}), SD, ["vae/config.json", "sample_size"]),
    ("sd vae shift_factor NaN", "sd", with_value(V, "shift_factor", "NaN"), SD, ["shift_factor", "not finite"]),
    ("sd text encoder 100000 layers", "sd", set_json("text_encoder/config.json", {"num_hidden_layers": 100000}), SD,
     ["num_hidden_layers", "1,024"]),
    ("sd text encoder width a string", "sd", set_json("text_encoder/config.json", {"hidden_size": "64"}), SD,
     ["hidden_size", "a string"]),
    ("scheduler num_train_timesteps 1e10", "sd", set_json(S, {"num_train_timesteps": 10**10}), SD,
     ["num_train_timesteps", "100,000"]),
    ("scheduler num_train_timesteps a string", "sd", set_json(S, {"num_train_timesteps": "1000"}), SD,
     ["num_train_timesteps", "a string"]),
    ("scheduler beta_start negative", "sd", set_json(S, {"beta_start": -1.0}), SD, ["beta_start", "(0, 1)"]),
    ("scheduler betas inverted", "sd", set_json(S, {"beta_start": 0.5, "beta_end": 0.01}), SD,
     ["beta_start 0.5", "beta_end 0.01"]),
    ("scheduler unknown beta_schedule", "sd", set_json(S, {"beta_schedule": "cosine"}), SD, ["beta_schedule", "one of"]),
    ("scheduler a list", "sd", set_json(S, lambda raw: json.dumps([raw])), SD, ["scheduler_config.json", "a JSON array"]),
    ("model_index deep nesting", "sd", raw_json("model_index.json", DEEP), SD, ["model_index.json", "nested"]),
    ("sd fewstep.json default_steps 1e9", "sd", set_json(F, {"default_steps": 10**9}),
     ["sample", "--model", "{m}", "--num", "1", "--out", "{png}"], ["default_steps", "1,000"]),
    ("sd unet weights relabelled int32", "sd", safetensors_edit(UNET_WEIGHTS, relabel("I32")), SD, ["stored as I32"]),
    ("sd vae weight +inf", "sd", safetensors_edit("vae/diffusion_pytorch_model.safetensors", put(np.inf)), SD,
     ["vae", "holds inf"]),
    ("sd text encoder weights int32", "sd", safetensors_edit("text_encoder/model.safetensors", relabel("I32")), SD,
     ["text_encoder", "stored as I32"]),
    ("lcm original_inference_steps 0", "lcm", set_json(S, {"original_inference_steps": 0}), SD,
     ["original_inference_steps", "too small"]),
    ("lcm original_inference_steps past the timesteps", "lcm", set_json(S, {"original_inference_steps": 5000}), SD,
     ["original_inference_steps 5000", "num_train_timesteps 1000"]),
    ("lcm timestep_scaling negative", "lcm", set_json(S, {"timestep_scaling": -1.0}), SD, ["timestep_scaling"]),
    # a LoRA folder's fewstep.json and weights
    ("lora json not JSON", "lora", raw_json(F, "{bad"), ON_SD, ["fewstep.json", "not valid JSON"]),
    ("lora json a list", "lora", set_json(F, lambda raw: json.dumps([raw])), ON_SD, ["fewstep.json", "a JSON array"]),
    ("lora json deep nesting", "lora", raw_json(F, DEEP), ON_SD, ["fewstep.json", "nested"]),
    ("lora kind unknown", "lora", set_json(F, {"kind": "turbo"}), ON_SD, ["kind", "lcm-lora"]),
    ("lora original_inference_steps 0", "lora", set_json(F, {"original_inference_steps": 0}), ON_SD,
     ["original_inference_steps", "too small"]),
    ("lora original_inference_steps a string", "lora", set_json(F, {"original_inference_steps": "abc"}), ON_SD,
     ["original_inference_steps", "a string"]),
    ("lora rank a string", "lora", set_json(F, {"rank": "x"}), ON_SD, ["rank", "a string"]),
    ("lora unknown key", "lora", set_json(F, {"strength": 1}), ON_SD, ["'strength'"]),
    ("lora guidance_range inverted", "lora", set_json(F, {"guidance_range": [4.0, 1.0]}), ON_SD, ["guidance_range"]),
    ("lora weights +inf", "lora", safetensors_edit(LORA_WEIGHTS, put(np.inf)), ON_SD, ["LoRA", "holds inf"]),
    ("lora weights relabelled int32", "lora", safetensors_edit(LORA_WEIGHTS, relabel("I32")), ON_SD, ["stored as I32"]),
    ("lora export of a weight +inf", "lora", safetensors_edit(LORA_WEIGHTS, put(np.inf)),
     ["lora", "export", "{m}", "--format", "kohya", "--out", "{out}.safetensors"], ["holds inf"]),
    # a tiny VAE folder (--tiny-vae)
    ("tiny VAE scaling_factor inf", "tiny", with_value("config.json", "scaling_factor", "Infinity"),
     ["sample", "--model", "{sd}", "--tiny-vae", "{m}", "--steps", "2", "--num", "1", "--out", "{png}"],
     ["scaling_factor", "not finite"]),
    ("tiny VAE weights relabelled int8", "tiny",
     safetensors_edit("diffusion_pytorch_model.safetensors", relabel("I8", 4)),
     ["sample", "--model", "{sd}", "--tiny-vae", "{m}", "--steps", "2", "--num", "1", "--out", "{png}"],
     ["tiny VAE weights", "stored as I8"]),
    ("lora weight 1e30", None, None, ["sample", "--model", "{sd}", "--lora", "{lora}:1e30", "--out", "{png}"],
     ["LoRA weight 1e30", "[-100, 100]"]),
    ("a model folder as a LoRA", None, None, ["sample", "--model", "{sd}", "--lora", "{sd}", "--out", "{png}"],
     ["describes a model, not a LoRA"]),
    # a checkpoint's state.json and the run's metrics.jsonl, on resume
    ("state.json step a string", "run", set_json("checkpoints/step-0000001/state.json", {"step": "abc"}), RESUME,
     ["state.json", "step", "a string"]),
    ("state.json step negative", "run", set_json("checkpoints/step-0000001/state.json", {"step": -5}), RESUME,
     ["step", "too small"]),
    ("state.json step not its folder's", "run", set_json("checkpoints/step-0000001/state.json", {"step": 10**9}),
     RESUME, ["checkpoint of step 1"]),
    ("state.json elapsed a string", "run", set_json("checkpoints/step-0000001/state.json", {"elapsed_seconds": "x"}),
     RESUME, ["elapsed_seconds"]),
    ("state.json ema a string", "run", set_json("checkpoints/step-0000001/state.json", {"ema": "x"}), RESUME, ["ema"]),
    ("state.json optimizer groups of numbers", "run",
     set_json("checkpoints/step-0000001/state.json", {"optimizer_param_groups": [1]}), RESUME,
     ["optimizer_param_groups[0]"]),
    ("state.json deep nesting", "run", raw_json("checkpoints/step-0000001/state.json", DEEP), RESUME,
     ["state.json", "nested"]),
    ("metrics.jsonl garbage", "run", write_file("metrics.jsonl", "garbage\n"), RESUME, ["metrics.jsonl line 1"]),
    ("metrics.jsonl a step string", "run", write_file("metrics.jsonl", '{"step": "x"}\n'), RESUME,
     ["metrics.jsonl line 1", "integer \"step\""]),
    ("metrics.jsonl not UTF-8", "run", write_file("metrics.jsonl", b"\xff\xfe\x00x\n"), RESUME,
     ["metrics.jsonl", "not UTF-8"]),
    # numeric flags: bounds, memory estimates before allocating, work caps
    ("--batch 1e12", None, None, ["train-teacher", "--out", "{out}", "--steps", "1", "--batch", str(10**12)],
     ["--batch", "needs at least", "is free"]),
    ("--image-size 100000", None, None,
     ["train-teacher", "--out", "{out}", "--steps", "1", "--batch", "2", "--image-size", "100000"],
     ["100000×100000", "needs at least", "--image-size"]),
    ("train-classifier --image-size 100000", None, None,
     ["train-classifier", "--out", "{out}", "--image-size", "100000", "--epochs", "1"], ["needs at least"]),
    ("--width 1e6", None, None, ["train-teacher", "--out", "{out}", "--steps", "1", "--width", "1000000"],
     ["--width", "at most 2,048"]),
    ("--grad-accum 1e12", None, None, ["train", "--method", "ct", "--out", "{out}", "--grad-accum", str(10**12)],
     ["--grad-accum", "1,024"]),
    ("--num-scales 1e9", None, None, ["train", "--method", "ct", "--out", "{out}", "--num-scales", str(10**9)],
     ["--num-scales", "10,000"]),
    ("--rank 1e7", None, None, ["train-lora", "--base", "{sd}", "--out", "{out}", "--rank", str(10**7)],
     ["--rank", "1,024"]),
    ("serve --queue 1e12", None, None, ["serve", "--model", "{sd}", "--queue", str(10**12)], ["--queue", "4,096"]),
    ("--lora-rank 1e7", None, None,
     ["distill", "--method", "lcm-lora", "--teacher", "{sd}", "--out", "{out}", "--lora-rank", str(10**7)],
     ["--lora-rank", "1,024"]),
    ("--mixed-precision fp16 on a CPU", None, None,
     ["train", "--method", "ct", "--out", "{out}", "--steps", "1", "--mixed-precision", "fp16"],
     ["--mixed-precision fp16", "CUDA"]),
    ("guided range inverted", None, None,
     ["distill", "--method", "guided", "--teacher", "{pixel}", "--out", "{out}", "--steps", "1",
      "--min-guidance-scale", "8", "--max-guidance-scale", "2"], ["guidance range 8..2"]),
    ("lcm-lora given a range", None, None,
     ["distill", "--method", "lcm-lora", "--teacher", "{sd}", "--out", "{out}", "--min-guidance-scale", "2",
      "--max-guidance-scale", "8"], ["no guidance-scale input", "one scale"]),
    ("--min-guidance-scale on cd", None, None,
     ["distill", "--method", "cd", "--teacher", "{pixel}", "--out", "{out}", "--min-guidance-scale", "2"],
     ["--min-guidance-scale does not apply to --method cd"]),
    ("--guidance-scale on lcd", None, None,
     ["distill", "--method", "lcd", "--teacher", "{sd}", "--out", "{out}", "--guidance-scale", "3"],
     ["--guidance-scale does not apply to --method lcd"]),
    ("--label 1e20", None, None, ["sample", "--model", "{pixel}", "--label", str(10**20), "--out", "{png}"],
     ["--label", "at most"]),
    ("--dtype on a pixel model", None, None, ["sample", "--model", "{pixel}", "--dtype", "fp16", "--out", "{png}"],
     ["--dtype fp16 applies to pipelines"]),
    ("--variant on a pixel model", None, None, ["sample", "--model", "{pixel}", "--variant", "fp16", "--out", "{png}"],
     ["--variant fp16 applies to pipelines"]),
    ("--rho on a VP pipeline", None, None, ["sample", "--model", "{sd}", "--rho", "3", "--out", "{png}"],
     ["--rho", "vp"]),
    ("--rho on an LCM", None, None, ["sample", "--model", "{lcm}", "--rho", "3", "--out", "{png}"],
     ["--rho", "own timestep grid"]),
    ("--rho with --sigmas", None, None, ["sample", "--model", "{pixel}", "--rho", "3", "--sigmas", "80,1", "--out",
                                         "{png}"], ["--rho", "--sigmas"]),
    ("--clamp-x0 on a latent model", None, None, ["sample", "--model", "{sd}", "--clamp-x0", "--out", "{png}"],
     ["--clamp-x0", "latents"]),
    ("--height/--width far past the model", None, None,
     ["sample", "--model", "{lcm}", "--height", "2048", "--width", "2048", "--out", "{png}"],
     ["4,096×", "--allow-large"]),
    ("--height 100000 --allow-large", None, None,
     ["sample", "--model", "{sd}", "--height", "100000", "--width", "100000", "--allow-large", "--out", "{png}"],
     ["100000×100000", "needs at least", "is free"]),
    ("--num 1e9 --allow-large", None, None,
     ["sample", "--model", "{pixel}", "--num", str(10**9), "--allow-large", "--out", "{png}"],
     ["needs at least", "--num"]),
    ("eval --steps 1000000", None, None, ["eval", "--model", "{pixel}", "--steps", "1000000"], ["--steps", "1,000"]),
    ("eval --num 1e9", None, None, ["eval", "--model", "{pixel}", "--num", str(10**9)], ["--num", "50,000"]),
    ("bench --num 1e9", None, None, ["bench", "--num", str(10**9)], ["--num", "50,000"]),
    ("demo --per-class 1e9", None, None, ["demo", "--per-class", str(10**9), "--out", "{out}"],
     ["--per-class", "1,000"]),
    ("a shard's caption of 2 MiB", None, write_tar("shard.tar", [("k.png", b"x"), ("k.txt", b"a" * (2 << 20))]),
     ["train-lora", "--base", "{sd}", "--dataset", "{m}/shard.tar", "--out", "{out}", "--steps", "1"],
     ["k.txt", "1,048,576", "caption"]),
    ("a shard of random bytes", None, write_file("random.tar", bytes(range(256)) * 64),
     ["train-lora", "--base", "{sd}", "--dataset", "{m}/random.tar", "--out", "{out}", "--steps", "1"],
     ["random.tar", "not a readable .tar"]),
    ("a shard's caption not UTF-8", None, write_tar("latin.tar", [("k.png", b"x"), ("k.txt", "café".encode("latin-1"))]),
     ["train-lora", "--base", "{sd}", "--dataset", "{m}/latin.tar", "--out", "{out}", "--steps", "1"],
     ["caption of k", "UTF-8"]),
    ("prompts file over 16 MiB", None, write_file("prompts.txt", "a grinning face\n" * 1_100_000),
     ["sample", "--model", "{sd}", "--prompts-file", "{m}/prompts.txt", "--out", "{png}"], ["prompts file", "16.0 MiB"]),
]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The starting folders of the rows: a tiny pixel model, and links to the shipped pipelines and LoRA."""
    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=8, channels=1, class_names=["a", "b", "c"],
                         dataset="digits")
    save_pixel_model(root / "pixel", tiny_unet(), config)
    for name, source in (("sd", "emoji-sd"), ("lcm", "emoji-lcm"), ("lora", "emoji-lcm-lora")):
        link_model(MODELS / source, root / name)
    return root


@pytest.fixture(scope="module")
def run_folder(place, capsys_module):
    """A work folder with the checkpoint of one training step (what RESUME rows resume from)."""
    work = place / "run"
    argv = [a.format(m=work, out=place / "run-model") for a in RESUME]
    code, _, err = capsys_module(argv)
    assert code == 0, err
    shutil.rmtree(place / "run-model")
    return work


@pytest.fixture(scope="module")
def capsys_module():
    """``fewstep ARGV`` in-process for a module fixture (capsys is per test): (status, stdout, stderr)."""
    import contextlib
    import io

    from fewstep.cli import main

    def run(argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code
        return code, out.getvalue(), err.getvalue()
    return run


def _prepare(row, place: Path, run_folder: Path, scratch: Path) -> tuple[list[str], Path]:
    """The row's folder (its base copied or linked into ``scratch``, the mutation applied) and its argv."""
    name, base, mutate, argv, _ = row
    folder = scratch / "m"
    if base == "pixel":
        shutil.copytree(place / "pixel", folder)
    elif base == "run":
        shutil.copytree(run_folder, folder)
    elif base is not None:
        link_model(MODELS / {"sd": "emoji-sd", "lcm": "emoji-lcm", "lora": "emoji-lcm-lora", "tiny": "emoji-tiny-vae"}[base], folder)
    else:
        folder.mkdir()
    if mutate is not None:
        mutate(folder)
    values = {"m": folder, "out": scratch / "out", "png": scratch / "out.png", "sd": place / "sd", "lcm": place / "lcm", "lora": place / "lora",
              "pixel": place / "pixel"}
    argv = [a.format(**values) for a in argv]
    if argv[0] in ("train", "train-teacher", "distill", "train-lora") and "--work-dir" not in argv:
        argv += ["--work-dir", str(scratch / "work")]        # not runs/ under the current folder
    return argv, folder


def _one_line(err: str) -> list[str]:
    """stderr's lines but warnings and the notice --allow-large prints (each its own kind of line, not an error)."""
    return [line for line in err.strip().splitlines()
            if line.strip() and not line.startswith(("fewstep: warning", "fewstep: large request"))]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_naming_the_field(row, place, run_folder, tmp_path, capsys):
    argv, folder = _prepare(row, place, run_folder, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, *argv)
    lines = _one_line(err)
    assert code not in (0, None) and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, lines
    for fragment in row[4]:
        assert fragment in lines[0], lines[0]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, set(after) ^ set(before)               # no output, no temporary, nothing half-written
    assert not Path("samples.png").exists()


def test_every_shipped_model_and_lora_passes_the_checks():
    """The bounds refuse nothing fewstep ships: every model folder's configs and weight headers, every LoRA's record."""
    from fewstep.io.specs import check_lora_info
    from fewstep.io.validate import load_json
    from fewstep.models.checks import check_folder

    checked = 0
    for folder in sorted(p for p in MODELS.iterdir() if p.is_dir()):
        record = load_json(folder / "fewstep.json") if (folder / "fewstep.json").is_file() else {}
        if record.get("kind") in ("lcm-lora", "tcd-lora", "style", "lora", "lora-set"):
            check_lora_info(record, folder / "fewstep.json")
        elif record.get("kind") != "tiny-vae":
            check_folder(folder)
        checked += 1
    assert checked >= 20


def test_prompts_file_bom_and_line_separators(tmp_path):
    """A UTF-8 BOM is not part of the first prompt; U+2028/U+2029 inside a line do not split it (str.splitlines
    would make three prompts of one); CRLF and CR line ends do."""
    from fewstep.sampling.outputs import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffgrinning face\r\nred apple\u2028with a leaf\u2029and a stem\rgreen apple\n".encode())
    assert read_prompts(path) == ["grinning face", "red apple with a leaf and a stem", "green apple"]
