"""The measurements of zero-shot editing behind the bench (Song et al. 2023 §6): classifier accuracy of
inpainted images against a blur fill, super-resolution PSNR against bicubic, the luminance error of
colorization, denoising PSNR, interpolation confidence and stroke-editing accuracy."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..editing.constraints import Half, half_mask, luminance, rough_strokes
from ..editing.zero_shot import (
    check_sigmas,
    colorize,
    default_sigmas,
    denoise,
    infer_labels,
    inpaint,
    interpolate,
    stroke,
    superres,
)
from ..models.handle import Model


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean per-image PSNR in dB for images in [−1, 1] (peak-to-peak 2)."""
    mse = (a - b).square().flatten(1).mean(1).clamp(min=1e-12)
    return float((10 * torch.log10(4 / mse)).mean())


def blur_fill(images: Tensor, known: Tensor, iters: int = 200) -> Tensor:
    """The inpainting baseline: start from the mean of the known pixels and repeatedly replace every
    unknown pixel by the 3×3 box blur of the image (known pixels held fixed, edges replicated);
    this converges to the smooth (harmonic) fill of the hole from its border."""
    known = known.bool().expand_as(images)
    mean = (images * known).flatten(1).sum(1) / known.flatten(1).sum(1).clamp(min=1)
    x = torch.where(known, images, mean[:, None, None, None])
    c = images.shape[1]
    kernel = torch.full((c, 1, 3, 3), 1 / 9, dtype=images.dtype)
    for _ in range(iters):
        x = torch.where(known, images, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c))
    return x


@torch.no_grad()
def inpaint_metrics(model: Model, classifier: torch.nn.Module, images: Tensor, labels: Tensor,
                    masked: Half = "bottom", sigmas: Sequence[float] | None = None, seed: int = 0) -> dict[str, float]:
    """Half of each digit generated, the label never given (it is what is tested): classifier accuracy
    on the original label for the inpainted images, unconditionally and (class-conditional models)
    conditioned on the label the model infers from the known half (:func:`infer_labels`), and for
    :func:`blur_fill`; the MSE on the generated half for the unconditional result and the blur fill."""
    known = half_mask(images.shape[-1], masked)
    out = inpaint(model, images, known, sigmas=sigmas, seed=seed)
    inferred = None
    if model.config.class_names:  # the model infers the label from the known half, then inpaints with it
        guess = infer_labels(model, images, known, seed=seed)
        inferred = {"label_inference_accuracy": float((guess == labels).float().mean()),
                    "accuracy_inferred_label": accuracy(classifier, inpaint(model, images, known, labels=guess,
                                                                             sigmas=sigmas, seed=seed), labels)}
    base = blur_fill(images, known)
    hole = (~known).expand_as(images)

    def hole_mse(x: Tensor) -> float:
        return float((x - images)[hole].square().mean())

    return {"accuracy": accuracy(classifier, out, labels), "baseline_accuracy": accuracy(classifier, base, labels),
            "original_accuracy": accuracy(classifier, images, labels),
            "masked_mse": hole_mse(out), "baseline_masked_mse": hole_mse(base), **(inferred or {})}


@torch.no_grad()
def superres_metrics(model: Model, classifier: torch.nn.Module, images: Tensor, labels: Tensor,
                     factor: int = 4, sigmas: Sequence[float] | None = None, seed: int = 0) -> dict[str, float]:
    """``factor``× super-resolution from the patch means: PSNR (and classifier accuracy) of the
    result and of bicubic upsampling of the same low-res image (``F.interpolate(mode="bicubic")``,
    clipped), plus the largest deviation of the result's patch means from the low-res image."""
    out = superres(model, images, factor, sigmas=sigmas, seed=seed)
    low = F.avg_pool2d(images, factor)
    bicubic = F.interpolate(low, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    return {"psnr": psnr(out, images), "bicubic_psnr": psnr(bicubic, images),
            "accuracy": accuracy(classifier, out, labels), "bicubic_accuracy": accuracy(classifier, bicubic, labels),
            "max_patch_mean_error": float((F.avg_pool2d(out, factor) - low).abs().max())}


@torch.no_grad()
def colorize_metrics(model: Model, classifier: torch.nn.Module, images: Tensor, labels: Tensor,
                     sigmas: Sequence[float] | None = None, seed: int = 0) -> dict[str, float]:
    """Colorization of the grayscale versions of real colour images: PSNR to the originals and classifier
    accuracy, beside the gray images themselves (the baseline: luminance in every channel), and the largest
    |w·x_out − w·x_ref| (kept exactly: ~1e-7)."""
    out = colorize(model, images, sigmas=sigmas, seed=seed)
    gray = luminance(images).expand_as(images)
    return {"max_luminance_error": float((luminance(out) - luminance(images)).abs().max()),
            "psnr": psnr(out.clamp(-1, 1), images), "gray_psnr": psnr(gray, images),
            "accuracy": accuracy(classifier, out, labels), "gray_accuracy": accuracy(classifier, gray, labels)}


@torch.no_grad()
def denoise_metrics(model: Model, images: Tensor, sigma: float = 0.3, seed: int = 0) -> dict[str, float]:
    """PSNR of y + σz before and after one evaluation f(y + σz, σ)."""
    noisy = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return {"sigma": sigma, "noisy_psnr": psnr(noisy, images), "psnr": psnr(denoise(model, noisy, sigma, seed=seed), images)}


@torch.no_grad()
def interpolation_metrics(model: Model, classifier: torch.nn.Module, pairs: int = 20, frames: int = 9,
                          labels: Tensor | None = None, sigmas: Sequence[float] | None = None,
                          seed: int = 0) -> dict[str, float]:
    """Slerp interpolation between ``pairs`` pairs of noises (unconditional, or one label per pair):
    the classifier's top softmax probability on every frame; the minimum over all frames, and the
    mean over pairs of each pair's minimum (low values: frames that look like no class)."""
    c, s = model.config.channels, model.config.image_size
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(pairs, c, s, s, generator=g), torch.randn(pairs, c, s, s, generator=g)
    out = interpolate(model, z0, z1, frames, sigmas=sigmas, labels=labels, seed=seed)
    conf = classifier.predict(out.flatten(0, 1)).max(-1).values.reshape(pairs, frames)
    return {"min_confidence": float(conf.min()), "mean_pair_min_confidence": float(conf.min(1).values.mean()),
            "mean_confidence": float(conf.mean())}


@torch.no_grad()
def stroke_metrics(model: Model, classifier: torch.nn.Module, images: Tensor, labels: Tensor,
                   sigma_start: float = 1.5, sigmas: Sequence[float] | None = None, seed: int = 0) -> dict[str, float]:
    """Unconditional stroke-guided editing of :func:`rough_strokes` of real digits: classifier
    accuracy on the original label for the strokes themselves and for the edited images."""
    strokes = rough_strokes(images)
    out = stroke(model, strokes, sigma_start, sigmas=sigmas, seed=seed)
    return {"sigma_start": sigma_start, "accuracy": accuracy(classifier, out, labels),
            "strokes_accuracy": accuracy(classifier, strokes, labels)}


def edit_metrics(model: Model, classifier: torch.nn.Module, images: Tensor, labels: Tensor,
                 sigmas: Sequence[float] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every measurement above on ``images`` (real data with their ``labels``), as one JSON-able dict.
    Colorization is None for a grayscale model, conditional interpolation for an unconditional one."""
    num_classes = model.config.num_classes
    return {
        "sigmas": default_sigmas(model) if sigmas is None else check_sigmas(sigmas),
        "inpaint_bottom": inpaint_metrics(model, classifier, images, labels, "bottom", sigmas, seed),
        "inpaint_right": inpaint_metrics(model, classifier, images, labels, "right", sigmas, seed),
        "superres_4x": superres_metrics(model, classifier, images, labels, 4, sigmas, seed),
        "colorize": colorize_metrics(model, classifier, images, labels, sigmas, seed) if images.shape[1] == 3 else None,
        "denoise": denoise_metrics(model, images, seed=seed),
        "interpolate": interpolation_metrics(model, classifier, seed=seed),
        "interpolate_conditional": interpolation_metrics(model, classifier, labels=torch.arange(20) % num_classes,
                                                         seed=seed) if num_classes else None,
        "stroke": stroke_metrics(model, classifier, images, labels, sigmas=None, seed=seed),
    }


def accuracy(classifier: torch.nn.Module, images: Tensor, labels: Tensor) -> float:
    return float((classifier.predict(images.clamp(-1, 1)).argmax(-1) == labels).float().mean())
