"""A cheap proxy of a layer's quantization error, for mixed precision's ``measure: anchored``.

A layer whose weight ``W`` is replaced by ``Q(W)`` changes its output by ``(W - Q(W)) x``; with the input's
channels taken as uncorrelated, the mean square of that change is ``sum_ij (W - Q(W))_ij^2 E[x_j^2]``
(:func:`weight_proxy`; a conv's kernel positions share their input channel's mean square). The proxy needs
no denoiser call per format, only each layer's per-channel input mean square (:func:`record_input_moments`,
recorded once while the reference outputs are computed). It ranks one layer's formats as the measured
output error does; across layers it misses how much each layer's output matters to the denoiser's, which
the anchored mode measures once per layer (see :mod:`dmquant.calibration.mixed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _channel_mean_square(x: torch.Tensor, conv: bool) -> torch.Tensor:
    x = x.detach().float()
    if conv:  # [B, C, H, W]
        return x.pow(2).mean(dim=(0, 2, 3))
    return x.reshape(-1, x.shape[-1]).pow(2).mean(0)


@contextlib.contextmanager
def record_input_moments(denoiser: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While the block runs, every call of the named layers adds to their per-input-channel mean square; the
    yielded dict holds, once the block ends, ``name -> mean over the calls`` (layers never called are absent)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    moments: dict[str, torch.Tensor] = {}

    def hook(name: str, conv: bool):
        def fn(module, args):
            m = _channel_mean_square(args[0], conv)
            sums[name] = sums[name] + m if name in sums else m
            counts[name] = counts.get(name, 0) + 1
        return fn

    handles = []
    for n in names:
        module = denoiser.get_submodule(n)
        handles.append(module.register_forward_pre_hook(hook(n, module.weight.dim() == 4)))
    try:
        yield moments
    finally:
        for h in handles:
            h.remove()
    moments.update({n: sums[n] / counts[n] for n in sums})


def weight_proxy(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """``sum (W - approx)^2 * E[x_in^2]`` (one mean square per input channel; a grouped conv, whose kernel rows
    see different channels, takes their average)."""
    d2 = (weight - approx).float().pow(2)
    if d2.dim() == 4:
        d2 = d2.sum(dim=(2, 3))
    scale = moment[None, :] if d2.shape[1] == moment.numel() else moment.mean()
    return float((d2 * scale).sum())
