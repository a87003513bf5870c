"""Single-file checkpoints (issue 15): an original-format (LDM / A1111 / ComfyUI) .safetensors loads as the
pipeline it was converted from, through diffusers' own from_single_file with a local config; the shipped
configs and CLIP tokenizer are the published ones; what fewstep cannot take says so in one line.

Tiny pipelines cannot be type-inferred by diffusers (it reads full-size key shapes), so they load with
config= their folder; the shipped-config path is the slow full-size test and the shape-only type tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_cli, save_tiny_sdxl, to_original_format
from safetensors.torch import save_file

from fewstep.errors import FewstepError
from fewstep.models.folders import load_model
from fewstep.models.single_file import CONFIGS, checkpoint_type, clip_tokenizer, read_shapes
from fewstep.models.single_file import _shipped_name as shipped_name

PROMPTS = ["red apple", "flag: Japan"]
V2_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
TE_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"


def _save_original(model, path: Path, **changes: torch.Tensor) -> Path:
    parts = model.parts
    state = to_original_format(model.unet, parts["vae"], parts["text_encoder"], parts.get("text_encoder_2"))
    save_file({k: v.contiguous() for k, v in {**state, **changes}.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory):
    """A random-weight SDXL-format pipeline folder."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_single_file_loads_as_the_folder_it_came_from(which, tiny_sd, tiny_sdxl_folder, tmp_path):
    """The original-format file of a pipeline, loaded with config= that pipeline's folder, has the folder's
    UNet, VAE and text-encoder weights exactly and gives its images; a changed weight in the file changes them."""
    from fewstep.sampling.generate import generate_latent

    source = tiny_sd if which == "sd" else tiny_sdxl_folder
    folder = load_model(source)
    single = load_model(_save_original(folder, tmp_path / "model.safetensors"), config=source)
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if which == "sdxl" else ())
    for name in names:
        _same_weights(folder.unet if name == "unet" else folder.parts[name],
                      single.unet if name == "unet" else single.parts[name])
    assert single.config.prediction_type == folder.config.prediction_type and single.is_pipeline
    assert ("text_encoder_2" in single.parts) == (which == "sdxl")
    ours = generate_latent(single, PROMPTS, steps=2, guidance_scale=2.0, seed=3)
    assert torch.allclose(ours, generate_latent(folder, PROMPTS, steps=2, guidance_scale=2.0, seed=3), atol=1e-6)

    te = "cond_stage_model.transformer." if which == "sd" else "conditioner.embedders.0.transformer."
    changes = {"model.diffusion_model.out.2.bias": ("unet", "conv_out.bias"),     # each part from the file
               "first_stage_model.decoder.conv_out.bias": ("vae", "decoder.conv_out.bias"),
               te + "text_model.final_layer_norm.bias": ("text_encoder", "final_layer_norm.bias")}
    modules = {"unet": folder.unet, "vae": folder.parts["vae"], "text_encoder": folder.parts["text_encoder"]}
    new = {key: modules[part].state_dict()[name] + 0.5 for key, (part, name) in changes.items()}
    other = load_model(_save_original(folder, tmp_path / "changed.safetensors", **new), config=source)
    loaded = {"unet": other.unet, "vae": other.parts["vae"], "text_encoder": other.parts["text_encoder"]}
    for key, (part, name) in changes.items():
        assert torch.equal(loaded[part].state_dict()[name], new[key]), key
    assert not torch.allclose(generate_latent(other, PROMPTS, steps=2, guidance_scale=2.0, seed=3), ours, atol=1e-2)


def test_single_file_with_a_config_of_another_architecture_is_refused(tiny_sd, tiny_sdxl_folder, tmp_path):
    path = _save_original(load_model(tiny_sd), tmp_path / "sd.safetensors")
    with pytest.raises(FewstepError, match="SD 1.x/2.x checkpoint but the config"):
        load_model(path, config=tiny_sdxl_folder)
    with pytest.raises(FewstepError, match=r"\d+ channels wide but the config .* is 320"):
        load_model(path, config="sd-v1-5")   # a shipped config by name: SD 1.5's UNet is 320 wide
    with pytest.raises(FewstepError, match="not a diffusers pipeline folder"):
        load_model(path, config=tmp_path)
    with pytest.raises(FewstepError, match="for single-file checkpoints"):
        load_model(tiny_sd, config=tiny_sd)
    with pytest.raises(FewstepError, match="--variant"):
        load_model(path, variant="fp16", config=tiny_sd)


def test_clip_tokenizer_gives_clips_token_ids():
    """Ids of openai/clip-vit-large-patch14's tokenizer (the SD 1.x/2.x/SDXL one): bos 49406, eos 49407."""
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("An astronaut riding a horse").input_ids == [49406, 550, 18376, 6765, 320, 4558, 49407]
    assert tok("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 49407, 49407]
    bang = clip_tokenizer("!")      # SD 2.x and SDXL's second tokenizer pad with "!" (id 0)
    assert bang("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


def _params(folder: Path, part: str) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
    with torch.device("meta"):
        net = cls.from_config(cls.load_config(folder / part))
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name,unet", [("sd-v1-5", 859_520_964), ("sd-v2-1", 865_910_724),
                                       ("sd-v2-base", 865_910_724), ("sdxl-base", 2_567_463_684)])
def test_shipped_configs_are_the_published_architectures(name, unet):
    """The shipped configs build the published UNets (their known parameter counts) and the SD VAE (83.65M)."""
    from fewstep.models.folders import _check_parts_fit

    folder = CONFIGS / name
    assert _params(folder, "unet") == unet and _params(folder, "vae") == 83_653_863
    _check_parts_fit(folder, name.startswith("sdxl"))


def _shapes_file(path: Path, shapes: dict[str, tuple], **values: torch.Tensor) -> Path:
    """A safetensors file with these keys and shapes (zeros): what diffusers' type inference reads."""
    save_file({**{k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, **values}, str(path))
    return path


SD_PARTS = {UNET_IN: (320, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (1,), TE_KEY: (77, 768)}
XL_PARTS = {UNET_IN: (320, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (1,),
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}


@pytest.mark.parametrize("shapes,yaml,step,expected", [
    (SD_PARTS, None, None, "sd-v1-5"),
    ({**SD_PARTS, V2_KEY: (640, 1024)}, None, None, "sd-v2-1"),
    ({**SD_PARTS, V2_KEY: (640, 1024)}, 'model:\n  params:\n    parameterization: "v"\n', None, "sd-v2-1"),
    ({**SD_PARTS, V2_KEY: (640, 1024)}, "model:\n  params:\n    linear_start: 0.00085\n", None, "sd-v2-base"),
    ({**SD_PARTS, V2_KEY: (640, 1024)}, None, 875000, "sd-v2-base"),
    ({**SD_PARTS, V2_KEY: (640, 1024)}, None, 110000, "sd-v2-1"),
    (XL_PARTS, None, None, "sdxl-base"),
])
def test_checkpoint_type_picks_the_shipped_config(tmp_path, shapes, yaml, step, expected):
    """diffusers' type inference picks the config; SD 2 base by an A1111 .yaml beside the file (A1111's rule)
    or global_step 875000 (diffusers' rule), else SD 2.1 768-v as diffusers does."""
    extra = {"global_step": torch.tensor([step])} if step else {}
    path = _shapes_file(tmp_path / "m.safetensors", shapes, **extra)
    if yaml:
        (tmp_path / "m.yaml").write_text(yaml)
    shapes_read = read_shapes(path)
    assert shipped_name(path, shapes_read, checkpoint_type(path, shapes_read)) == expected


@pytest.mark.parametrize("name,shapes,match", [
    ("m.ckpt", None, "pickled checkpoint.*weights_only=True"),
    ("m.safetensors", None, "not a safetensors checkpoint"),
    ("notes.txt", None, "not a safetensors checkpoint"),
    ("lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "is a LoRA"),
    ("unet.safetensors", {"conv_in.weight": (8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (1,)},
     "one diffusers-format part"),
    ("vae.safetensors", {"encoder.down.0.block.0.conv1.weight": (1,)}, "VAE alone"),
    ("other.safetensors", {"weight": (2, 2)}, "not a Stable Diffusion checkpoint"),
    ("inpaint.safetensors", {**SD_PARTS, UNET_IN: (320, 9, 3, 3)}, "inpainting checkpoint"),
    ("ip2p.safetensors", {**SD_PARTS, UNET_IN: (320, 8, 3, 3)}, "instruct-pix2pix"),
    ("refiner.safetensors", {UNET_IN: (384, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (1,),
                             "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
     "SDXL refiner"),
    ("pg.safetensors", {**XL_PARTS, "edm_mean": (1, 4, 1, 1)}, "'playground-v2-5' checkpoint"),
    ("unet-only.safetensors", {UNET_IN: (320, 4, 3, 3)}, "no VAE and no text encoder weights"),
])
def test_files_fewstep_cannot_take_say_what_they_are(tmp_path, name, shapes, match):
    path = tmp_path / name
    if shapes is None:
        path.write_bytes(b"not a checkpoint, just some text\n" * 4)
    else:
        _shapes_file(path, shapes)
    with pytest.raises(FewstepError, match=match):
        load_model(path)


def test_cli_refuses_a_pickle_in_one_line(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04 pickled")
    code, _, err = run_cli(capsys, "sample", "--model", str(ckpt), "--prompt", "a cat",
                           "--out", str(tmp_path / "x.png"))
    assert code != 0 and "pickled checkpoint" in err and "Traceback" not in err


@pytest.mark.slow
def test_full_size_sd15_single_file_loads_with_the_shipped_config(tmp_path):
    """A random-weight SD-1.5-architecture original-format file (fp16, 2.1 GB) loads with no config: its type
    inferred by diffusers, the shipped sd-v1-5 configs, CLIP's tokenizer; the weights are the file's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CONFIGS / "sd-v1-5"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).half()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).half()
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).half()
    path = tmp_path / "sd15.safetensors"
    save_file({k: v.contiguous() for k, v in to_original_format(unet, vae, te).items()}, str(path))
    kept = {name: {k: v.clone() for i, (k, v) in enumerate(net.state_dict().items()) if i % 5 == 0}
            for name, net in (("unet", unet), ("vae", vae), ("text_encoder", te))}   # a fifth, to save memory
    del unet, vae, te
    model = load_model(path)
    assert model.parts["scheduler_config"]["_class_name"] == "PNDMScheduler" and model.config.image_size == 512
    assert model.config.prediction_type == "epsilon" and model.unet.config.cross_attention_dim == 768
    for name, net in (("unet", model.unet), ("vae", model.parts["vae"]), ("text_encoder", model.parts["text_encoder"])):
        sd = net.state_dict()
        assert all(torch.equal(sd[k], v.float()) for k, v in kept[name].items()), name
    assert model.parts["tokenizer"]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_cli_samples_a_single_file_with_its_config(tiny_sd, tmp_path, capsys):
    """`sample --model FILE --config DIR` gives the images `sample --model DIR` gives."""
    import numpy as np
    from PIL import Image

    path = _save_original(load_model(tiny_sd), tmp_path / "model.safetensors")
    grids = []
    for model in ((str(path), "--config", str(tiny_sd)), (str(tiny_sd),)):
        out = tmp_path / f"{len(grids)}.png"
        rc, _, err = run_cli(capsys, "sample", "--model", *model, "--prompt", "red apple", "--steps", "2", "--num", "2",
                             "--out", str(out))
        assert rc == 0, err
        grids.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(grids[0] - grids[1]).max() <= 1
