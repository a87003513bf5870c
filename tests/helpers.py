"""Tiny models and data shared by the tests (seconds on a CPU)."""

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import UNet2DModel

from fewstep.core.denoisers import EDMDenoiser
from fewstep.core.schedules import EDMSchedule
from fewstep.models.config import ModelConfig
from fewstep.models.data import ImageData
from fewstep.models.folders import new_pipeline, new_pixel_model, save_model
from fewstep.nets.unets import TinySDConfig
from fewstep.objectives.base import dropout_condition
from fewstep.objectives.denoising import DenoisingLoss


def tiny_unet(num_classes: int = 3, channels: int = 1, size: int = 8, dropout: float = 0.1) -> UNet2DModel:
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
                       norm_num_groups=4, dropout=dropout)


def tiny_setup(model_seed: int = 0, n: int = 32):
    """(denoiser, objective, data) with dropout on, so resume must restore the RNG stream too.
    The data is always the same; ``model_seed`` sets the initial weights."""
    torch.manual_seed(model_seed)
    g = torch.Generator().manual_seed(0)
    data = {"images": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.randint(0, 3, (n,), generator=g)}
    condition = dropout_condition({"class_labels": "labels"}, {"class_labels": torch.tensor(3)}, 0.2)
    return EDMDenoiser(tiny_unet()), DenoisingLoss(EDMSchedule(), condition), data


def save_pixel_model(folder, unet, config: ModelConfig, readme: str = ""):
    """A pixel model folder of ``unet`` (a UNet2DModel or GuidedUNet) and ``config``."""
    return save_model(folder, new_pixel_model(config, unet, folder), readme)


def save_pipeline(folder, unet, vae, text_encoder, tokenizer, config: dict | ModelConfig | None = None,
                  scheduler_config: dict | None = None):
    """A pipeline folder of the parts; ``config`` as fewstep.json fields (a diffusion teacher by default)."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig(**{"kind": "diffusion", "parameterization": "vp", "image_size": vae.config.sample_size,
                                "channels": 3, "default_sampler": "dpmpp-2m", "default_steps": 25,
                                "default_guidance_scale": 3.0, **(config or {})})
    return save_model(folder, new_pipeline(config, unet, vae, text_encoder, tokenizer, folder, scheduler_config))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``fewstep ARGV`` in-process: (exit status, stdout, stderr); argparse's SystemExit included."""
    from fewstep.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_digits_models(root: Path):
    """Fill ``root`` as a models folder: the shipped digits classifier beside a tiny untrained
    'digits-teacher'. Returns the teacher's config."""

    from fewstep.cli import shipped_models_dir
    from fewstep.models.config import ModelConfig

    shutil.copytree(shipped_models_dir() / "digits-classifier", root / "digits-classifier")
    torch.manual_seed(0)
    config = ModelConfig(schedule=asdict(EDMSchedule()), image_size=16, channels=1,
                         class_names=[str(i) for i in range(10)], dataset="digits")
    save_pixel_model(root / "digits-teacher", tiny_unet(num_classes=10, size=16), config)
    return config


# --- the latent family: a tiny text-to-image set and pipeline -------------------------------------------
CAPTIONS = ["grinning face", "red apple", "thumbs up: medium skin tone", "flag: Japan", "green apple", "smiling cat"]
TINY = TinySDConfig(vae_channels=(8, 16, 16), vocab_size=300, max_length=16, text_width=32, text_layers=1,
                    unet_channels=(16, 32, 32), head_dim=16)


def tiny_data(n: int = 24) -> ImageData:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % len(CAPTIONS)
    images = (torch.rand(len(CAPTIONS), 3, 32, 32, generator=g) * 2 - 1)[labels]
    return ImageData(images, labels % 3, ["faces", "food", "flags"], "tiny", [CAPTIONS[i] for i in labels])


def caption_folder(root, n: int = 12):
    """An image folder with a metadata.jsonl (the HF imagefolder convention) and the same pairs as
    webdataset shards."""
    import io
    import json
    import tarfile

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    lines, tar_path = [], root.parent / f"{root.name}-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}))
            for name, data in ((f"s{i:03d}.png", (root / f"{i}.png").read_bytes()),
                               (f"s{i:03d}.txt", CAPTIONS[i % len(CAPTIONS)].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root, tar_path


# --- diffusers -> original (LDM / A1111) single-file format ---------------------------------------------------
# Ported from diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
# scripts/convert_diffusers_to_original_sdxl.py (huggingface/diffusers @ 58eb52c), with their hard-coded block
# counts (4 blocks, 2 resnets per block) read from the configs so that tiny pipelines convert too.
def _unet_to_original(unet) -> dict:
    sd, n, per = unet.state_dict(), len(unet.config.block_out_channels), unet.config.layers_per_block
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0.")]
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    for i in range(n):
        for j in range(per):
            pairs += [(f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."),
                      (f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")]
        for j in range(per + 1):
            pairs += [(f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."),
                      (f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")]
        if i < n - 1:
            up_at = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd) else 1
            pairs += [(f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."),
                      (f"output_blocks.{(per + 1) * i + per}.{up_at}.", f"up_blocks.{i}.upsamplers.0.")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    out = {}
    for key, value in sd.items():
        new = key
        if "resnets" in key:
            for ldm, hf in resnet:
                new = new.replace(hf, ldm)
        for ldm, hf in pairs:
            new = new.replace(hf, ldm) if new.startswith(hf) else new
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_original(vae) -> dict:
    n, per = len(vae.config.block_out_channels), vae.config.layers_per_block
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
             ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(per)]
        pairs += [(f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(per + 1)]
        if i < n - 1:
            pairs += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                      (f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    pairs += [(f"mid.block_{j + 1}.", f"mid_block.resnets.{j}.") for j in range(2)]
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for ldm, hf in pairs:
            new = new.replace(hf, ldm)
        if "mid.attn_1." in new:
            head, tail = new.split("mid.attn_1.")
            for ldm, hf in attn:
                tail = ldm + tail[len(hf):] if tail.startswith(hf) else tail
            new = head + "mid.attn_1." + tail
            value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value   # linear -> 1x1 conv
        out["first_stage_model." + new] = value
    return out


def _open_clip_to_original(text_encoder, prefix: str) -> dict:
    """CLIPTextModelWithProjection -> OpenCLIP keys (q/k/v fused into in_proj, text_projection transposed)."""
    names = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
             (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
             ("ln_final.", "text_model.final_layer_norm."),
             ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
    sd, out, qkv = text_encoder.state_dict(), {}, {}
    for key, value in sd.items():
        for part in ("q", "k", "v"):
            if f".self_attn.{part}_proj." in key:
                qkv.setdefault(key.replace(f".{part}_proj.", ".in_proj_"), {})[part] = value
                break
        else:
            if key == "text_projection.weight":
                out[prefix + "text_projection"] = value.T.contiguous()
                continue
            for ldm, hf in names:
                key = key.replace(hf, ldm)
            out[prefix + key] = value
    for key, parts in qkv.items():
        for ldm, hf in names:
            key = key.replace(hf, ldm)
        out[prefix + key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_original_format(unet, vae, text_encoder, text_encoder_2=None) -> dict:
    """A pipeline's UNet, VAE and text encoder(s) as one original-format (LDM / A1111) state dict: SD 1.x keys
    (cond_stage_model.transformer.*), or SDXL's (conditioner.embedders.0.transformer.* and the OpenCLIP
    conditioner.embedders.1.model.*) when a second text encoder is given."""
    te = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_encoder.state_dict().items()}
    out = {**_unet_to_original(unet), **_vae_to_original(vae)}
    if text_encoder_2 is None:
        return {**out, **{"cond_stage_model.transformer." + k: v for k, v in te.items()}}
    return {**out, **{"conditioner.embedders.0.transformer." + k: v for k, v in te.items()},
            **_open_clip_to_original(text_encoder_2, "conditioner.embedders.1.model.")}


def save_tiny_sdxl(folder, force_zeros: bool = False):
    """A random-weight SDXL-format pipeline folder of the TINY sizes (no training); ``force_zeros`` as SDXL's
    ``force_zeros_for_empty_prompt`` (the base model's default True; fewstep's SDXL teacher trains with False)."""
    from fewstep.nets.sdxl import TinySDXLConfig, build_sdxl_unet, build_text_encoder_2
    from fewstep.nets.unets import build_text_encoder, build_tokenizer, build_vae

    cfg = TinySDXLConfig(**asdict(TINY))
    torch.manual_seed(0)
    tok = build_tokenizer(CAPTIONS, cfg.vocab_size, cfg.max_length)
    config = ModelConfig(kind="diffusion", parameterization="vp", image_size=32, channels=3, dataset="tiny",
                         default_sampler="dpmpp-2m", default_steps=4, default_guidance_scale=3.0)
    model = new_pipeline(config, build_sdxl_unet(cfg), build_vae(cfg), build_text_encoder(cfg, tok), tok, folder,
                         text_encoder_2=build_text_encoder_2(cfg, tok), tokenizer_2=tok, force_zeros=force_zeros)
    return save_model(folder, model)
