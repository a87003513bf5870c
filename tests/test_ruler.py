"""The emoji ruler checked on itself (fewstep.eval.sanity): real images score its floor; blur (1, 2 px), noise and
3 of the 9 groups dropped each raise FID beyond the spread of both figures — and the feature network sees what the
9-group classifier's features miss."""

import pytest

from fewstep.eval.evaluate import Ruler, dataset_ruler
from fewstep.eval.sanity import gaussian_blur, sanity_rows
from fewstep.models.folders import shipped_models_dir
from fewstep.nets.classifier import load_classifier

MODELS = shipped_models_dir()


@pytest.fixture(scope="module")
def rows():
    ruler = dataset_ruler("emoji", MODELS)
    assert ruler.name == "emoji-features"                    # the shipped feature network, not the classifier's
    return sanity_rows(ruler, num=300, seed=0)


def _beyond(rows, worse: str, better: str) -> bool:
    a, b = rows[worse], rows[better]
    return a["fid"] - b["fid"] > a["fid_std"] + b["fid_std"]


@pytest.mark.parametrize("worse, better", [("blur 1 px", "real"), ("blur 2 px", "blur 1 px"),
                                           ("noise 0.2", "real"), ("noise 0.2", "noise 0.1"),
                                           ("3 of 9 groups dropped", "real")])
def test_each_damage_raises_fid_beyond_the_spread(rows, worse, better):
    assert _beyond(rows, worse, better), {k: (round(rows[k]["fid"], 2), round(rows[k]["fid_std"], 2))
                                          for k in (worse, better)}


def test_real_images_are_the_floor_and_fid_rises_with_every_damage(rows):
    """Noise of σ = 0.1 (5% of the range) raises FID too, but within the floor's spread at 300 images: the one damage
    this ruler cannot tell at that size (BENCHMARKS "The ruler" says so)."""
    assert min(rows, key=lambda k: rows[k]["fid"]) == "real"
    assert rows["noise 0.1"]["fid"] > rows["real"]["fid"]
    assert rows["real"]["precision"] > 0.95 and rows["real"]["recall"] > 0.9


def test_the_feature_network_sees_noise_the_group_classifier_misses():
    """The 9-group classifier's features (the ruler before emoji-features) cannot tell noisy emoji (σ = 0.2) from
    clean ones beyond the spread; the feature network can (above)."""
    ruler = dataset_ruler("emoji", MODELS)
    old = sanity_rows(Ruler(load_classifier(MODELS / "emoji-classifier"), ruler.data), num=300, seed=0)
    assert not _beyond(old, "noise 0.2", "real")


def test_gaussian_blur_keeps_a_constant_image_and_the_mean():
    import torch

    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(x, 1.0).std() < x.std()
