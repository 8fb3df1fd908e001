"""Fidelity of images to a reference generated with identical seeds: PSNR, SSIM (torchmetrics), LPIPS.

Images are compared in [0, 1] (data range 1). PSNR is computed per image and averaged (+inf when every
pair is identical; an identical pair among differing ones counts at the PSNR of a one-level error in one value); SSIM uses torchmetrics' Gaussian 11x11 window (smaller for images under 11 px) and
is averaged over images. LPIPS needs torchvision backbone weights, which cannot be downloaded offline:
it is reported when they are in the torch hub cache, else None.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from dmquant.errors import DMQuantError
from dmquant.metrics.images import as_uint8_batch, check_same_shape


def _pair(images, reference, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_uint8_batch(images), as_uint8_batch(reference)
    check_same_shape(a, b, what)
    if len(a) == 0:
        raise DMQuantError(f"{what} of an empty image set")
    to_t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).double().div(255.0)  # noqa: E731
    return to_t(a), to_t(b)


def psnr_per_image(images, reference) -> np.ndarray:
    """Each image's 10 log10(1 / MSE) with pixels in [0, 1] (float64; +inf where a pair is identical)."""
    return _psnr_per_pair(*_pair(images, reference, "PSNR"))


def _psnr_per_pair(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()


def psnr(images, reference) -> float:
    """Mean over images of :func:`psnr_per_image`; +inf when every pair is identical. Among pairs that differ, an
    identical one counts at :func:`identical_psnr` (the smallest error its 8-bit values can carry), so that one
    identical image does not make the mean infinite."""
    a, b = _pair(images, reference, "PSNR")
    per_image = _psnr_per_pair(a, b)
    if np.isinf(per_image).all():
        return math.inf
    return float(np.where(np.isfinite(per_image), per_image, identical_psnr(a[0].numel())).mean())


def identical_psnr(values: int) -> float:
    """The PSNR of an 8-bit image of ``values`` values that differs from its reference by one level in one value:
    ``10 log10(255² · values)`` (83.0 dB for 32 x 32 x 3), the highest a differing pair can reach."""
    return 10 * math.log10(255.0 ** 2 * values)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over images of ``a - b`` (per-image figures of two image sets from the same prompts and seeds, e.g.
    :func:`psnr_per_image` of two methods) with a bootstrap 95% interval of that mean (images resampled in pairs);
    images whose figure is not finite in either set (identical to their reference) are left out."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    means = diff[np.random.default_rng(seed).integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return {"mean": float(diff.mean()), "ci95": [float(q) for q in np.percentile(means, [2.5, 97.5])],
            "images": int(keep.sum())}


def ssim(images, reference) -> float:
    """Mean SSIM (torchmetrics, Gaussian window 11, sigma 1.5, data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(images, reference, "SSIM")
    kernel = 11 if min(a.shape[-2:]) >= 11 else (min(a.shape[-2:]) // 2) * 2 - 1
    return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel))


def lpips_available(net: str = "alex") -> bool:
    """True when LPIPS' backbone weights are in the torch hub cache (they cannot be downloaded offline)."""
    names = {"alex": "alexnet-owt-", "vgg": "vgg16-", "squeeze": "squeezenet1_1-"}
    ckpt = os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.isdir(ckpt) and any(f.startswith(names[net]) for f in os.listdir(ckpt))


def lpips(images, reference, net: str = "alex") -> float | None:
    """Mean LPIPS (torchmetrics) or None when the backbone weights are not available offline."""
    if not lpips_available(net):
        return None
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    a, b = _pair(images, reference, "LPIPS")
    return float(learned_perceptual_image_patch_similarity(a.float(), b.float(), net_type=net, normalize=True))


def fidelity_metrics(images, reference) -> dict[str, float | None]:
    """PSNR, SSIM and (when available) LPIPS of ``images`` against ``reference``."""
    value = psnr(images, reference)
    return {
        "psnr_vs_reference": value if np.isfinite(value) else float("inf"),
        "ssim_vs_reference": ssim(images, reference),
        "lpips_vs_reference": lpips(images, reference),
    }
