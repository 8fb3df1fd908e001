"""Range estimation: the clipping range ``[lo, hi]`` of each row (see granularity.py).

``minmax`` keeps every value; ``percentile`` clips to the p-th and (100-p)-th percentiles;
``mse`` searches a grid of shrinking ratios of the min-max range for the one whose fake-quantized
rows have the smallest error (the Lp norm with ``p_norm``; 2.0 is the mean squared error).
"""

from __future__ import annotations

import torch

from dmquant.errors import DMQuantError
from dmquant.formats import IntFormat
from dmquant.quantizers.affine import fake_quant, qparams_from_range

RANGE_METHODS = ("minmax", "mse", "percentile")


def minmax_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.amin(dim=1), rows.amax(dim=1)


def percentile_range(rows: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(100 - p)``-th and ``p``-th percentiles (order statistics, no interpolation)."""
    if not 50.0 < percentile <= 100.0:
        raise DMQuantError(f"percentile={percentile} must lie in (50, 100], e.g. 99.9")
    n = rows.shape[1]
    k_hi = max(1, min(n, int(round(percentile / 100.0 * n))))
    k_lo = max(1, n + 1 - k_hi)
    lo = rows.kthvalue(k_lo, dim=1).values
    hi = rows.kthvalue(k_hi, dim=1).values
    return lo, hi


def mse_range(
    rows: torch.Tensor,
    fmt: IntFormat,
    symmetric: bool,
    num_candidates: int = 40,
    min_ratio: float = 0.2,
    p_norm: float = 2.0,
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale_dtype: torch.dtype | None = None,
    tails: torch.Tensor | None = None,
    sample_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range minimising the fake-quantization error over shrinking ratios.

    ``extremes`` gives the full range to shrink from when ``rows`` is only a sample of the data;
    ``scale_dtype`` the dtype the scales will be rounded to (each ratio is judged with its rounded scale);
    ``tails`` (one row per row of ``rows``) are values counted exactly, each value of ``rows`` then standing for
    ``sample_weight`` values (a stratified sample: :meth:`RangeObserver.strata`).
    """
    lo, hi = extremes if extremes is not None else minmax_range(rows)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for ratio in torch.linspace(1.0, min_ratio, num_candidates).tolist():
        c_lo, c_hi = lo * ratio, hi * ratio
        scale, zero = qparams_from_range(c_lo, c_hi, fmt, symmetric, scale_dtype)
        approx = fake_quant(rows, scale[:, None], zero[:, None], fmt)
        err = (approx - rows).abs().pow(p_norm).sum(dim=1)
        if tails is not None:
            exact = fake_quant(tails, scale[:, None], zero[:, None], fmt)
            err = sample_weight * err + (exact - tails).abs().pow(p_norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def estimate_range(
    rows: torch.Tensor,
    method: str,
    fmt: IntFormat,
    symmetric: bool,
    percentile: float = 99.99,
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to one of :data:`RANGE_METHODS` (``scale_dtype``: see :func:`mse_range`)."""
    rows = rows.float()
    if method == "minmax":
        return extremes if extremes is not None else minmax_range(rows)
    if method == "percentile":
        return percentile_range(rows, percentile)
    if method == "mse":
        return mse_range(rows, fmt, symmetric, extremes=extremes, scale_dtype=scale_dtype)
    raise DMQuantError(f"unknown range method {method!r}: use one of {', '.join(RANGE_METHODS)}")
