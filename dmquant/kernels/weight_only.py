"""Weight-only quantized linear (W4A16, W8A16): 16-bit activations times integer weight codes.

``w4a16_linear(x, qdata, scale, group_size, bias)`` computes ``x · dequant(W)ᵀ + bias`` for ``x [..., K]``
and a weight stored as a :class:`~dmquant.quantizers.qtensor.QuantizedTensor` stores it (symmetric):

* ``qdata``: ``uint8 [N, K/2]``, signed int4 packed two per byte (:func:`dmquant.kernels.int4.pack_int4`),
  or ``int8 [N, K]`` codes (8-bit weights, or any codes stored unpacked);
* ``scale``: one per group of ``group_size`` consecutive input features per output row (``[N, K/group]``
  or flat, as the quantized tensor keeps it), or one per output row when ``group_size`` is ``None``.

On CUDA with 16-bit ``x`` either the Triton kernel (:mod:`dmquant.kernels._w4a16_triton`) dequantizes weight
tiles inside the GEMM, so no full-size dequantized weight is ever written, or a one-pass Triton kernel writes a
temporary 16-bit weight that cuBLAS multiplies (freed after the call; the stored weight stays 4-bit): the
faster of the two as measured on an H200 (:func:`fused_is_faster`; the fused GEMM wins only for large M on
small weights). Either falls back to the torch path with a warning if Triton fails. Elsewhere (and for ``backend="torch"``) the torch path dequantizes the whole weight
exactly as :meth:`QuantizedTensor.dequantize` does and calls ``F.linear``: bit for bit the reference
backend's result. ``w4a16_linear_reference`` is dequantization in ``x``'s dtype, then one float64 matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmquant.kernels._dispatch import run_with_fallback, use_triton
from dmquant.kernels.int4 import unpack_int4

GROUP_SIZES = (32, 64, 128)  # the group sizes the Triton kernel takes (any even size on the torch path)
FAST_DTYPES = (torch.float16, torch.bfloat16)
METHODS = ("auto", "fused", "dequant")


def w4a16_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                 bias: torch.Tensor | None = None, backend: str = "auto", method: str = "auto") -> torch.Tensor:
    """``x [..., K]`` times the quantized weight (see module docstring) -> ``[..., N]`` in ``x``'s dtype.

    ``backend``: ``"auto"`` (Triton for fp16/bf16 CUDA tensors, torch otherwise), ``"triton"`` (any float
    dtype; CPU tensors go through Triton's interpreter) or ``"torch"``. ``method`` (Triton only):
    ``"fused"`` (dequantization inside the GEMM), ``"dequant"`` (the one-pass Triton dequantization into a
    temporary 16-bit weight, then cuBLAS) or ``"auto"`` (:func:`fused_is_faster`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    k = x.shape[-1]
    n = _check(qdata, scale, group_size, k)
    x2 = x.reshape(-1, k)
    if not _triton_applies(backend, x2, group_size):
        return _linear_torch(x, qdata, scale, group_size, bias)  # on x itself: F.linear as the layer calls it
    if method == "dequant" or (method == "auto" and not fused_is_faster(x2.shape[0], n, k, group_size)):
        return F.linear(x, dequantize_weight(qdata, scale, group_size, k, x.dtype, backend), bias)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    args = (x2, qdata.contiguous(), scale, group_size or 0, bias)
    out = run_with_fallback("w4a16_linear", backend, lambda: _linear_triton(*args),
                            lambda: _linear_torch(x2, qdata, scale, group_size, bias))
    return out.reshape(*x.shape[:-1], n)


def fused_is_faster(m: int, n: int, k: int, group_size: int | None) -> bool:
    """Whether the fused GEMM beats the one-pass dequantization + cuBLAS at this shape.

    Measured on an H200 (Triton 3.6, ``eval/bench_weight_only.py``, fp16, CUDA graphs): the fused kernel
    is 0.99-1.12x cuBLAS FP16 at 8192x320x320 (where dequantization + cuBLAS is 1.17-1.19x) but 1.3-3.4x
    at every larger weight or smaller M, where the one-pass dequantization + cuBLAS is 1.04-1.16x (M >= 2048)
    and 1.4-1.6x (M <= 512, a few microseconds of launch). So: fused only for large M on small weights.
    """
    return m >= 4096 and n * k <= 320 * 384


w8a16_linear = w4a16_linear  # the codes' storage (uint8 packed int4 or int8) tells the kernel which


def dequantize_weight(qdata: torch.Tensor, scale: torch.Tensor, group_size: int | None, k: int,
                      dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype``, equal to :meth:`QuantizedTensor.dequantize` (reshaped to 2-D).

    On CUDA a one-pass Triton kernel (read the codes, write the weight); the torch path otherwise.
    """
    _check(qdata, scale, group_size, k)
    if not use_triton(backend, qdata) or not (dtype.is_floating_point and qdata.is_contiguous()):
        return _dequantize_torch(qdata, scale, group_size, k, dtype)

    def fast() -> torch.Tensor:
        from dmquant.kernels import _w4a16_triton

        return _w4a16_triton.dequantize(qdata, scale, group_size or 0, k, dtype)

    return run_with_fallback("w4a16_dequantize", backend, fast,
                             lambda: _dequantize_torch(qdata, scale, group_size, k, dtype))


def w4a16_linear_reference(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The weight dequantized in ``x``'s dtype (as the layer's reference backend has it), then one float64
    matmul plus bias, rounded once to ``x``'s dtype."""
    k = x.shape[-1]
    n = _check(qdata, scale, group_size, k)
    w = _dequantize_torch(qdata, scale, group_size, k, x.dtype)
    y = x.reshape(-1, k).double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def triton_shapes_ok(k: int, group_size: int | None) -> bool:
    """Whether the Triton GEMM takes this input width and grouping (else the torch path runs)."""
    return k % 16 == 0 and (group_size is None or group_size in GROUP_SIZES)


def _triton_applies(backend: str, x2: torch.Tensor, group_size: int | None) -> bool:
    if not use_triton(backend, x2) or not triton_shapes_ok(x2.shape[-1], group_size) or not x2.shape[0]:
        return False
    return backend == "triton" or x2.dtype in FAST_DTYPES


def _linear_triton(x2, qdata, scale, group, bias):
    from dmquant.kernels import _w4a16_triton

    return _w4a16_triton.wo_gemm(x2, qdata, scale, group, bias)


def _linear_torch(x, qdata, scale, group_size, bias):
    return F.linear(x, _dequantize_torch(qdata, scale, group_size, x.shape[-1], x.dtype), bias)


def _dequantize_torch(qdata, scale, group_size, k, dtype) -> torch.Tensor:
    """:meth:`QuantizedTensor.dequantize`'s arithmetic (symmetric): codes in ``dtype`` times the scale in
    ``dtype``, row by row of one group (or one output channel)."""
    codes = unpack_int4(qdata) if qdata.dtype == torch.uint8 else qdata
    n = codes.shape[0]
    rows = codes.reshape(-1, group_size or k).to(dtype)
    return (rows * scale.reshape(-1).to(dtype)[:, None]).reshape(n, k)


def _check(qdata: torch.Tensor, scale: torch.Tensor, group_size: int | None, k: int) -> int:
    n = qdata.shape[0] if qdata.ndim == 2 else -1
    cols = {torch.uint8: k // 2, torch.int8: k}.get(qdata.dtype)
    if cols is None or qdata.ndim != 2 or qdata.shape[1] != cols or (qdata.dtype == torch.uint8 and k % 2):
        raise ValueError(f"qdata must be uint8 [N, K/2] (packed int4) or int8 [N, K] with K={k}, "
                         f"got {qdata.dtype} {tuple(qdata.shape)}")
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    groups = 1 if group_size is None else k // group_size
    if scale.numel() != n * groups:
        raise ValueError(f"scale must hold {n} x {groups} values (one per output row and group), "
                         f"got {tuple(scale.shape)}")
    return n
