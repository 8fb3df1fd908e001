"""Integer compute on the CPU: int8 x uint8 -> int32 linear and conv2d with a float epilogue.

The fast path is oneDNN through PyTorch's x86 quantized engine (``torch.ops.onednn.*``: VNNI
int8 dot products, dequantization, bias fused). Those entry points are internal to PyTorch, so
everything goes through the four functions here, and each has a plain-torch reference computing the
same integers in float64 (``*_reference``), used by the tests and as a fallback when the engine
is missing.

Conventions: activations are unsigned 8-bit codes ``x_q`` with one scale ``x_scale`` and zero
point ``x_zero`` (any grid of <= 8 bits fits, a signed one shifted by 128); weights are int8 codes
with one scale per output channel and zero point 0; ``y = x_scale * w_scale * (x_q - x_zero) @ w_qᵀ + bias``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# quantize_per_tensor is the fastest fused quantize on the CPU; it is marked deprecated in recent
# PyTorch. This module is its only user; without it, quantize_uint8 falls back to plain ops.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")
_FUSED_QUANTIZE = hasattr(torch, "quantize_per_tensor")
_ONEDNN = hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def onednn_available() -> bool:
    return _ONEDNN and "x86" in torch.backends.quantized.supported_engines


def codes_view(q: torch.Tensor) -> torch.Tensor:
    """The integer codes of a quantized tensor (``quint8`` -> uint8, ``qint8`` -> int8) without a copy: a plain
    tensor on the same storage (``int_repr()`` copies, which costs as much as the quantization itself)."""
    dtype = torch.uint8 if q.dtype == torch.quint8 else torch.int8
    return torch.empty(0, dtype=dtype, device=q.device).set_(q.untyped_storage(), q.storage_offset(), q.size(),
                                                             q.stride())


def quantize_uint8(x: torch.Tensor, scale: float, zero_point: int, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as uint8 (round half to even, like torch.round)."""
    if _FUSED_QUANTIZE and 0 <= zero_point <= 255:
        q = codes_view(torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8))
    else:
        q = torch.round(x.float() / scale).add_(zero_point).clamp_(0, 255).to(torch.uint8)
    if qmin > 0 or qmax < 255:
        q = q.clamp_(qmin, qmax)
    return q


def prepack_linear(w_q: torch.Tensor):
    """Pack int8 weight codes ``[out, in]`` for :func:`int8_linear` (opaque; rebuilt after loading)."""
    if not onednn_available():
        return w_q
    return torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None)


def int8_linear(x_q, x_scale: float, x_zero: int, packed, w_scale, bias=None, out_dtype=torch.float32):
    """``x_q [..., in]`` uint8 codes times a prepacked int8 weight -> float ``[..., out]``."""
    if not onednn_available():
        return int8_linear_reference(x_q, x_scale, x_zero, packed, w_scale, bias).to(out_dtype)
    w_zero = torch.zeros(w_scale.numel(), dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(
        x_q, float(x_scale), int(x_zero), packed, w_scale.float(), w_zero, _f32(bias),
        1.0, 0, out_dtype, "none", [], "",
    )


ROW_CHUNK = 1 << 22  # float32 input elements per chunk of rows in int8_linear_per_row


def int8_linear_per_row(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, packed, w_scale: torch.Tensor,
                        correction: torch.Tensor, bias=None, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """Float32 ``rows [M, K]``, row ``m`` quantized on its own uint8 grid (``scale[m]``, ``zero[m]`` in 0..255,
    codes ``clamp(round(x / scale + zero), qmin, qmax)``), times a prepacked int8 weight -> float32 ``[M, N]``.

    oneDNN takes one input scale per tensor, so the GEMM runs with scale 1 and zero point 0 (``w_scale[n] · acc``)
    and the per-row grid is applied after it: ``y = scale[m] · (out - zero[m] · correction[n]) + bias``
    (``correction = w_scale · colsum``, float32, the weight codes' row sums scaled: prepared once). Needs the x86
    engine (:func:`onednn_available`); without it the caller takes ``torch._int_mm``. The rows go in chunks of
    ``ROW_CHUNK`` elements, so the float intermediate of the quantization is reused memory instead of fresh pages on
    every call. Rounding: ``x / scale`` exactly as the simulation divides; the zero point is added before the
    rounding, so a value within float32 rounding of a tie may take the other code (as ``fake_quant_inference``)."""
    if not rows.shape[0]:
        return rows.new_zeros(0, w_scale.numel())
    step = max(1, ROW_CHUNK // max(1, rows.shape[1]))
    outs = []
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        s, z = scale[part].float(), zero[part].float()
        codes = codes_view(torch.quantize_per_tensor(torch.addcdiv(z[:, None], rows[part], s[:, None]), 1.0, 0,
                                                     torch.quint8))
        if qmin > 0 or qmax < 255:
            codes = codes.clamp_(qmin, qmax)
        out = int8_linear(codes, 1.0, 0, packed, w_scale, None)
        out.mul_(s[:, None]).addr_(-(s * z), correction)
        outs.append(out if bias is None else out.add_(bias.float()))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def int8_linear_reference(x_q, x_scale, x_zero, w_q, w_scale, bias=None):
    acc = (x_q.double() - x_zero) @ w_q.double().t()  # exact integers
    y = acc * (float(x_scale) * w_scale.double())
    return (y if bias is None else y + bias.double()).float()


def prepack_conv2d(w_q, w_scale, x_scale: float, x_zero: int, stride, padding, dilation, groups: int):
    """Pack int8 conv weight codes ``[out, in/groups, kh, kw]`` for :func:`int8_conv2d`."""
    if not onednn_available():
        return w_q
    return torch.ops.onednn.qconv_prepack(
        w_q.contiguous(), w_scale.float(), float(x_scale), int(x_zero),
        list(stride), list(padding), list(dilation), groups, None,
    )


def int8_conv2d(x_q, x_scale: float, x_zero: int, packed, w_scale, bias, stride, padding, dilation, groups: int,
                out_dtype=torch.float32):
    """``x_q [N, C, H, W]`` uint8 codes convolved with a prepacked int8 weight -> float output."""
    if not onednn_available():
        return int8_conv2d_reference(x_q, x_scale, x_zero, packed, w_scale, bias, stride, padding, dilation,
                                     groups).to(out_dtype)
    w_zero = torch.zeros(w_scale.numel(), dtype=torch.long)
    return torch.ops.onednn.qconv2d_pointwise(
        x_q, float(x_scale), int(x_zero), packed, w_scale.float(), w_zero, _f32(bias),
        list(stride), list(padding), list(dilation), groups, 1.0, 0, out_dtype, "none", [], "",
    )


def int8_conv2d_reference(x_q, x_scale, x_zero, w_q, w_scale, bias, stride, padding, dilation, groups):
    acc = F.conv2d(x_q.double() - x_zero, w_q.double(), None, stride, padding, dilation, groups)
    y = acc * (float(x_scale) * w_scale.double()[None, :, None, None])
    return (y if bias is None else y + bias.double()[None, :, None, None]).float()


def _f32(t):
    return None if t is None else t.float()
