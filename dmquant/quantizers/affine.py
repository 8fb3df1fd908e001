"""Affine quantization math (Eq. 1 and 2 of the field), as functions on tensors.

``x_int = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = s * (x_int - z)``.
``scale`` and ``zero_point`` broadcast against ``x``. ``fake_quant`` passes gradients straight
through the rounding (STE) to ``x`` inside the clipping range and to ``scale`` (LSQ-style), so later
stages can learn scales and rounding.

An 8-bit float format (:class:`~dmquant.formats.FloatFormat`) takes the same functions: its scale is
``amax / max`` (no zero point), its codes are ``float8(clamp(x / s, -max, max))`` (the division in
float32, so 16-bit inputs give the codes a GPU kernel computes from them) and ``x_hat = code * s``.

Scales are computed in float32; a quantizer whose scales are stored in float16 (``scale_dtype``,
:data:`SCALE_DTYPES`) rounds them to float16 *before* its codes are computed (:func:`round_scale`), so
the stored scales are exactly the ones the simulation used.
"""

from __future__ import annotations

import warnings

import torch

from dmquant.errors import DMQuantError
from dmquant.formats import FloatFormat, IntFormat, is_float

_EPS = 1e-12
_FUSED_QUANTIZE = hasattr(torch, "quantize_per_tensor")
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # how stored weight scales are kept


def scale_dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a scale dtype's name (``"float32"`` or ``"float16"``)."""
    if name not in SCALE_DTYPES:
        raise DMQuantError(f"unknown scale dtype {name!r}: use one of {', '.join(SCALE_DTYPES)}")
    return SCALE_DTYPES[name]


def round_scale(scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``scale`` rounded to the nearest value of ``dtype`` (kept in ``scale``'s own dtype), within its
    positive finite range (at least its smallest subnormal, so a scale never rounds to 0); ``None`` or
    float32 leave it as it is."""
    if dtype is None or dtype == torch.float32:
        return scale
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # the smallest subnormal
    return scale.clamp(tiny, info.max).to(dtype).to(scale.dtype)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat | FloatFormat, symmetric: bool,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` onto the grid of ``fmt``.

    Symmetric: ``s = max(|lo|, |hi|) / qmax`` (signed grid) with ``z = 0``; for an unsigned grid
    symmetric means ``z`` at the grid's middle. Asymmetric: ``s = (hi - lo) / (qmax - qmin)``,
    ``z = qmin - round(lo / s)``. The range always includes 0 so that zero is exact. A float format is
    always symmetric: ``s = max(|lo|, |hi|) / max`` in float32, ``z = 0``. ``scale_dtype`` (float16)
    rounds ``s`` to that dtype (:func:`round_scale`) before the zero point is computed from it.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if is_float(fmt):
        scale = round_scale((torch.maximum(-lo, hi).float() / fmt.max).clamp_min(_EPS), scale_dtype)
        return scale, torch.zeros_like(scale)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        if fmt.signed:
            scale = round_scale((amax / fmt.qmax).clamp_min(_EPS), scale_dtype)
            zero = torch.zeros_like(scale)
        else:
            scale = round_scale((2 * amax / (fmt.qmax - fmt.qmin)).clamp_min(_EPS), scale_dtype)
            zero = torch.full_like(scale, float((fmt.qmax + fmt.qmin + 1) // 2))
    else:
        scale = round_scale(((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(_EPS), scale_dtype)
        zero = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             fmt: IntFormat | FloatFormat) -> torch.Tensor:
    """Integer codes of ``x`` (returned as a float tensor of whole numbers in ``[qmin, qmax]``); for a
    float format the float8 codes, read back into ``x``'s dtype (exactly: every float8 value is a
    float16 and a bfloat16)."""
    if is_float(fmt):
        return float8_codes(x, scale, fmt).to(x.dtype)
    return torch.clamp(torch.round(x / scale) + zero, fmt.qmin, fmt.qmax)


def float8_codes(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``float8(clamp(x / scale, -max, max))`` as a ``fmt.dtype`` tensor (the division in float32)."""
    return (x.float() / scale.float()).clamp(-fmt.max, fmt.max).to(fmt.dtype)


def float8_fake_quant(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``code * scale`` in float32, returned in ``x``'s dtype; differentiable like :func:`fake_quant`
    (straight through the cast to ``x`` inside the range, and to ``scale``)."""
    s = scale.float()
    q = (x.float() / s).clamp(-fmt.max, fmt.max)
    if q.requires_grad:
        q = q + (q.to(fmt.dtype).float() - q).detach()
    else:
        q = q.to(fmt.dtype).float()
    return (q * s).to(x.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity."""
    return (torch.round(x) - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               fmt: IntFormat | FloatFormat) -> torch.Tensor:
    """Quantize then dequantize, differentiable (straight-through estimator)."""
    if is_float(fmt):
        return float8_fake_quant(x, scale, fmt)
    q = torch.clamp(round_ste(x / scale) + zero.detach(), fmt.qmin, fmt.qmax)
    return (q - zero.detach()) * scale


def fake_quant_inference(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         fmt: IntFormat | FloatFormat) -> torch.Tensor:
    """:func:`fake_quant` with one scale and no gradients, fast on the CPU for full 8-bit grids
    (PyTorch's vectorised quantize/dequantize; a signed grid is shifted into uint8). That kernel may
    round a value lying exactly between two levels the other way: the two agree to one step, and
    almost everywhere exactly. Other grids (and float formats) use :func:`fake_quant`."""
    if is_float(fmt):
        return float8_fake_quant(x, scale, fmt)
    if fmt.qmax - fmt.qmin != 255 or x.dtype != torch.float32 or not _FUSED_QUANTIZE:
        return fake_quant(x, scale, zero, fmt)
    if torch.compiler.is_compiling():  # graph ops (no Python numbers): the fused kernel's math, x times 1/scale
        q = torch.clamp(torch.round(x * torch.reciprocal(scale)) + zero, fmt.qmin, fmt.qmax)
        return (q - zero) * scale
    zero_u8 = int(zero) - fmt.qmin
    return torch.quantize_per_tensor(x, float(scale), zero_u8, torch.quint8).dequantize()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
