"""Freeze: turn a calibrated simulation into real low-bit storage (and integer compute where possible)."""

from __future__ import annotations

import torch

from dmquant.models.adapters import find_denoiser
from dmquant.nn.int_layers import IntConv2d, IntLinear, _IntLayer, freeze_layer
from dmquant.nn.wrap import _set_submodule, quant_layers


def freeze_denoiser(denoiser: torch.nn.Module) -> int:
    """Replace every simulated quantized layer by its frozen twin, in place; returns how many."""
    from dmquant.nn.timestep import install_timestep_hook, time_tables

    layers = quant_layers(denoiser)
    for name, layer in layers:
        _set_submodule(denoiser, name, freeze_layer(layer))
    if time_tables(denoiser):  # the frozen layers read the same timestep state
        install_timestep_hook(denoiser)
    return len(layers)


def freeze(pipe):
    """Freeze the pipeline's denoiser in place (int8 / packed int4 weights); returns the pipeline."""
    _, denoiser, _ = find_denoiser(pipe)
    freeze_denoiser(denoiser)
    info = getattr(pipe, "dmquant", None)
    if info is not None:
        info.frozen = True
    return pipe


def frozen_layers(model: torch.nn.Module) -> list[tuple[str, _IntLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (IntLinear, IntConv2d))]
