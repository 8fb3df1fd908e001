"""AdaRound: learned rounding of weights (up or down per weight), as functions on tensors.

``W_soft = s * (clamp(floor(W / s0) + h(V) + z, qmin, qmax) - z)`` (``s0``: the scale at the start; ``s`` may be
learned with ``V``, the integer part staying put) with the rectified sigmoid
``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``; the regulariser ``sum(1 - |2 h(V) - 1|^beta)``
pushes every ``h`` to 0 or 1, after which ``h`` is hardened (``V >= 0`` rounds up).
"""

from __future__ import annotations

import math

import torch

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding(w_over_s: torch.Tensor) -> torch.Tensor:
    """``V`` such that ``h(V)`` equals the fractional part of ``W / s`` (AdaRound starts at the weights)."""
    rest = (w_over_s - torch.floor(w_over_s)).clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def learned_codes(floor: torch.Tensor, zero: torch.Tensor, v: torch.Tensor, fmt, hard: bool = False) -> torch.Tensor:
    """Codes ``floor(W / s)`` (of the scale the rounding started from) rounded up by ``h(V)`` (``hard``: 0/1 by
    the sign of ``V``: whole numbers)."""
    h = (v >= 0).to(floor.dtype) if hard else rectified_sigmoid(v)
    return torch.clamp(floor + h + zero, fmt.qmin, fmt.qmax)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def annealed_beta(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """The regulariser's exponent at ``step`` (None during warm-up: no regularisation yet)."""
    begin = int(warmup * total)
    if step < begin:
        return None
    progress = (step - begin) / max(1, total - begin)
    return end + 0.5 * (start - end) * (1.0 + math.cos(progress * math.pi))
