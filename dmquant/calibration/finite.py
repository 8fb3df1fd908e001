"""Non-finite values (NaN, Inf) found during calibration, named by layer and tensor, instead of saved.

A NaN or Inf in the full-precision weights, or in the activations the calibration observes, would
otherwise give NaN scales that are saved and fail only at generation time.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.nn.wrap import quant_layers


def _bad(t: torch.Tensor) -> str | None:
    if not t.is_floating_point() or t.is_meta or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    return f"{nan} NaN and {t.numel() - nan - int(torch.isfinite(t).sum())} Inf values"


@torch.no_grad()
def check_finite_weights(denoiser: nn.Module) -> None:
    """DMQuantError naming the first weight of ``denoiser`` that holds NaN or Inf."""
    for name, tensor in chain(denoiser.named_parameters(), denoiser.named_buffers()):
        bad = _bad(tensor)
        if bad:
            raise DMQuantError(f"the model's tensor {name} holds {bad}: the full-precision model is damaged; "
                               "load an intact copy before quantizing")


@torch.no_grad()
def check_finite_quantizers(denoiser: nn.Module, phase: str) -> None:
    """DMQuantError naming the first quantized layer whose scales, zero points or weights became NaN/Inf."""
    for layer_name, layer in quant_layers(denoiser):
        for name, tensor in chain(layer.named_parameters(), layer.named_buffers()):
            bad = _bad(tensor)
            if bad:
                raise DMQuantError(
                    f"calibration ({phase} phase) gave layer {layer_name} non-finite values in {name} ({bad}): its "
                    "inputs or weights overflow or hold NaN/Inf; check the model and the calibration prompts, or "
                    f"keep the layer in full precision (recipe: exclude: ['{layer_name}'])")
