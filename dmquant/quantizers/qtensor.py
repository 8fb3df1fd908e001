"""The quantized tensor: integer codes (int8, int4 packed two per byte, or 2/3/5/6/7-bit codes packed
densely, ``bitpack``: :mod:`dmquant.kernels.bitpack`) or float8 e4m3 codes
(packing ``fp8_e4m3``: a ``torch.float8_e4m3fn`` buffer, saved by safetensors as F8_E4M3), scales,
zero points, and the facts needed to read them (bits, granularity, group size, shape, packing).

It is a module so that its tensors are buffers of the layer that holds it (``state_dict``, ``.to``).
``spec()`` is its JSON description; ``QuantizedTensor.from_spec`` rebuilds an empty one (on the meta
device when loading) that a state dict then fills. Kernels read ``qdata``/``scale`` directly or take
``int8()`` (integer packings) / ``codes()`` / ``dequantize()``. Float8 codes stay float8 through
``module.to(dtype)`` (which would otherwise cast every floating buffer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.kernels.bitpack import PACKED_BITS, pack_bits, packed_row_bytes, unpack_bits
from dmquant.kernels.int4 import pack_int4, unpack_int4

PACKINGS = ("int8", "int4x2", "bitpack", "fp8_e4m3")
FLOAT8 = torch.float8_e4m3fn
SPEC_KEYS = ("shape", "bits", "granularity", "group_size", "symmetric", "packing")


def int_packing(bits: int, row_len: int) -> str:
    """How integer codes of ``bits`` bits in rows of ``row_len`` are stored: two int4 codes per byte (4 bits,
    even rows), densely packed (2, 3, 5, 6, 7 bits), else one byte per code."""
    if bits == 4 and row_len % 2 == 0:
        return "int4x2"
    return "bitpack" if bits in PACKED_BITS else "int8"


def weight_storage_bytes(shape, bits: int, granularity: str, group_size: int | None, symmetric: bool) -> int:
    """Bytes a :class:`QuantizedTensor` of these facts holds (codes, float32 scales and zero points), without
    building it: what mixed-precision allocation budgets with."""
    out, cols = int(shape[0]), math.prod(int(s) for s in shape[1:])
    packing = int_packing(bits, cols)
    code_bytes = {"int4x2": out * cols // 2, "bitpack": out * packed_row_bytes(cols, bits)}.get(packing, out * cols)
    rows = {"tensor": 1, "channel": out, "group": out * cols // (group_size or 1)}[granularity]
    return code_bytes + 4 * rows * (1 if symmetric else 2)


class QuantizedTensor(nn.Module):
    def __init__(self, shape, bits: int, granularity: str, group_size: int | None, symmetric: bool,
                 packing: str, device: str | torch.device = "cpu"):
        super().__init__()
        if packing not in PACKINGS:
            raise DMQuantError(f"unknown weight packing {packing!r}: this dmquant reads {', '.join(PACKINGS)}")
        self.shape, self.bits, self.granularity = tuple(int(s) for s in shape), int(bits), granularity
        self.group_size, self.symmetric, self.packing = group_size, bool(symmetric), packing
        out, cols = self.shape[0], math.prod(self.shape[1:])
        rows = {"tensor": 1, "channel": out, "group": out * cols // (group_size or 1)}[granularity]
        if packing == "bitpack" and self.bits not in PACKED_BITS:
            raise DMQuantError(f"packing 'bitpack' holds {PACKED_BITS}-bit codes, not {self.bits}: the checkpoint "
                               "is damaged; save it again")
        data_shape = {"int4x2": (out, cols // 2),
                      "bitpack": (out, packed_row_bytes(cols, self.bits))}.get(packing, (out, cols))
        data_dtype = {"int4x2": torch.uint8, "bitpack": torch.uint8, "int8": torch.int8, "fp8_e4m3": FLOAT8}[packing]
        self.register_buffer("qdata", torch.empty(data_shape, dtype=data_dtype, device=device))
        self.register_buffer("scale", torch.empty(rows, device=device))
        self.register_buffer("zero_point", None if self.symmetric else torch.empty(rows, device=device))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   granularity: str, group_size: int | None, symmetric: bool) -> QuantizedTensor:
        """Store integer ``codes`` (shaped like the weight) with one scale (and zero point) per row; float8
        ``codes`` (dtype ``float8_e4m3fn``, symmetric) are stored as they are."""
        if codes.dtype == FLOAT8:
            if not symmetric or bits != 8:
                raise DMQuantError("float8 e4m3 codes are 8-bit and symmetric: the weight quantizer is inconsistent")
            qt = cls(codes.shape, 8, granularity, group_size, True, "fp8_e4m3", codes.device)
            qt.qdata = codes.reshape(codes.shape[0], -1).contiguous()
            qt.scale = scale.detach().float().reshape(-1).clone()
            return qt
        matrix = codes.reshape(codes.shape[0], -1).to(torch.int8)
        packing = int_packing(bits, matrix.shape[1])
        qt = cls(codes.shape, bits, granularity, group_size, symmetric, packing, codes.device)
        qt.qdata = {"int4x2": pack_int4, "bitpack": lambda m: pack_bits(m, bits)}.get(
            packing, torch.Tensor.contiguous)(matrix)
        qt.scale = scale.detach().float().reshape(-1).clone()
        if not symmetric:
            qt.zero_point = zero_point.detach().float().reshape(-1).clone()
        return qt

    @classmethod
    def from_spec(cls, spec: dict, device="meta") -> QuantizedTensor:
        missing = [k for k in SPEC_KEYS if k not in spec]
        if missing:
            raise DMQuantError(f"quantized weight description lacks {missing}: the checkpoint is damaged; save it again")
        return cls(*(spec[k] for k in SPEC_KEYS), device=device)

    def spec(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size, "symmetric": self.symmetric, "packing": self.packing}

    @property
    def is_float8(self) -> bool:
        return self.packing == "fp8_e4m3"

    def int8(self) -> torch.Tensor:
        """Integer codes as int8, shaped ``[out, in_features...]`` like the weight."""
        if self.is_float8:
            raise DMQuantError("float8 weights have no integer codes: read codes() or dequantize()")
        return self.codes()

    def codes(self) -> torch.Tensor:
        """The codes, unpacked (int8, or float8_e4m3fn), shaped ``[out, in_features...]`` like the weight."""
        if self.packing == "int4x2":
            codes = unpack_int4(self.qdata)
        elif self.packing == "bitpack":
            codes = unpack_bits(self.qdata, self.bits, math.prod(self.shape[1:]))
        else:
            codes = self.qdata
        return codes.reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real-valued weight ``scale * (q - zero_point)``, computed row by row (float8 codes read
        back exactly in ``dtype``: the product is rounded once, as the simulation rounds it)."""
        codes = self.codes().reshape(self.shape[0], -1)
        row_len = {"tensor": codes.numel(), "channel": codes.shape[1], "group": self.group_size}[self.granularity]
        rows = codes.reshape(-1, row_len).to(dtype)
        if not self.symmetric:
            rows = rows - self.zero_point.to(dtype)[:, None]
        return (rows * self.scale.to(dtype)[:, None]).reshape(self.shape)

    @property
    def per_channel_symmetric(self) -> bool:
        """Whether integer kernels can use it directly (integer codes, one scale per output channel, no
        zero point)."""
        return self.symmetric and self.granularity in ("channel", "tensor") and not self.is_float8

    @property
    def float8_per_channel(self) -> bool:
        """Whether float8 GEMMs can use it directly (float8 codes, one scale per output channel)."""
        return self.is_float8 and self.granularity in ("channel", "tensor")

    def channel_scales(self) -> torch.Tensor:
        return self.scale.expand(self.shape[0]) if self.granularity == "tensor" else self.scale

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` casts every floating buffer, float8 ones too: float8 codes are cast back (exactly,
        each float8 value is a float16, bfloat16 and float32 value)."""
        super()._apply(fn, recurse)
        if self.is_float8 and self.qdata.dtype != FLOAT8:
            self.qdata = self.qdata.to(FLOAT8)
        return self

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, {self.granularity}, packing={self.packing}"
