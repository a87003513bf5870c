"""The ruler every method is judged by: sample with fixed seeds, score with the data set's classifier.

Quality (DESIGN.md §5) is measured on the penultimate features of the shipped classifier of the
model's data set, against the whole data set: FID, KID (± std over subsets), precision/recall,
and conditional accuracy (a sample drawn for class c is classified as c).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .classifier import Classifier, accuracy, load_classifier
from .data import ImageData, load_dataset
from .errors import FewstepError
from .metrics import feature_stats, frechet_distance, kid, precision_recall
from .models import LoadedModel
from .sampling import generate, nfe, sampling_grid


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


class Ruler:
    """A data set's reference features under its classifier, computed once, and the scoring of samples."""

    def __init__(self, classifier: Classifier, data: ImageData, batch_size: int = 512) -> None:
        self.classifier = classifier.eval()
        self.data = data
        self.batch_size = batch_size
        self.real = self.features(data.images)
        self.real_stats = feature_stats(self.real)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return torch.cat([self.classifier.features(images[i:i + self.batch_size])
                          for i in range(0, len(images), self.batch_size)]).double()

    def fid(self, images: Tensor) -> float:
        """FID alone (cheap): for sweeps and tests."""
        return self._fid(self.features(images))

    def _fid(self, fake: Tensor) -> float:
        return frechet_distance(*self.real_stats, *feature_stats(fake))

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor | None = None, seed: int = 0) -> dict[str, float | None]:
        """FID, KID, precision, recall against the data set; conditional accuracy when labels are given."""
        fake = self.features(images)
        # 50 subsets of 500 (the usual is 100 of 1000): the std stays informative at 1/8 of the cost.
        kid_mean, kid_std = kid(self.real, fake, num_subsets=50, subset_size=min(500, len(fake), len(self.real)),
                                seed=seed)
        precision, recall = precision_recall(self.real, fake, k=3)
        acc = None if labels is None else accuracy(self.classifier, images, labels)
        return {"fid": self._fid(fake), "kid": kid_mean, "kid_std": kid_std,
                "precision": precision, "recall": recall, "cond_accuracy": acc}


def ruler_for(model, models_dir: Path, classifier: str | Path | None = None) -> Ruler:
    """The ruler of a model's data set (a :class:`LoadedModel` or a latent pipeline): its shipped
    classifier and the whole data set."""
    dataset = model.config.dataset if isinstance(model, LoadedModel) else model.info.get("dataset", "")
    name = dataset.split(":")[0]
    if not name:
        raise FewstepError(f"{model.path} does not say which data set it models; pass --classifier DIR")
    path = Path(classifier) if classifier else models_dir / f"{name}-classifier"
    if not path.is_dir():
        raise FewstepError(f"no classifier for data set {name!r} at {path}; pass --classifier DIR")
    clf = load_classifier(path)
    return Ruler(clf, load_dataset(name, clf.config.image_size, clf.config.channels))


def balanced_labels(model: LoadedModel, num: int) -> Tensor | None:
    """``num`` labels cycling through the classes (None for an unconditional model)."""
    c = model.config.num_classes
    return torch.arange(num) % c if c else None


def evaluate(model: LoadedModel, ruler: Ruler, steps: list[int], sampler: str = "dpmpp-2m",
             guidance_scale: float | None = None, num: int = 1000, seed: int = 0, batch_size: int = 250,
             progress: bool = True) -> tuple[list[EvalResult], dict[int, Tensor]]:
    """Score ``model`` at each step count with the same labels and seed. Returns the rows and the samples."""
    guidance = model.config.default_guidance_scale if guidance_scale is None else guidance_scale
    labels = balanced_labels(model, num)

    def sample(n: int) -> Tensor:
        return generate(model, labels, num=num, steps=n, sampler=sampler, guidance_scale=guidance, seed=seed,
                        batch_size=batch_size)
    return _score_steps(sample, lambda n: nfe(model, sampler, n, guidance), ruler, labels, steps, sampler, guidance,
                        num, seed, progress)


def _score_steps(sample: Callable[[int], Tensor], evals: Callable[[int], int], ruler: Ruler, labels: Tensor | None,
                 steps: list[int], sampler: str, guidance: float, num: int, seed: int,
                 progress: bool) -> tuple[list[EvalResult], dict[int, Tensor]]:
    """One row per step count: ``sample(n)`` timed and scored against ``labels``."""
    rows, samples = [], {}
    for n in tqdm(steps, disable=not progress, desc="eval", leave=False):
        start = time.perf_counter()
        images = sample(n)
        seconds = time.perf_counter() - start
        rows.append(EvalResult(steps=n, sampler=sampler, guidance_scale=guidance, nfe=evals(n),
                               seconds_per_image=seconds / num, **ruler.score(images, labels, seed=seed)))
        samples[n] = images
    return rows, samples


def eval_prompts(data: ImageData, num: int, seed: int = 0) -> tuple[list[str], Tensor]:
    """``num`` captions of a text-to-image set (a seeded shuffle, cycled) and their class labels: the
    prompts text-to-image models are scored on, and the labels their samples should classify as."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).repeat(num // len(data) + 1)[:num]
    return [data.captions[i] for i in order.tolist()], data.labels[order]


def evaluate_latent(model, ruler: Ruler, steps: list[int], sampler: str | None = None,
                    guidance_scale: float | None = None, num: int = 1000, seed: int = 0, batch_size: int = 250,
                    progress: bool = True) -> tuple[list[EvalResult], dict[int, Tensor]]:
    """:func:`evaluate` for a text-to-image pipeline (:class:`fewstep.sd.LatentModel`): prompts are the data
    set's own captions (:func:`eval_prompts`), conditional accuracy is "the sample's class is its
    caption's class" (the CPU analogue of a CLIP score)."""
    from .latent_sampling import generate_latent, latent_nfe

    prompts, labels = eval_prompts(ruler.data, num, seed)
    sampler = sampler or model.default_sampler
    guidance = model.default_guidance_scale if guidance_scale is None else guidance_scale

    def sample(n: int) -> Tensor:
        return generate_latent(model, prompts, steps=n, sampler=sampler, guidance_scale=guidance, seed=seed,
                               batch_size=batch_size)
    return _score_steps(sample, lambda n: latent_nfe(model, sampler, n, guidance), ruler, labels, steps, sampler,
                        guidance, num, seed, progress)


def eval_report(model, rows: list[EvalResult], num: int, seed: int) -> dict:
    """The JSON object of ``fewstep eval --json`` (DESIGN.md §3)."""
    dataset = model.config.dataset if isinstance(model, LoadedModel) else model.info.get("dataset", "")
    return {"model": str(model.path), "dataset": dataset, "num_samples": num, "seed": seed,
            "results": [asdict(r) for r in rows]}


def tune_sigmas(model: LoadedModel, ruler: Ruler, steps: int = 2, num: int = 500, seed: int = 0, iters: int = 10,
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
    labels = balanced_labels(model, num)
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
