"""Observation pass: replay recorded denoiser calls and turn activation statistics into ranges."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from dmquant.nn.wrap import activation_quantizers, release_unrouted_attention, set_activation_mode


@torch.no_grad()
def observe_activations(denoiser: torch.nn.Module, calls: Iterable[tuple[tuple, dict]], progress: bool = True) -> int:
    """Estimate static activation ranges of ``denoiser`` from ``(args, kwargs)`` calls; returns how many ran."""
    set_activation_mode(denoiser, "observe")
    count = 0
    try:
        for args, kwargs in tqdm(calls,
                                 desc="calibration: observing activations", disable=not progress):
            denoiser(*args, **kwargs)
            count += 1
        release_unrouted_attention(denoiser)
        for quantizer in activation_quantizers(denoiser):
            quantizer.finalize()
    except BaseException:
        set_activation_mode(denoiser, "off")
        raise
    set_activation_mode(denoiser, "quant")
    return count
