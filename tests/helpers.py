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
def to_original_format(unet, vae, text_encoder, text_encoder_2=None) -> dict:
    """A pipeline's UNet, VAE and text encoder(s) as one original-format (LDM / A1111) state dict: SD 1.x keys
    (cond_stage_model.transformer.*), or SDXL's (conditioner.embedders.0.transformer.* and the OpenCLIP
    conditioner.embedders.1.model.*) when a second text encoder is given; by fewstep's own map
    (fewstep.models.ldm_keys, checked against diffusers' and ComfyUI's in test_single_file_export)."""
    from fewstep.models.ldm_keys import (
        CLIP_XL_1,
        clip_to_original,
        open_clip_to_original,
        unet_to_original,
        vae_to_original,
    )

    out = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    if text_encoder_2 is None:
        return {**out, **clip_to_original(text_encoder.state_dict())}
    return {**out, **clip_to_original(text_encoder.state_dict(), CLIP_XL_1),
            **open_clip_to_original(text_encoder_2.state_dict())}


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


TINY_FLOW = dict(vocab_size=300, max_length=16, text_width=32, text_layers=1, t5_vocab_size=120, t5_width=32,
                 t5_layers=1, width=32, head_dim=16, layers=1, single_layers=2)


def save_tiny_flow(folder, family: str = "flux", shift: float = 1.0, **sizes):
    """A random-weight FLUX- or SD3-format pipeline folder of tiny sizes (no training; ``sizes`` override
    :data:`TINY_FLOW`'s), on the TINY VAE with a shift and scaling factor as FLUX's and SD3's VAEs have."""
    from fewstep.models.flow_pipelines import FAMILIES, new_flow_pipeline
    from fewstep.nets.flow_transformers import (
        TinyFlowConfig,
        build_flux_transformer,
        build_sd3_transformer,
        build_t5,
        build_t5_tokenizer,
    )
    from fewstep.nets.unets import build_text_encoder, build_tokenizer, build_vae

    cfg = TinyFlowConfig(**{**TINY_FLOW, **sizes})
    torch.manual_seed(0)
    clip_tok = build_tokenizer(CAPTIONS, cfg.vocab_size, cfg.max_length)
    t5_tok = build_t5_tokenizer(CAPTIONS * 4, cfg.t5_vocab_size, cfg.max_length)
    vae = build_vae(TINY)
    vae.register_to_config(shift_factor=0.1, scaling_factor=0.8)
    spec = FAMILIES["FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline"]
    if family == "flux":
        parts = {"transformer": build_flux_transformer(cfg, 4), "text_encoder": build_text_encoder(cfg, clip_tok),
                 "tokenizer": clip_tok, "text_encoder_2": build_t5(cfg, t5_tok), "tokenizer_2": t5_tok}
    else:
        parts = {"transformer": build_sd3_transformer(cfg, 4, 8),
                 "text_encoder": build_text_encoder(cfg, clip_tok, projection_dim=cfg.text_width), "tokenizer": clip_tok,
                 "text_encoder_2": build_text_encoder(cfg, clip_tok, projection_dim=cfg.text_width),
                 "tokenizer_2": clip_tok, "text_encoder_3": build_t5(cfg, t5_tok), "tokenizer_3": t5_tok}
    config = ModelConfig(kind="diffusion", parameterization="flow", image_size=32, channels=3, dataset="tiny",
                         default_sampler="euler", default_steps=4, default_guidance_scale=3.0)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}
    model = new_flow_pipeline(config, spec, parts.pop("transformer"), vae, folder, scheduler, **parts)
    return save_model(folder, model)
