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


def _sylvester(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester-Hadamard matrix (``n`` a power of two), entries +-1."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def _block(n: int) -> int:
    """The size of the rotation's diagonal blocks: the largest power of two dividing ``n`` (at least 2)."""
    block = n & -n
    if block < 2:
        raise DMQuantError(f"a Hadamard rotation needs an even dimension, got {n}: exclude the layer")
    return block


def hadamard(n: int, seed: int | None = 0, device=None) -> torch.Tensor:
    """An orthogonal ``n x n`` matrix: block-diagonal Sylvester-Hadamard blocks (the largest power of
    two dividing ``n``), scaled to be orthonormal, times random signs on the rows when ``seed`` is set."""
    block = _block(n)
    h = torch.block_diag(*([_sylvester(block) / math.sqrt(block)] * (n // block)))
    if seed is not None:
        h = _signs(n, seed)[:, None] * h
    return h.to(device)


def hadamard_factors(n: int, seed: int | None = 0) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The parts of :func:`hadamard` that :func:`rotate` multiplies with: the row signs (None without a seed) and
    two orthonormal Sylvester matrices ``A [a, a]``, ``C [c, c]`` whose Kronecker product ``A ⊗ C`` is one
    diagonal block of the rotation (``a·c`` = the largest power of two dividing ``n``, ``a <= c``)."""
    block = _block(n)
    a = 1 << ((block.bit_length() - 1) // 2)
    c = block // a
    return (None if seed is None else _signs(n, seed)), _sylvester(a) / math.sqrt(a), _sylvester(c) / math.sqrt(c)


ROTATE_CHUNK = 1 << 21  # values per slice of rows: temporaries stay below glibc's mmap threshold (no fresh pages per call)


def rotate(x: torch.Tensor, factors: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor],
           chunk: int = ROTATE_CHUNK) -> torch.Tensor:
    """``x @ hadamard(n, seed)`` over the last dimension, given ``hadamard_factors(n, seed)`` (on ``x``'s device
    and dtype): each block ``z`` of ``a·c`` channels, viewed as an ``a x c`` matrix, becomes ``A·z·C``
    (``A ⊗ C`` is symmetric). Two products with ``sqrt(block)``-sized matrices, ``2·sqrt(block)``
    multiply-adds per channel instead of the dense product's ``n``; rows go ``chunk`` values at a time."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    step = max(1, chunk // n)
    if rows.shape[0] <= step:
        return _rotate_rows(rows, factors).reshape(x.shape)
    return torch.cat([_rotate_rows(part, factors) for part in rows.split(step)]).reshape(x.shape)


def _rotate_rows(rows: torch.Tensor, factors) -> torch.Tensor:
    signs, a, c = factors
    z = rows if signs is None else rows * signs
    z = z.reshape(rows.shape[0], -1, a.shape[0], c.shape[0])
    return torch.matmul(a, z).matmul(c).reshape(rows.shape)


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
