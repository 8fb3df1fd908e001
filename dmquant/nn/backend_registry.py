"""The registry of backends: how a quantized layer computes one call. Backends are tried in order;
the first whose ``supports(layer, x)`` holds runs (a layer's ``backend`` attribute forces one by name).
``supports(layer, None)`` asks "in principle" (used when a frozen layer's kernels are prepared).

The backends themselves live in :mod:`dmquant.nn.backends` (reference, oneDNN int8, fused int4) and in
one module each for the CUDA paths; importing :mod:`dmquant.nn.backends` registers them all. The
registry knows layers only through their methods (no import of :mod:`dmquant.nn.layers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dmquant.errors import DMQuantError


@dataclass(frozen=True)
class Backend:
    name: str
    supports: Callable[[object, torch.Tensor | None], bool]  # (layer, input or None for "in principle")
    run: Callable[[object, torch.Tensor], torch.Tensor]
    prepare: Callable[[object], object] | None = None


_REGISTRY: list[Backend] = []


def register(backend: Backend, before: str | None = None) -> None:
    """Add a backend (before the one named ``before``, else ahead of ``reference``)."""
    names = [b.name for b in _REGISTRY]
    if backend.name in names:
        raise DMQuantError(f"a backend named {backend.name!r} is registered already")
    anchor = before if before in names else "reference"
    _REGISTRY.insert(names.index(anchor) if anchor in names else len(_REGISTRY), backend)


def names() -> list[str]:
    return [b.name for b in _REGISTRY]


def choose(layer, x: torch.Tensor) -> Backend:
    forced = layer.backend
    if forced != "auto" and forced not in names():
        raise DMQuantError(f"unknown backend {forced!r}: use 'auto' or one of {', '.join(names())}")
    stale = layer.kernels_stale() if hasattr(layer, "kernels_stale") else False  # prepared for another device
    for backend in _REGISTRY:
        if forced == backend.name or (forced == "auto" and not (stale and backend.prepare is not None)
                                      and backend.supports(layer, x)):
            return backend
    raise DMQuantError("no backend computes this layer")  # unreachable: 'reference' supports everything


def run(layer, x: torch.Tensor) -> torch.Tensor:
    return choose(layer, x).run(layer, x)


def prepare(layer) -> dict:
    """The prepared state of every backend that could run this (frozen) layer."""
    return {b.name: b.prepare(layer) for b in _REGISTRY if b.prepare is not None and b.supports(layer, None)}
