"""Observation pass: replay recorded denoiser calls and turn activation statistics into ranges."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dmquant.calibration.records import CalibrationSet
from dmquant.nn.wrap import activation_quantizers, set_activation_mode


@torch.no_grad()
def observe_activations(denoiser: torch.nn.Module, calib: CalibrationSet, progress: bool = True) -> int:
    """Estimate static activation ranges of ``denoiser`` on ``calib``; returns the number of calls replayed."""
    param = next(denoiser.parameters())
    set_activation_mode(denoiser, "observe")
    count = 0
    try:
        for args, kwargs in tqdm(calib.iter_calls(param.device, param.dtype),
                                 desc="calibration: observing activations", disable=not progress):
            denoiser(*args, **kwargs)
            count += 1
        for quantizer in activation_quantizers(denoiser):
            quantizer.finalize()
    except BaseException:
        set_activation_mode(denoiser, "off")
        raise
    set_activation_mode(denoiser, "quant")
    return count
