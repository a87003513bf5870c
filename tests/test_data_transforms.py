"""Training images as diffusers' scripts cut them: the short side resized (aspect kept), a centre or a seeded
random crop, a seeded random flip; latents computed per batch when every use differs; the embedded sets as
they were."""

import json

import numpy as np
import pytest
import torch
from helpers import CAPTIONS, run_cli, tiny_setup
from PIL import Image

from fewstep.errors import FewstepError
from fewstep.models.data import (
    EMOJI_FILE,
    ImageData,
    PerBatch,
    load_captioned,
    load_dataset,
    load_image_folder,
    prepared,
)
from fewstep.models.transforms import Augment, resize_short_side, training_crops
from fewstep.training import TrainConfig, latest_checkpoint, train

STRIPES = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]   # four 16-pixel-wide vertical stripes


def stripes(width: int = 64, height: int = 32, vertical: bool = True) -> Image.Image:
    """A picture of four stripes of equal width (vertical) or height: the centre square holds the middle two,
    a squashed square all four."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    n = width if vertical else height
    for k, colour in enumerate(STRIPES):
        part = slice(k * n // 4, (k + 1) * n // 4)
        if vertical:
            arr[:, part] = colour
        else:
            arr[part, :] = colour
    return Image.fromarray(arr)


def as_rgb(colour) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32) / 127.5 - 1


def stripe_folder(root, n: int = 1, captions: bool = False, **kw):
    root.mkdir(parents=True)
    for i in range(n):
        stripes(**kw).save(root / f"{i}.png")
    if captions:
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % 6]}) + "\n"
                                                     for i in range(n)))
    return root


@pytest.mark.parametrize("vertical", [True, False])
def test_a_non_square_image_keeps_its_aspect_and_the_centre_crop_is_the_middle(tmp_path, vertical):
    size = (64, 32) if vertical else (32, 64)
    data = load_image_folder(stripe_folder(tmp_path / "pics", width=size[0], height=size[1], vertical=vertical), 16)
    x = data.images[0]
    assert x.shape == (3, 16, 16)
    # short side 32 → 16, so the long side 64 → 32 and the middle 16 are the second and third stripes, 8 each
    first, second = (x[:, :, 1:7], x[:, :, 9:15]) if vertical else (x[:, 1:7, :], x[:, 9:15, :])
    torch.testing.assert_close(first.mean((1, 2)), as_rgb(STRIPES[1]), atol=2e-2, rtol=0)
    torch.testing.assert_close(second.mean((1, 2)), as_rgb(STRIPES[2]), atol=2e-2, rtol=0)
    # a squashed picture would show the first stripe at the edge: red is absent here
    edge = x[:, :, 0] if vertical else x[:, 0, :]
    assert (edge[0] < 0).all()


def test_resize_short_side_is_torchvision_resize():
    x = torch.zeros(3, 33, 64)
    assert resize_short_side(x, 16).shape == (3, 16, 31)      # int(16 * 64 / 33) = 31, as torchvision
    assert resize_short_side(torch.zeros(1, 70, 20), 10).shape == (1, 35, 10)
    same = torch.rand(3, 16, 16)
    assert resize_short_side(same, 16) is same


def test_random_crops_are_windows_of_the_view_seeded_and_vary(tmp_path):
    data = load_image_folder(stripe_folder(tmp_path / "pics", n=4), 16, augment=Augment(crop="random"))
    assert not data.fixed and data.views[0].shape == (3, 16, 32)
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    a = data.batch(idx, torch.Generator().manual_seed(1)).images
    b = data.batch(idx, torch.Generator().manual_seed(1)).images
    c = data.batch(idx, torch.Generator().manual_seed(2)).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    view = data.views[0]
    offsets = set()
    for crop in torch.cat([a, c]):
        matches = [left for left in range(17) if torch.equal(crop, view[:, :, left:left + 16])]
        assert matches, "a random crop is not a window of the image"
        offsets.add(matches[0])
    assert len(offsets) > 3                          # crops at many places, not one
    assert torch.equal(data.images[0], view[:, :, 8:24])   # the centre crop, for evaluation and --crop center


def test_flip_is_seeded_and_flips_about_half(tmp_path):
    data = load_image_folder(stripe_folder(tmp_path / "pics"), 16, augment=Augment(flip=True))
    idx = torch.zeros(64, dtype=torch.long)
    out = data.batch(idx, torch.Generator().manual_seed(0)).images
    flipped = torch.tensor([torch.equal(x, data.images[0].flip(-1)) for x in out])
    kept = torch.tensor([torch.equal(x, data.images[0]) for x in out])
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48
    assert torch.equal(out, data.batch(idx, torch.Generator().manual_seed(0)).images)


def test_the_embedded_sets_are_unchanged():
    raw = np.load(EMOJI_FILE)
    emoji = torch.from_numpy(raw["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    for augment in (None, Augment(), Augment(flip=True)):
        data = load_captioned("emoji", 32, augment)
        assert torch.equal(data.images, emoji) and data.views is None
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images.astype(np.float32))[:, None] / 16.0 * 2 - 1
    data = load_dataset("digits", 8)
    assert data.fixed and torch.equal(data.images, digits)
    assert load_dataset("digits").images.shape == (1797, 1, 16, 16)


def test_square_files_are_read_as_before(tmp_path):
    from fewstep.io.images import image_tensor, open_image

    root = tmp_path / "pics"
    root.mkdir()
    arr = (torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(root / "0.png")
    data = load_image_folder(root, 32)
    assert torch.equal(data.images[0], image_tensor(open_image(root / "0.png", "x"), 3, 32))


def test_training_batches_are_a_function_of_seed_and_step_and_resume_exactly(tmp_path):
    """The loop cuts each micro-batch with its own generator: the same crops in a resumed run, new ones at
    each step, and the objective's random numbers untouched by them."""
    seen: dict[str, list] = {"a": [], "b": [], "fixed": []}

    def recording(key, objective):
        def wrapped(model, batch):
            seen[key].append((batch["images"].clone(), torch.rand(3)))
            return objective(model, batch)
        return wrapped

    def setup(**kw):
        model, objective, tensors = tiny_setup(**kw)
        views = [torch.cat([x, x.flip(-1)], -1) for x in tensors["images"]]     # 8×16: room to crop
        data = ImageData(tensors["images"], tensors["labels"], ["0", "1", "2"], "t", augment=Augment("random", True),
                         views=views)
        return model, objective, PerBatch(data, lambda d: {"images": d.images, "labels": d.labels}), tensors

    config = dict(max_steps=6, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=2, checkpoint_every=3,
                  log_every=1, ema_decay=0.9, progress=False)
    model, objective, data, _ = setup()
    full = train(model, recording("a", objective), data, TrainConfig(out_dir=str(tmp_path / "a"), **config))

    class Kill(Exception):
        pass

    def dies(model, batch):
        if len(seen["b"]) == 8:                  # in step 5, after the checkpoint of step 3
            raise Kill()
        return recording("b", objective)(model, batch)
    model, objective, data, _ = setup()
    with pytest.raises(Kill):
        train(model, dies, data, TrainConfig(out_dir=str(tmp_path / "b"), **config))
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-0000003"
    del seen["b"][6:]                            # what the resumed run replays: from step 4 (micro-batch 6) on
    model, objective, data, _ = setup(model_seed=5)
    resumed = train(model, recording("b", objective), data, TrainConfig(out_dir=str(tmp_path / "b"), **config))
    assert len(seen["a"]) == len(seen["b"]) == 12
    for (x, r), (y, s) in zip(seen["a"], seen["b"]):
        assert torch.equal(x, y) and torch.equal(r, s)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)

    # the same images at another step are cut anew; the objective draws what it draws without the transforms
    model, objective, _, tensors = setup()
    train(model, recording("fixed", objective), tensors, TrainConfig(out_dir=str(tmp_path / "c"), **config))
    assert len(seen["fixed"]) == 12 and all(torch.equal(r, s) for (_, r), (_, s) in zip(seen["fixed"], seen["a"]))
    batch = PerBatch(setup()[2].data, lambda d: {"images": d.images})
    idx = torch.arange(8)
    from fewstep.training.loop import _batch

    assert torch.equal(_batch(batch, idx, 0, 3, 0, 0)["images"], _batch(batch, idx, 0, 3, 0, 0)["images"])
    assert not torch.equal(_batch(batch, idx, 0, 3, 0, 0)["images"], _batch(batch, idx, 0, 4, 0, 0)["images"])


def test_latents_are_encoded_once_or_per_batch(tiny_sd, tmp_path):
    from fewstep.models.folders import load_model

    model = load_model(tiny_sd)
    folder = stripe_folder(tmp_path / "pics", n=3, captions=True)
    fixed = model.training_data(load_captioned(str(folder), 32))
    assert isinstance(fixed, dict) and fixed["images"].shape == (3, 4, 8, 8)
    data = load_captioned(str(folder), 32, Augment(crop="random", flip=True))
    per_batch = model.training_data(data)
    assert isinstance(per_batch, PerBatch) and len(per_batch) == 3
    idx = torch.tensor([2, 0])
    got = per_batch.batch(idx, torch.Generator().manual_seed(7))
    crops = training_crops([data.views[2], data.views[0]], 32, data.augment, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got["images"], model.codec.encode(crops))          # the one formula, per batch
    torch.testing.assert_close(got["prompt_embeds"], fixed["prompt_embeds"][idx])
    assert prepared(load_captioned(str(folder), 32), lambda d: {"n": torch.tensor(len(d))})["n"] == 3


def test_bad_crop_requests_are_clear_errors(tmp_path, capsys):
    with pytest.raises(FewstepError, match="unknown crop 'diagonal': use center or random"):
        Augment(crop="diagonal")
    with pytest.raises(FewstepError, match="nothing to crop; use --crop center"):
        load_captioned("emoji", 32, Augment(crop="random"))
    square = tmp_path / "square"
    square.mkdir()
    stripes(32, 32).save(square / "0.png")
    with pytest.raises(FewstepError, match="all square at the training size 32x32"):
        load_image_folder(square, 32, augment=Augment(crop="random"))
    with pytest.raises(FewstepError, match="nothing to crop"):         # resized to 16x16: still nothing to crop
        load_image_folder(square, 16, augment=Augment(crop="random"))
    assert not load_image_folder(square, 16, augment=Augment(flip=True)).fixed
    rc, _, err = run_cli(capsys, "train-teacher", "--dataset", "digits", "--crop", "random", "--out",
                         str(tmp_path / "t"), "--steps", "1", "--no-progress", "--work-dir", str(tmp_path / "w"))
    assert rc != 0 and "nothing to crop" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "train-lora", "--base", "x", "--crop", "diagonal", "--out", str(tmp_path / "l"))
    assert rc == 2 and "invalid choice: 'diagonal'" in err


def test_cli_lcm_lora_with_random_crop_and_flip(tiny_sd, tmp_path, capsys):
    folder = stripe_folder(tmp_path / "pics", n=4, captions=True, width=48, height=32)
    rc, out, err = run_cli(capsys, "distill", "--method", "lcm-lora", "--teacher", str(tiny_sd), "--dataset", str(folder),
                           "--out", str(tmp_path / "lora"), "--steps", "2", "--batch", "2", "--lora-rank", "2",
                           "--crop", "random", "--flip", "--no-progress", "--work-dir", str(tmp_path / "work"))
    assert rc == 0, err
    assert "saved lcm-lora model" in out


def stripe_shards(root, n: int = 6, per_shard: int = 4):
    """Webdataset shards of ``n`` 48×32 stripe pictures (each with its own colours) and captions."""
    import io
    import tarfile

    root.mkdir(parents=True)
    for s in range(0, n, per_shard):
        with tarfile.open(root / f"shard-{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                arr = np.asarray(stripes(48, 32)).copy()
                arr[:, :, i % 3] = (arr[:, :, i % 3].astype(int) + 40 * i) % 256
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                for name, payload in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.txt", CAPTIONS[i % 6].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


@pytest.mark.parametrize("augment", [Augment(), Augment("random"), Augment("random", flip=True)])
def test_streamed_shards_give_the_batches_of_the_set_in_memory(tmp_path, monkeypatch, augment):
    import fewstep.models.data as data_module

    shards = stripe_shards(tmp_path / "wds")
    held = load_captioned(str(shards), 32, augment)
    decoded = []
    real = data_module._open_image
    monkeypatch.setattr(data_module, "_open_image", lambda source, where: decoded.append(where) or real(source, where))
    streamed = load_captioned(str(shards), 32, augment, stream=True)
    assert decoded == [] and len(streamed) == len(held) == 6        # the index only: nothing decoded yet
    assert streamed.captions == held.captions and not streamed.fixed
    idx = torch.tensor([5, 0, 3])
    a = streamed.batch(idx, torch.Generator().manual_seed(3))
    b = held.batch(idx, torch.Generator().manual_seed(3))
    assert len(decoded) == 3 and decoded[0].endswith("shard-00001.tar:0005")
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    with pytest.raises(FewstepError, match="streamed from its shards"):
        streamed.images


def test_stream_is_automatic_above_a_size_and_refused_where_it_cannot_apply(tmp_path, monkeypatch):
    import fewstep.models.data as data_module
    from fewstep.models.data import StreamedImages

    shards = stripe_shards(tmp_path / "wds", n=2)
    assert not isinstance(load_captioned(str(shards), 32, stream=None), StreamedImages)
    monkeypatch.setattr(data_module, "STREAM_ABOVE", 2 * 3 * 32 * 32 * 4 - 1)
    assert isinstance(load_captioned(str(shards), 32, stream=None), StreamedImages)
    assert not isinstance(load_captioned(str(shards), 32, stream=False), StreamedImages)
    folder = stripe_folder(tmp_path / "pics", captions=True)
    for name in (str(folder), "emoji"):
        with pytest.raises(FewstepError, match="--stream reads webdataset .tar shards"):
            load_captioned(name, 32, stream=True)


def test_cli_lcm_lora_streams_webdataset_shards(tiny_sd, tmp_path, capsys):
    shards = stripe_shards(tmp_path / "wds")
    rc, out, err = run_cli(capsys, "distill", "--method", "lcm-lora", "--teacher", str(tiny_sd), "--dataset", str(shards),
                           "--out", str(tmp_path / "lora"), "--steps", "2", "--batch", "2", "--lora-rank", "2", "--stream",
                           "--no-progress", "--work-dir", str(tmp_path / "work"))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "distill", "--method", "ct", "--dataset", "digits", "--stream", "--out",
                         str(tmp_path / "ct"), "--steps", "1", "--no-progress", "--work-dir", str(tmp_path / "w2"))
    assert rc != 0 and "leave --stream out" in err
