"""The ruler every method is judged by: sample with fixed seeds, score with the data set's networks.

Quality (DESIGN.md §5) is measured against the whole data set: FID, KID (± std over subsets) and
precision/recall on the penultimate features of the data set's **feature network** (``models/<set>-features``:
trained to tell every image of the set from every other, :mod:`fewstep.nets.classifier`), and conditional
accuracy with its **group classifier** (``models/<set>-classifier``: a sample drawn for class c is classified as
c; a text-to-image model is prompted with the data set's own captions, and a sample counts as right when it is
classified into its caption's group: the CPU analogue of a CLIP score). A data set with no feature network
(digits, whose classifier's features already separate its 1,797 images' classes at 99%) takes its classifier's
features for both. ``tests/test_ruler.py`` checks the ruler itself: real images score the floor, blur, noise and
missing groups each raise FID beyond its spread.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..models.data import ImageData, load_dataset
from ..models.handle import Model
from ..nets.classifier import Classifier, load_classifier
from ..sampling.generate import generate, nfe
from ..sampling.grids import sampling_grid
from .metrics import (
    bootstrap_std,
    feature_stats,
    frechet_distance,
    kid,
    precision_recall_points,
)

RESAMPLES = 50
SPREAD = (f"bootstrap over the sample set ({RESAMPLES} resamples with replacement): FID and conditional accuracy over "
          f"the samples, precision and recall over their per-point terms; KID: std over its random subsets")


@dataclass
class EvalResult:
    """One row of ``fewstep eval --json`` (DESIGN.md §3): keys may be added, never renamed."""

    steps: int
    sampler: str
    guidance_scale: float
    nfe: int
    fid: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    cond_accuracy: float | None
    seconds_per_image: float
    # spreads (:data:`SPREAD`); None in rows measured before they were reported
    fid_std: float | None = None
    precision_std: float | None = None
    recall_std: float | None = None
    cond_accuracy_std: float | None = None


class Ruler:
    """A data set's reference features, computed once, and the scoring of samples: FID/KID/precision/recall on
    ``features`` (the feature network; the classifier's own features when None), accuracy with ``classifier``.
    ``name`` says which network gave the features (recorded beside every score)."""

    def __init__(self, classifier: Classifier, data: ImageData, batch_size: int = 512,
                 features: Classifier | None = None, name: str = "") -> None:
        self.classifier = classifier.eval()
        self.feature_net = (features or classifier).eval()
        self.name = name or f"{data.name.split(':')[0]}-{'features' if features is not None else 'classifier'}"
        self.data = data
        self.batch_size = batch_size
        self.real = self.features(data.images)
        self.real_stats = feature_stats(self.real)

    def on(self, data: ImageData) -> "Ruler":
        """The same networks against other reference images (a subset: one group's style FID)."""
        features = self.feature_net if self.feature_net is not self.classifier else None
        return Ruler(self.classifier, data, self.batch_size, features, self.name)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return torch.cat([self.feature_net.features(images[i:i + self.batch_size])
                          for i in range(0, len(images), self.batch_size)]).double()

    def fid(self, images: Tensor) -> float:
        """FID alone (cheap): for sweeps and tests."""
        return self._fid(self.features(images))

    def _fid(self, fake: Tensor) -> float:
        return frechet_distance(*self.real_stats, *feature_stats(fake))

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor | None = None, seed: int = 0) -> dict[str, float | None]:
        """FID, KID, precision, recall against the data set; conditional accuracy when labels are given;
        each with its spread (:data:`SPREAD`)."""
        fake = self.features(images)
        # 50 subsets of 500 (the usual is 100 of 1000): the std stays informative at 1/8 of the cost.
        kid_mean, kid_std = kid(self.real, fake, num_subsets=50, subset_size=min(500, len(fake), len(self.real)),
                                seed=seed)
        in_real, in_fake = precision_recall_points(self.real, fake, k=3)
        out = {"fid": self._fid(fake), "kid": kid_mean, "kid_std": kid_std, "precision": _mean(in_real),
               "recall": _mean(in_fake), "cond_accuracy": None,
               "fid_std": bootstrap_std(lambda i: self._fid(fake[i]), len(fake), RESAMPLES, seed),
               "precision_std": bootstrap_std(lambda i: _mean(in_real[i]), len(in_real), RESAMPLES, seed),
               "recall_std": bootstrap_std(lambda i: _mean(in_fake[i]), len(in_fake), RESAMPLES, seed),
               "cond_accuracy_std": None}
        if labels is not None:
            right = self.classifier.predict(images).argmax(-1) == labels
            out["cond_accuracy"], out["cond_accuracy_std"] = _mean(right), bootstrap_std(
                lambda i: _mean(right[i]), len(right), RESAMPLES, seed)
        return out


def _mean(flags: Tensor) -> float:
    return float(flags.double().mean())


def ruler_for(model: Model, models_dir: Path, classifier: str | Path | None = None,
              features: str | Path | None = None) -> Ruler:
    """The ruler of a model's data set (:func:`dataset_ruler`)."""
    name = model.config.dataset.split(":")[0]
    if not name:
        raise FewstepError(f"{model.path} does not say which data set it models; pass --classifier DIR")
    return dataset_ruler(name, models_dir, classifier, features)


def dataset_ruler(name: str, models_dir: Path, classifier: str | Path | None = None,
                  features: str | Path | None = None) -> Ruler:
    """The ruler of the data set ``name`` (digits, emoji): its shipped classifier (or ``classifier``), its feature
    network (``features``; by default ``models/<name>-features`` where there is one) and the whole data set."""
    path = Path(classifier) if classifier else models_dir / f"{name}-classifier"
    if not path.is_dir():
        raise FewstepError(f"no classifier for data set {name!r} at {path}; pass --classifier DIR")
    feature_path = Path(features) if features else models_dir / f"{name}-features"
    if features and not feature_path.is_dir():
        raise FewstepError(f"no feature network at {feature_path}; give the folder fewstep train-classifier --instance "
                           f"wrote")
    clf = load_classifier(path)
    net = load_classifier(feature_path) if feature_path.is_dir() else None
    return Ruler(clf, load_dataset(name, clf.config.image_size, clf.config.channels), features=net,
                 name=feature_path.name if net is not None else path.name)


def dataset_ruler_name(models_dir: Path, name: str) -> str:
    """The name of the network whose features :func:`dataset_ruler` scores ``name`` on (without loading it)."""
    return f"{name}-features" if (models_dir / f"{name}-features").is_dir() else f"{name}-classifier"


def eval_prompts(data: ImageData, num: int, seed: int = 0) -> tuple[list[str], Tensor]:
    """``num`` captions of a text-to-image set (a seeded shuffle, cycled) and their class labels."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).repeat(num // len(data) + 1)[:num]
    return [data.captions[i] for i in order.tolist()], data.labels[order]


def eval_conditions(model: Model, data: ImageData, num: int, seed: int = 0) -> tuple[object, Tensor | None]:
    """(what to sample ``num`` images of, the labels they should classify as): the data set's own captions
    for a text-to-image model (:func:`eval_prompts`); labels cycling through the classes for a
    class-conditional one (None for an unconditional one)."""
    if model.conditioner.text:
        return eval_prompts(data, num, seed)
    c = model.config.num_classes
    labels = torch.arange(num) % c if c else None
    return labels, labels


def evaluate(model: Model, ruler: Ruler, steps: list[int], sampler: str | None = None,
             guidance_scale: float | None = None, num: int = 1000, seed: int = 0, batch_size: int = 250,
             progress: bool = True, **sampling) -> tuple[list[EvalResult], dict[int, Tensor]]:
    """Score ``model`` at each step count with the same conditions and seed (sampler and guidance scale:
    the model's by default; ``sampling``: more of :func:`fewstep.sampling.generate.generate`'s options, e.g.
    ``rho``, ``clamp_x0``). Returns the rows and the samples."""
    sampler = sampler or model.config.default_sampler
    guidance = model.config.default_guidance_scale if guidance_scale is None else guidance_scale
    cond, labels = eval_conditions(model, ruler.data, num, seed)
    rows, samples = [], {}
    for n in tqdm(steps, disable=not progress, desc="eval", leave=False):
        start = time.perf_counter()
        images = generate(model, cond, num=num, steps=n, sampler=sampler, guidance_scale=guidance, seed=seed,
                          batch_size=batch_size, **sampling)
        seconds = time.perf_counter() - start
        rows.append(EvalResult(steps=n, sampler=sampler, guidance_scale=guidance, nfe=nfe(model, sampler, n, guidance),
                               seconds_per_image=seconds / num, **ruler.score(images, labels, seed=seed)))
        samples[n] = images
    return rows, samples


def eval_report(model, rows: list[EvalResult], num: int, seed: int, ruler: Ruler | None = None) -> dict:
    """The JSON object of ``fewstep eval --json`` (DESIGN.md §3); ``features``: the network that gave FID's features."""
    return {"model": str(model.path), "dataset": model.config.dataset, "spread": SPREAD, "num_samples": num, "seed": seed,
            **({"features": ruler.name} if ruler is not None else {}), "results": [asdict(r) for r in rows]}


def tune_sigmas(model: Model, ruler: Ruler, steps: int = 2, num: int = 500, seed: int = 0, iters: int = 10,
                sampler: str = "consistency", guidance_scale: float | None = None,
                progress: bool = True) -> tuple[list[float], float]:
    """The intermediate noise levels of n-step (consistency) sampling that minimize FID.

    Song et al. 2023 (§6, "we use ternary search to optimize the intermediate time points"): a
    ternary search over ln σ for each intermediate level in turn (greedy: level k is searched in
    (σmin, level k−1) with the earlier ones fixed), scoring the n-step grid σmax > τ_1 > … > τ_k > 0 by
    FID on ``num`` samples with a fixed seed. Returns the grid (ending in 0) and its FID.
    """
    if steps < 2:
        raise FewstepError("tuning needs at least 2 steps: a 1-step grid has no intermediate level")
    guidance = model.config.default_guidance_scale if guidance_scale is None else guidance_scale
    labels, _ = eval_conditions(model, ruler.data, num, seed)
    sigma_min = getattr(model.schedule, "sigma_min", 0.002)
    levels = [float(sampling_grid(model, 1, sampler)[0])]

    def fid_at(u: float) -> float:
        grid = torch.tensor(levels + [math.exp(u), 0.0])
        return ruler.fid(generate(model, labels, num=num, sampler=sampler, guidance_scale=guidance, seed=seed,
                                  sigmas=grid))

    bar = tqdm(total=(steps - 1) * iters, disable=not progress, desc="ternary search", leave=False)
    for _ in range(steps - 1):
        lo, hi = math.log(sigma_min), math.log(levels[-1])
        for _ in range(iters):
            a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if fid_at(a) < fid_at(b):
                hi = b
            else:
                lo = a
            bar.update(1)
        levels.append(math.exp((lo + hi) / 2))
    bar.close()
    grid = levels + [0.0]
    best = ruler.fid(generate(model, labels, num=num, sampler=sampler, guidance_scale=guidance, seed=seed,
                              sigmas=torch.tensor(grid)))
    return grid, best
