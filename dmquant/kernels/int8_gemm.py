"""W8A8 on integer tensor cores with ``torch._int_mm`` (cuBLASLt int8 x int8 -> int32 on CUDA; the
same call runs on the CPU, which is how it is tested there).

Static activations: ``x`` is quantized with one scale and zero point (``codes = clamp(round(x / s) + z)``,
the simulation's own expression, so the codes are the simulation's), shifted into int8 when the grid is
unsigned. Weights: int8 codes with one scale per output channel, symmetric. With ``z`` the zero point in
int8 terms and ``colsum[n] = sum_k W[n, k]``::

    y[m, n] = s_x * s_w[n] * (sum_k X[m, k] W[n, k] - z * colsum[n]) + bias[n]

Everything is written in tensor operations (no ``.item()``), so ``torch.compile`` fuses the quantization
into the op before it and the rescale into one epilogue.

Convolutions (``groups == 1``) are an im2col GEMM on channels-last codes: the quantized input is padded
in the float domain (a real zero becomes the zero point exactly) and the ``kh x kw`` shifted views are
stacked innermost, so the patch matrix's columns are ordered ``(c, i, j)`` like the stored weight
``[out, c, kh, kw]`` and the weight is used in place (no reordered copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmquant.kernels import cpu_int8

MIN_ROWS = 17  # cuBLASLt's int8 GEMM needs more than 16 rows


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                    shift: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero, qmin, qmax) - shift`` as int8 (``shift`` 128 for an unsigned grid)."""
    codes = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return (codes - shift).to(torch.int8)


def quantize_fast(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """:func:`quantize_static` for a full signed 8-bit grid with Python-number qparams, in one fused kernel
    (``quantize_per_tensor``, which reads float32 only: a 16-bit input costs one cast more); not traceable by
    ``torch.compile``, which uses :func:`quantize_static`."""
    return cpu_int8.codes_view(torch.quantize_per_tensor(x.float(), scale, zero, torch.qint8))


def gemm_shapes_ok(k: int, n: int) -> bool:
    """cuBLASLt's int8 GEMM needs the inner and output dimensions to be multiples of 8."""
    return k % 8 == 0 and n % 8 == 0


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 matrices as int32; fewer than 17 rows are padded (cuBLASLt's limit)."""
    rows = a.shape[0]
    if rows >= MIN_ROWS:
        return torch._int_mm(a, b)
    padded = F.pad(a, (0, 0, 0, MIN_ROWS - rows))
    return torch._int_mm(padded, b)[:rows]


def rescale(acc: torch.Tensor, zero: torch.Tensor, colsum: torch.Tensor, x_scale: torch.Tensor,
            w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The epilogue: subtract the zero point's share, scale per output channel, add the bias."""
    y = (acc - zero.to(torch.int32) * colsum).float() * (x_scale.float() * w_scale.float())  # per-row x_scale: [M, 1]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def per_row_int8_linear_eager(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, w_codes: torch.Tensor,
                              w_scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Float32 ``rows`` ``[M, K]`` quantized with one ``scale`` / ``zero`` per row (zero points on the int8 grid)
    times int8 ``w_codes`` ``[N, K]``, as few passes over memory as eager torch allows: the codes in one
    ``quantize_per_channel`` kernel (it multiplies by the inverse scale: a code can differ by one from
    :func:`quantize_static` on a near-tie), the epilogue in place (``acc · s_row · s_col``,
    the zero points' share as one rank-1 update, the bias). Not traceable by ``torch.compile``."""
    codes = cpu_int8.codes_view(torch.quantize_per_channel(rows, scale.double(), zero.long(), 0, torch.qint8))
    y = int_mm(codes, w_codes.t()).float().mul_(scale[:, None]).mul_(w_scale.float())
    y.addr_(-(zero.float() * scale), colsum.float() * w_scale.float())
    return y if bias is None else y.add_(bias.float())


def int8_linear(codes: torch.Tensor, zero: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor,
                w_scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """``codes`` (int8, ``[..., K]``) times ``w_codes`` (int8 ``[N, K]``) rescaled to ``out_dtype``;
    ``zero`` is the activations' zero point on the int8 grid, ``colsum`` the weight's int32 row sums."""
    rows = codes.reshape(-1, codes.shape[-1])
    acc = int_mm(rows, w_codes.t())
    y = rescale(acc, zero, colsum, x_scale, w_scale, bias, out_dtype)
    return y.reshape(*codes.shape[:-1], w_codes.shape[0])


def im2col_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, shift: int,
                 kernel_size, stride, padding, dilation) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The int8 patch matrix ``[N * Ho * Wo, C * kh * kw]`` of ``x`` (``[N, C, H, W]``) with columns in
    the stored weight's ``(c, i, j)`` order, and ``(N, Ho, Wo)``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, c, h, w = x.shape
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    codes = quantize_static(x.permute(0, 2, 3, 1), scale, zero, qmin, qmax, shift)  # N, H', W', C
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if kh == kw == 1:
        patches = codes[:, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw, :]
        return patches.reshape(n * ho * wo, c), (n, ho, wo)
    views = [codes[:, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw, :]
             for i in range(kh) for j in range(kw)]
    return torch.stack(views, dim=-1).reshape(n * ho * wo, c * kh * kw), (n, ho, wo)


def int8_conv2d(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, shift: int,
                w_codes: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None,
                kernel_size, stride, padding, dilation) -> torch.Tensor:
    """A ``groups == 1`` convolution of the float input ``x`` with int8 weights ``[O, C, kh, kw]``; the
    output is ``[N, O, Ho, Wo]`` in channels-last memory, in ``x``'s dtype."""
    patches, (n, ho, wo) = im2col_codes(x, scale, zero, qmin, qmax, shift, kernel_size, stride, padding, dilation)
    acc = int_mm(patches, w_codes.reshape(w_codes.shape[0], -1).t())
    y = rescale(acc, zero - shift, colsum, scale, w_scale, bias, x.dtype)
    return y.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)


def int8_linear_reference(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                          w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same layer in float64: dequantized input times dequantized weight (for tests)."""
    xq = (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero).double() * scale.double()
    w = w_codes.reshape(w_codes.shape[0], -1).double() * w_scale.double()[:, None]
    y = xq @ w.t()
    return y + bias.double() if bias is not None else y
