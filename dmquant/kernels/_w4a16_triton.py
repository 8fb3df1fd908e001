"""Triton kernels of the weight-only linear (W4A16, W8A16), imported lazily: only when Triton runs.

``_wo_gemm_kernel`` computes ``y = x · dequant(W)ᵀ + bias`` for 16-bit ``x [M, K]`` and integer codes
``W`` (int4 packed two per byte as in :mod:`dmquant.kernels.int4`, ``uint8 [N, K/2]``; or ``int8 [N, K]``)
without ever writing the dequantized weight to memory: every ``[BLOCK_N, BLOCK_K]`` weight tile is
unpacked in registers, converted to the activation dtype and multiplied by its group's scale *before*
``tl.dot`` (one dot per group when a group is narrower than ``BLOCK_K``), accumulating in FP32. With one
scale per output channel (``GROUP == 0``) the scale is applied once, to the FP32 accumulator in the
epilogue. The dequantized tile is ``code.to(dtype) * scale.to(dtype)``, the same 16-bit numbers as
:meth:`QuantizedTensor.dequantize` (an exact product rounded once), so the kernel differs from
"dequantize, then ``F.linear``" only in the order of the FP32 accumulation.

``SWAP`` computes the transposed tile ``W·Xᵀ``: the dequantized weights are then the tensor-core product's
register operand (on Hopper, wgmma's A) and only ``x`` is staged through shared memory; it also suits a
small ``M`` (the wgmma N dimension can be as small as 8). Autotuned over a handful of Hopper configs.

``_dequant_kernel`` writes the whole dequantized weight in one pass (a kxk convolution's weight, which
then goes to cuDNN): bit-identical to :meth:`QuantizedTensor.dequantize`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmquant.kernels._dispatch import launcher
from dmquant.kernels._tiles_triton import grouped_tile, launch_tiled


@triton.jit
def _wo_gemm_kernel(X, W, S, BIAS, OUT, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_sn, stride_sg, stride_om,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, GROUP_M: tl.constexpr,
                    SWAP: tl.constexpr, MAGIC: tl.constexpr):
    offs_m, offs_n, m_ok, n_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dtype = X.dtype.element_ty
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (the wrapper and the pruning see to it)
        # SUB columns per dot: one group (a scale per row) when groups are narrower than BLOCK_K
        for j in tl.static_range(BLOCK_K // SUB):
            k = k0 + j * SUB
            x = tl.load(X + offs_m[:, None] * stride_xm + (k + tl.arange(0, SUB))[None, :], mask=m_ok[:, None],
                        other=0.0)
            if BITS == 4:
                b = tl.load(W + offs_n[:, None] * stride_wn + (k // 2 + tl.arange(0, SUB // 2))[None, :],
                            mask=n_ok[:, None], other=0)
                if MAGIC:
                    # byte j: column 2j in the low nibble, 2j + 1 in the high one (two's complement). A nibble
                    # v ^ 8 = v + 8 in [0, 15] OR-ed into the mantissa of 1024 (fp16) / 128 (bf16) is that
                    # number plus v + 8, exactly: integer ops and one subtraction instead of int->float converts
                    b16 = b.to(tl.int16)
                    u = tl.reshape(tl.join(b16 & 0xF, b16 >> 4), (BLOCK_N, SUB)) ^ 8
                    if dtype == tl.float16:
                        q = (u | 0x6400).to(tl.float16, bitcast=True) - 1032.0
                    else:
                        q = (u | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
                else:
                    b32 = b.to(tl.int32)
                    q = tl.reshape(tl.join((b32 << 28) >> 28, (b32 << 24) >> 28), (BLOCK_N, SUB)).to(dtype)
            else:
                q = tl.load(W + offs_n[:, None] * stride_wn + (k + tl.arange(0, SUB))[None, :], mask=n_ok[:, None],
                            other=0)
                if MAGIC and dtype == tl.float16:  # q + 128 in [1, 255] in the mantissa of 1024
                    q = ((q.to(tl.int16) + 128) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
                else:
                    q = q.to(dtype)
            if GROUP != 0:
                s = tl.load(S + offs_n * stride_sn + (k // GROUP) * stride_sg, mask=n_ok, other=0.0)
                q = q * s.to(dtype)[:, None]
            if SWAP:
                acc = tl.dot(q, tl.trans(x), acc=acc)
            else:
                acc = tl.dot(x, tl.trans(q), acc=acc)
    if SWAP:
        acc = tl.trans(acc)
    if GROUP == 0:
        acc = acc * tl.load(S + offs_n * stride_sn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(W, S, OUT, N, K, stride_wn, stride_sn, stride_sg, stride_on, BITS: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    if BITS == 4:
        offs_b = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        b = tl.load(W + offs_n[:, None] * stride_wn + offs_b[None, :],
                    mask=(offs_n < N)[:, None] & (offs_b < K // 2)[None, :], other=0).to(tl.int32)
        q = tl.reshape(tl.join((b << 28) >> 28, (b << 24) >> 28), (BLOCK_N, BLOCK_K))
    else:
        q = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=ok, other=0)
    dtype = OUT.dtype.element_ty
    if GROUP == 0:
        s = tl.load(S + offs_n * stride_sn, mask=offs_n < N, other=0.0)[:, None]
    else:
        s = tl.load(S + offs_n[:, None] * stride_sn + (offs_k // GROUP)[None, :] * stride_sg, mask=ok, other=0.0)
    tl.store(OUT + offs_n[:, None] * stride_on + offs_k[None, :], q.to(dtype) * s.to(dtype), mask=ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP): large M (8192, 2048) on 128- or 256-row tiles,
# N = 320 on 64-wide ones (5 exact tiles), small M (154) on the swapped product
CONFIGS = [(128, 128, 64, 8, 4, 0), (256, 128, 64, 8, 3, 0), (128, 64, 128, 4, 4, 1), (64, 128, 128, 4, 4, 1),
           (128, 128, 128, 8, 3, 1), (256, 128, 64, 8, 3, 1)]
FAST_CONVERT = True  # 16-bit codes by the exponent trick (integer ops) instead of int -> float conversions


def _configs(shapes=None):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": bool(sw)}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s, sw in (shapes or CONFIGS)]


def fit_block_k(block_k: int, k: int) -> int:
    """The largest power of two <= ``block_k`` that divides ``k`` (at least 16: the wrapper checks K % 16)."""
    while block_k > 16 and k % block_k:
        block_k //= 2
    return block_k


def sub_k(block_k: int, group: int) -> int:
    """Columns per ``tl.dot``: a whole ``BLOCK_K`` step, or one group when groups are narrower."""
    return block_k if group == 0 else min(block_k, group)


def _prune(configs, named_args, **kwargs):
    """Each config with its ``BLOCK_K`` shrunk to divide K (the kernel has no K tail); duplicates dropped."""
    k = named_args["K"]
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs, BLOCK_K=fit_block_k(c.kwargs["BLOCK_K"], k))
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _tuned(shapes=None):
    with_sub = triton.heuristics({"SUB": lambda a: sub_k(a["BLOCK_K"], a["GROUP"])})(_wo_gemm_kernel)
    return triton.autotune(configs=_configs(shapes), key=["M_BUCKET", "N", "K", "BITS", "GROUP", "HAS_BIAS"],
                           prune_configs_by={"early_config_prune": _prune})(with_sub)


_gemm_tuned = _tuned()


def m_bucket(m: int) -> int:
    """The autotuning key of ``M``: the next power of two (every batch size does not tune anew)."""
    return triton.next_power_of_2(max(m, 1))


def wo_gemm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, group: int, bias: torch.Tensor | None,
            *, block_m: int = 32, block_n: int = 32, block_k: int = 64, swap: bool = False,
            kernel=None) -> torch.Tensor:
    """``x [M, K]`` (last stride 1) times the weight ``qdata`` (``uint8 [N, K/2]``: int4; ``int8 [N, K]``)
    with ``scale [N, K/group]`` (``group``: 32, 64, 128...) or ``[N]``/``[N, 1]`` (``group == 0``) -> ``[M, N]``
    in ``x``'s dtype. ``block_*``/``swap`` are used off CUDA (interpreter, no autotuning); ``kernel`` (e.g.
    ``_tuned(CONFIGS[:1])``) replaces the autotuned kernel, for benchmarks."""
    m, k = x.shape
    n = qdata.shape[0]
    bits = 4 if qdata.dtype == torch.uint8 else 8
    scale2 = scale.reshape(n, -1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x, qdata, scale2, bias if bias is not None else scale2, out, m, n, k, m_bucket(m), x.stride(0),
            qdata.stride(0), scale2.stride(0), scale2.stride(1), out.stride(0))
    # (Triton's interpreter has no bf16 constants: on CPU tensors bf16 codes take the plain conversion)
    magic = FAST_CONVERT and (x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and x.is_cuda))
    consts = dict(BITS=bits, GROUP=group, HAS_BIAS=bias is not None, GROUP_M=8, MAGIC=magic)
    bk = fit_block_k(block_k, k)
    launch_tiled(kernel or _gemm_tuned, _wo_gemm_kernel, x.device, m, n, args, consts,
                 dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, SUB=sub_k(bk, group), SWAP=swap))
    return out


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, group: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype`` in one pass (``group == 0``: one scale per row)."""
    n = qdata.shape[0]
    bits = 4 if qdata.dtype == torch.uint8 else 8
    scale2 = scale.reshape(n, -1)
    out = torch.empty(n, k, dtype=dtype, device=qdata.device)
    block_n, block_k = 16, 256
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    launcher(_dequant_kernel, qdata.device)[grid](qdata, scale2, out, n, k, qdata.stride(0), scale2.stride(0),
                                                  scale2.stride(1), out.stride(0), BITS=bits, GROUP=group,
                                                  BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
