"""Outlier handling as tensor functions: SmoothQuant-style channel balancing, randomized Hadamard
rotation, and the SVD low-rank split of SVDQuant.

Conventions: a linear layer computes ``y = x @ W.T`` with ``W [out, in]``; everything here acts on the
input dimension ``in`` and leaves the layer's full-precision output unchanged.
"""

from __future__ import annotations

import math

import torch

from dmquant.errors import DMQuantError


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5,
                      eps: float = 1e-5) -> torch.Tensor:
    """Per-input-channel factors ``s_j = max|X_j|^α / max|W_j|^(1-α)``; use ``x / s`` and ``W * s``.

    ``weight`` is ``[out, in]`` or a conv weight ``[out, in, kh, kw]`` (``max|W_j|`` over all its taps)."""
    if not 0.0 <= alpha <= 1.0:
        raise DMQuantError(f"smoothing alpha={alpha} must lie in [0, 1] (0.5 is SmoothQuant's default)")
    w_absmax = weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1).clamp_min(eps)
    a = act_absmax.detach().float().clamp_min(eps)
    if a.shape != w_absmax.shape:
        raise DMQuantError(f"smoothing needs one activation maximum per input channel ({w_absmax.numel()}), "
                           f"got {a.numel()}: smoothing applies to linear layers and convolutions with groups=1")
    s = a.pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s.clamp_min(eps)


def hadamard(n: int, seed: int | None = 0, device=None) -> torch.Tensor:
    """An orthogonal ``n x n`` matrix: block-diagonal Sylvester-Hadamard blocks (the largest power of
    two dividing ``n``), scaled to be orthonormal, times random signs on the rows when ``seed`` is set."""
    block = n & -n  # largest power of two dividing n
    if block < 2:
        raise DMQuantError(f"a Hadamard rotation needs an even dimension, got {n}: exclude the layer")
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = torch.block_diag(*([h / math.sqrt(block)] * (n // block)))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        h = signs[:, None] * h
    return h.to(device)


def svd_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W ≈ L1 @ L2 + R``: ``L1 [out, r]``, ``L2 [r, in]`` hold the ``rank`` largest singular directions,
    ``R`` is the residual (what gets quantized). ``W`` may be a conv weight (its matrix view is used)."""
    matrix = weight.detach().reshape(weight.shape[0], -1).double()
    max_rank = min(matrix.shape)
    if not 0 <= rank <= max_rank:
        raise DMQuantError(f"rank={rank} is larger than this layer allows ({max_rank} = min(out, in)): "
                           "lower the rank or exclude the layer")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    l1, l2 = u[:, :rank] * root, root[:, None] * vh[:rank]
    residual = matrix - l1 @ l2
    dtype = weight.dtype
    return l1.to(dtype), l2.to(dtype), residual.to(dtype).reshape(weight.shape)
