"""The quantized tensor: integer codes (int8, int4 packed two per byte, or 2/3/5/6/7-bit codes packed
densely, ``bitpack``: :mod:`dmquant.kernels.bitpack`) or float8 e4m3 codes
(packing ``fp8_e4m3``: a ``torch.float8_e4m3fn`` buffer, saved by safetensors as F8_E4M3), scales,
zero points, and the facts needed to read them (bits, granularity, group size, shape, packing).

It is a module so that its tensors are buffers of the layer that holds it (``state_dict``, ``.to``).
``spec()`` is its JSON description; ``QuantizedTensor.from_spec`` rebuilds an empty one (on the meta
device when loading) that a state dict then fills. Kernels read ``qdata``/``scale`` directly or take
``int8()`` (integer packings) / ``codes()`` / ``dequantize()``. Float8 codes stay float8 through
``module.to(dtype)`` (which would otherwise cast every floating buffer).

Scales and zero points are stored in float32 or, with ``scale_dtype="float16"`` (the spec's
``scale_dtype``; a description without it is float32, as every folder written before it), in float16:
2 bytes each; they stay float16 through ``module.to(dtype)``, and every reader casts them to the dtype it
computes in (:meth:`dequantize`, :meth:`channel_scales` gives float32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.kernels.bitpack import PACKED_BITS, pack_bits, packed_row_bytes, unpack_bits
from dmquant.kernels.int4 import pack_int4, unpack_int4
from dmquant.quantizers.affine import SCALE_DTYPES, scale_dtype_named

PACKINGS = ("int8", "int4x2", "bitpack", "fp8_e4m3")
FLOAT8 = torch.float8_e4m3fn
SPEC_KEYS = ("shape", "bits", "granularity", "group_size", "symmetric", "packing")


def int_packing(bits: int, row_len: int) -> str:
    """How integer codes of ``bits`` bits in rows of ``row_len`` are stored: two int4 codes per byte (4 bits,
    even rows), densely packed (2, 3, 5, 6, 7 bits), else one byte per code."""
    if bits == 4 and row_len % 2 == 0:
        return "int4x2"
    return "bitpack" if bits in PACKED_BITS else "int8"


def weight_storage_bytes(shape, bits: int, granularity: str, group_size: int | None, symmetric: bool,
                         scale_dtype: str = "float32") -> int:
    """Bytes a :class:`QuantizedTensor` of these facts holds (codes, scales and zero points in
    ``scale_dtype``), without building it: what mixed-precision allocation budgets with."""
    out, cols = int(shape[0]), math.prod(int(s) for s in shape[1:])
    packing = int_packing(bits, cols)
    code_bytes = {"int4x2": out * cols // 2, "bitpack": out * packed_row_bytes(cols, bits)}.get(packing, out * cols)
    rows = {"tensor": 1, "channel": out, "group": out * cols // (group_size or 1)}[granularity]
    return code_bytes + scale_dtype_named(scale_dtype).itemsize * rows * (1 if symmetric else 2)


class QuantizedTensor(nn.Module):
    def __init__(self, shape, bits: int, granularity: str, group_size: int | None, symmetric: bool,
                 packing: str, device: str | torch.device = "cpu", scale_dtype: str = "float32"):
        super().__init__()
        if packing not in PACKINGS:
            raise DMQuantError(f"unknown weight packing {packing!r}: this dmquant reads {', '.join(PACKINGS)}")
        if scale_dtype not in SCALE_DTYPES:
            raise DMQuantError(f"unknown weight scale dtype {scale_dtype!r}: this dmquant reads "
                               f"{', '.join(SCALE_DTYPES)}; upgrade dmquant (or the checkpoint is damaged)")
        self.scale_dtype = scale_dtype
        sdtype = SCALE_DTYPES[scale_dtype]
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
        self.register_buffer("scale", torch.empty(rows, dtype=sdtype, device=device))
        self.register_buffer("zero_point", None if self.symmetric else torch.empty(rows, dtype=sdtype, device=device))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   granularity: str, group_size: int | None, symmetric: bool,
                   scale_dtype: str = "float32") -> QuantizedTensor:
        """Store integer ``codes`` (shaped like the weight) with one scale (and zero point) per row, in
        ``scale_dtype``; float8 ``codes`` (dtype ``float8_e4m3fn``, symmetric) are stored as they are. A
        quantizer with float16 scales has already rounded them: the cast to float16 is exact."""
        if codes.dtype == FLOAT8:
            if not symmetric or bits != 8:
                raise DMQuantError("float8 e4m3 codes are 8-bit and symmetric: the weight quantizer is inconsistent")
            qt = cls(codes.shape, 8, granularity, group_size, True, "fp8_e4m3", codes.device, scale_dtype)
            qt.qdata = codes.reshape(codes.shape[0], -1).contiguous()
        else:
            matrix = codes.reshape(codes.shape[0], -1).to(torch.int8)
            packing = int_packing(bits, matrix.shape[1])
            qt = cls(codes.shape, bits, granularity, group_size, symmetric, packing, codes.device, scale_dtype)
            qt.qdata = {"int4x2": pack_int4, "bitpack": lambda m: pack_bits(m, bits)}.get(
                packing, torch.Tensor.contiguous)(matrix)
        sdtype = SCALE_DTYPES[scale_dtype]
        qt.scale = scale.detach().to(sdtype).reshape(-1).clone()
        if not qt.symmetric:
            qt.zero_point = zero_point.detach().to(sdtype).reshape(-1).clone()
        return qt

    @classmethod
    def from_spec(cls, spec: dict, device="meta") -> QuantizedTensor:
        missing = [k for k in SPEC_KEYS if k not in spec]
        if missing:
            raise DMQuantError(f"quantized weight description lacks {missing}: the checkpoint is damaged; save it again")
        return cls(*(spec[k] for k in SPEC_KEYS), device=device, scale_dtype=spec.get("scale_dtype", "float32"))

    def spec(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size, "symmetric": self.symmetric, "packing": self.packing,
                "scale_dtype": self.scale_dtype}

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

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """The real-valued weight ``scale * (q - zero_point)``, computed row by row (float8 codes read
        back exactly in ``dtype``: the product is rounded once, as the simulation rounds it); ``rows``: only
        these output channels (a slice of step 1), shaped ``[len(rows), in_features...]``."""
        codes, scale, zero, shape = self.codes().reshape(self.shape[0], -1), self.scale.reshape(-1), None, self.shape
        if not self.symmetric:
            zero = self.zero_point.reshape(-1)
        if rows is not None:
            start, stop, _ = rows.indices(self.shape[0])
            per_row = {"tensor": 0, "channel": 1, "group": codes.shape[1] // (self.group_size or 1)}[self.granularity]
            if per_row:
                scale = scale[start * per_row:stop * per_row]
                zero = None if zero is None else zero[start * per_row:stop * per_row]
            codes, shape = codes[start:stop], (stop - start, *self.shape[1:])
        row_len = {"tensor": max(codes.numel(), 1), "channel": codes.shape[1], "group": self.group_size}[self.granularity]
        codes = codes.reshape(-1, row_len)  # (an empty slice of a per-tensor weight: no row)
        if zero is None and not codes.is_floating_point():  # one kernel: the integer codes are read as dtype
            return torch.mul(codes, scale.to(dtype)[:, None]).reshape(shape)
        values = codes.to(dtype)
        if zero is not None:
            values = values - zero.to(dtype)[:, None]
        return (values * scale.to(dtype)[:, None]).reshape(shape)

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
        """One float32 scale per output channel (per-tensor and per-channel granularity)."""
        scale = self.scale.float()
        return scale.expand(self.shape[0]) if self.granularity == "tensor" else scale

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` casts every floating buffer, float8 ones too: float8 codes are cast back (exactly,
        each float8 value is a float16, bfloat16 and float32 value); float16 scales and zero points keep
        their stored values (moved, not cast: a bfloat16 cast would round them)."""
        kept = {}
        if self.scale_dtype != "float32":
            kept = {n: b for n, b in (("scale", self.scale), ("zero_point", self.zero_point)) if b is not None}
        super()._apply(fn, recurse)
        if self.is_float8 and self.qdata.dtype != FLOAT8:
            self.qdata = self.qdata.to(FLOAT8)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        scales = "" if self.scale_dtype == "float32" else f", {self.scale_dtype} scales"
        return f"shape={self.shape}, bits={self.bits}, {self.granularity}, packing={self.packing}{scales}"
