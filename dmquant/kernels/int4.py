"""Signed int4 weights: packing two values per byte, and per-group symmetric quantization.

Layout (also the on-disk layout): a weight ``[N, K]`` (output features, input features) is quantized
in groups of ``group_size`` consecutive input features per output row. Values are signed int4 in
two's complement. Byte ``j`` of a packed row holds input feature ``2j`` in its low nibble and
``2j + 1`` in its high nibble, so ``packed`` is ``uint8 [N, K // 2]`` and ``scales`` is
``float32 [N, K // group_size]``; the real weight is ``scales[n, k // group_size] * q[n, k]``.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
INT4_QMAX = 7  # symmetric (narrow) grid [-7, 7]; unpack accepts the full [-8, 7]
_EPS = 1e-12


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values ``[..., K]`` (an integer tensor in [-8, 7], K even) into ``uint8 [..., K/2]``."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    nibbles = q.to(torch.int16) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., K/2]`` -> ``int8 [..., K]`` with values in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    wide = packed.to(torch.int16)
    low, high = wide & 0xF, wide >> 4
    pair = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(pair >= 8, pair - 16, pair).to(torch.int8)


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group symmetric int4 quantization of ``weight [N, K]``.

    Returns ``(packed uint8 [N, K/2], scales float32 [N, K/group_size])`` with
    ``scale = max|w_group| / 7`` and ``q = clamp(round(w / scale), -7, 7)``.
    """
    n, k = _check_weight(weight, group_size)
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    scales = groups.abs().amax(dim=-1).clamp_min(_EPS) / INT4_QMAX
    q = torch.round(groups / scales[..., None]).clamp(-INT4_QMAX, INT4_QMAX).to(torch.int8)
    return pack_int4(q.reshape(n, k)), scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real weight ``[N, K]`` from :func:`quantize_int4`'s output."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    group_size = k // scales.shape[-1]
    w = q.reshape(n, -1, group_size) * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


def _check_weight(weight: torch.Tensor, group_size: int) -> tuple[int, int]:
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if group_size % 2 or k % group_size:
        raise ValueError(f"K={k} must be a multiple of the (even) group size {group_size}")
    return n, k
