"""Dense packing of signed b-bit integer codes (b = 2, 3, 5, 6, 7), for mixed-precision weights.

Layout (also the on-disk layout): each row of a code matrix ``[N, K]`` is padded with zeros to a
multiple of 8 codes; every 8 consecutive codes, offset to unsigned (``q + 2^(b-1)``), form one
little-endian word of ``8·b`` bits (code ``i`` of the 8 in bits ``[b·i, b·i + b)``), stored as ``b``
bytes. So ``packed`` is ``uint8 [N, ceil(K / 8) · b]``: a W3 weight takes 3 bits per code, a W6 one 6
(int4 keeps :mod:`dmquant.kernels.int4`'s two-per-byte layout, int8 its bytes).
"""

from __future__ import annotations

import torch

PACKED_BITS = (2, 3, 5, 6, 7)


def _check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(f"bit packing takes {PACKED_BITS} bits per code, got {bits}")


def packed_row_bytes(row_len: int, bits: int) -> int:
    """Bytes of one packed row of ``row_len`` codes."""
    return -(-row_len // 8) * bits


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit codes ``[N, K]`` (integers in ``[-2^(b-1), 2^(b-1) - 1]``) -> ``uint8 [N, ceil(K/8)·b]``."""
    _check_bits(bits)
    half = 1 << (bits - 1)
    if q.numel() and (q.min() < -half or q.max() > half - 1):
        raise ValueError(f"pack_bits values must lie in [{-half}, {half - 1}] for {bits} bits")
    n, k = q.shape
    u = torch.nn.functional.pad(q.to(torch.int64) + half, (0, (-k) % 8)).reshape(n, -1, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)  # at most 56 bits: exact in int64
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    return ((words[..., None] >> byte_shifts) & 0xFF).reshape(n, -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, row_len: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [N, ceil(K/8)·b]`` -> ``int8 [N, K]`` (``K = row_len``)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8, got {packed.dtype}")
    n = packed.shape[0]
    b = packed.to(torch.int64).reshape(n, -1, bits)
    words = (b << (torch.arange(bits, device=packed.device, dtype=torch.int64) * 8)).sum(-1)
    codes = (words[..., None] >> (torch.arange(8, device=packed.device, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return (codes.reshape(n, -1)[:, :row_len] - (1 << (bits - 1))).to(torch.int8)
