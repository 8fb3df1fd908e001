"""The quantized tensor: integer codes (int8, or int4 packed two per byte) or float8 e4m3 codes
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
from dmquant.kernels.int4 import pack_int4, unpack_int4

PACKINGS = ("int8", "int4x2", "fp8_e4m3")
FLOAT8 = torch.float8_e4m3fn
SPEC_KEYS = ("shape", "bits", "granularity", "group_size", "symmetric", "packing")


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
        data_shape = (out, cols // 2) if packing == "int4x2" else (out, cols)
        data_dtype = {"int4x2": torch.uint8, "int8": torch.int8, "fp8_e4m3": FLOAT8}[packing]
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
        packing = "int4x2" if bits <= 4 and matrix.shape[1] % 2 == 0 else "int8"
        qt = cls(codes.shape, bits, granularity, group_size, symmetric, packing, codes.device)
        qt.qdata = pack_int4(matrix) if packing == "int4x2" else matrix.contiguous()
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
        codes = unpack_int4(self.qdata) if self.packing == "int4x2" else self.qdata
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
