"""Triton kernels of the W4A8 / W4A4 linear (imported lazily: only when the Triton backend runs).

``_act_quant_kernel`` (the prologue) reads the 16-bit activations once per row block: optional
smoothing (x · 1/λ), the low-rank down projection x·L2ᵀ (16-bit inputs, FP32 accumulation) and the
symmetric int8 quantization per token or per group of 64 (int4 values are held in int8).
``_w4_gemm_kernel`` multiplies the int8 activations by the packed int4 weights group by group with
int8 tensor-core math (int32 accumulation), applies the group scales in FP32, and in its epilogue
adds the low-rank up projection (x·L2ᵀ)·L1ᵀ, the bias and the per-token activation scale.

Each group's int32 accumulator starts at the bits of 1.5·2²³, so it reads as the FP32 number
``1.5·2²³ + dot`` exactly (|dot| ≤ 64·128·8 < 2²²): one subtraction replaces an int→float conversion.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmquant.kernels._dispatch import launcher
from dmquant.kernels._tiles_triton import grouped_tile, launch_tiled

GROUP = 64
PROLOGUE_BLOCK_M = 32


@triton.jit
def _act_quant_kernel(X, INV_SMOOTH, L2, XQ, XS, LR, M, K, R, stride_x, stride_l2, stride_lr,
                      QMAX: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
                      PER_GROUP: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, GROUP)
    offs_r = tl.arange(0, R_PAD)
    n_groups = K // GROUP
    amax = tl.zeros([BLOCK_M], tl.float32)
    lr = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    for g in range(n_groups):
        x = tl.load(X + offs_m[:, None] * stride_x + (g * GROUP + offs_k)[None, :], mask=m_ok[:, None],
                    other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(INV_SMOOTH + g * GROUP + offs_k)[None, :]
        if HAS_LORA:
            l2 = tl.load(L2 + offs_r[None, :] * stride_l2 + (g * GROUP + offs_k)[:, None],
                         mask=(offs_r < R)[None, :], other=0.0)
            lr = tl.dot(x.to(L2.dtype.element_ty), l2, acc=lr)
        if PER_GROUP:
            g_amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-12)
            xg = x * (QMAX / g_amax)[:, None]
            q = tl.where(xg >= 0, xg + 0.5, xg - 0.5).to(tl.int8)
            tl.store(XQ + offs_m[:, None] * K + (g * GROUP + offs_k)[None, :], q, mask=m_ok[:, None])
            tl.store(XS + offs_m * n_groups + g, g_amax / QMAX, mask=m_ok)
        else:
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
    if not PER_GROUP:
        amax = tl.maximum(amax, 1e-12)
        inv = QMAX / amax
        for g in range(n_groups):
            x = tl.load(X + offs_m[:, None] * stride_x + (g * GROUP + offs_k)[None, :], mask=m_ok[:, None],
                        other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = x * tl.load(INV_SMOOTH + g * GROUP + offs_k)[None, :]
            xg = x * inv[:, None]
            q = tl.where(xg >= 0, xg + 0.5, xg - 0.5).to(tl.int8)
            tl.store(XQ + offs_m[:, None] * K + (g * GROUP + offs_k)[None, :], q, mask=m_ok[:, None])
        tl.store(XS + offs_m, amax / QMAX, mask=m_ok)
    if HAS_LORA:
        tl.store(LR + offs_m[:, None] * stride_lr + offs_r[None, :], lr.to(LR.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_r < R)[None, :])


@triton.jit
def _act_quant_tile_kernel(X, INV_SMOOTH, XQ, XS, M, K, stride_x, QMAX: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr,
                           HAS_SMOOTH: tl.constexpr):
    """The prologue without the low-rank branch, one ``[BLOCK_M, BLOCK_K]`` tile per program.

    Per group: tiles of one group (``BLOCK_K == GROUP``) over a 2-D grid. Per token: ``BLOCK_K`` covers
    the whole row (a power of two >= K), so a row's amax needs no second pass. Same math as
    ``_act_quant_kernel``.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(X + offs_m[:, None] * stride_x + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(INV_SMOOTH + offs_k, mask=offs_k < K, other=0.0)[None, :]
    amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-12)
    xg = x * (QMAX / amax)[:, None]
    q = tl.where(xg >= 0, xg + 0.5, xg - 0.5).to(tl.int8)
    tl.store(XQ + offs_m[:, None] * K + offs_k[None, :], q, mask=ok)
    if PER_GROUP:
        tl.store(XS + offs_m * (K // GROUP) + tl.program_id(1), amax / QMAX, mask=offs_m < M)
    else:
        tl.store(XS + offs_m, amax / QMAX, mask=offs_m < M)


@triton.jit
def _w4_gemm_kernel(XQ, XS, WP, WS, LR, L1, BIAS, OUT, M, N, K, R,
                    stride_wsn, stride_wsg, stride_lr, stride_l1, stride_out,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, R_PAD: tl.constexpr,
                    GROUP_M: tl.constexpr, GROUPS_PER_ITER: tl.constexpr, PER_GROUP: tl.constexpr,
                    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr = False):
    offs_m, offs_n, m_ok, n_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n_groups = K // GROUP
    x_ptrs = XQ + offs_m[:, None] * K + tl.arange(0, GROUP)[None, :]
    w_ptrs = WP + offs_n[:, None] * (K // 2) + tl.arange(0, GROUP // 2)[None, :]
    ws_ptrs = WS + offs_n * stride_wsn
    xs_ptrs = XS + offs_m * n_groups
    # SWAP computes the transposed tile, W·Xᵀ: the unpacked weights are then the register operand
    # of the tensor-core product and only X goes through shared memory
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, n_groups, GROUPS_PER_ITER):
        for _j in tl.static_range(GROUPS_PER_ITER):
            xq = tl.load(x_ptrs, mask=m_ok[:, None], other=0)
            w32 = tl.load(w_ptrs, mask=n_ok[:, None], other=0).to(tl.int32)  # two nibbles per byte
            w = tl.reshape(tl.join((w32 << 28) >> 28, (w32 << 24) >> 28), (BLOCK_N, GROUP)).to(tl.int8)
            ws = tl.load(ws_ptrs, mask=n_ok, other=0.0)
            if SWAP:
                part = tl.dot(w, tl.trans(xq), acc=tl.full([BLOCK_N, BLOCK_M], 0x4B400000, tl.int32),
                              out_dtype=tl.int32)
                f = part.to(tl.float32, bitcast=True) - 12582912.0
                if PER_GROUP:
                    xs = tl.load(xs_ptrs, mask=m_ok, other=0.0)
                    acc += f * (ws[:, None] * xs[None, :])
                else:
                    acc += f * ws[:, None]
            else:
                part = tl.dot(xq, tl.trans(w), acc=tl.full([BLOCK_M, BLOCK_N], 0x4B400000, tl.int32),
                              out_dtype=tl.int32)
                f = part.to(tl.float32, bitcast=True) - 12582912.0
                if PER_GROUP:
                    xs = tl.load(xs_ptrs, mask=m_ok, other=0.0)
                    acc += f * (xs[:, None] * ws[None, :])
                else:
                    acc += f * ws[None, :]
            x_ptrs += GROUP
            w_ptrs += GROUP // 2
            ws_ptrs += stride_wsg
            xs_ptrs += 1
    if SWAP:
        acc = tl.trans(acc)
    if not PER_GROUP:
        acc = acc * tl.load(XS + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        lr = tl.load(LR + offs_m[:, None] * stride_lr + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                     other=0.0)
        l1 = tl.load(L1 + offs_n[:, None] * stride_l1 + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :],
                     other=0.0)
        acc = tl.dot(lr, tl.trans(l1), acc=acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages, GROUPS_PER_ITER, SWAP), measured on an H100
BASELINE_CONFIGS = [(128, 128, 8, 3, 1, 0), (128, 64, 4, 4, 1, 0), (64, 256, 8, 3, 1, 0), (128, 64, 4, 3, 2, 0)]
TUNED_CONFIGS = [(128, 64, 4, 4, 1, 1), (128, 64, 4, 4, 1, 0), (128, 128, 8, 3, 2, 1), (64, 128, 4, 4, 1, 1),
                 (128, 64, 4, 3, 1, 1), (64, 64, 4, 4, 1, 1)]


def _gemm_configs(shapes=None):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUPS_PER_ITER": gpi, "SWAP": bool(sw)}, num_warps=w,
                          num_stages=s)
            for bm, bn, w, s, gpi, sw in (shapes or TUNED_CONFIGS)]


def _prune(configs, named_args, **kwargs):
    n_groups = named_args["K"] // GROUP
    return [c for c in configs if n_groups % c.kwargs["GROUPS_PER_ITER"] == 0]


def _tuned(shapes):
    return triton.autotune(configs=_gemm_configs(shapes), key=["M", "N", "K", "PER_GROUP", "HAS_LORA"],
                           prune_configs_by={"early_config_prune": _prune})(_w4_gemm_kernel)


_gemm_tuned = _tuned(TUNED_CONFIGS)
MAX_ROW_TILE = 8192  # per-token tiled prologue: elements of a program's tile


def quantize_activations(x: torch.Tensor, qmax: int, per_group: bool, inv_smooth: torch.Tensor | None,
                         lora_down: torch.Tensor | None, tiled: bool = True):
    """The prologue: ``(xq int8 [M, K], scales float32 [M] or [M, K/64], x·L2ᵀ [M, R] or None)``.

    ``tiled`` picks ``_act_quant_tile_kernel`` when there is no low-rank branch (False: the looped
    kernel, the first version, for benchmarks and tests).
    """
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    xs = torch.empty((m, k // GROUP) if per_group else (m,), dtype=torch.float32, device=x.device)
    r = 0 if lora_down is None else lora_down.shape[0]
    k_pad = triton.next_power_of_2(k)
    if tiled and not r and (per_group or k_pad <= MAX_ROW_TILE):
        block_k = GROUP if per_group else k_pad
        block_m = max(1, min(64, 4096 // block_k)) if per_group else max(1, MAX_ROW_TILE // k_pad)
        grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
        launcher(_act_quant_tile_kernel, x.device)[grid](
            x, inv_smooth if inv_smooth is not None else xs, xq, xs, m, k, x.stride(0), QMAX=qmax,
            BLOCK_M=block_m, BLOCK_K=block_k, GROUP=GROUP, PER_GROUP=per_group,
            HAS_SMOOTH=inv_smooth is not None, num_warps=4)
        return xq, xs, None
    lr = torch.empty(m, r, dtype=x.dtype, device=x.device) if r else xs
    l2 = lora_down if r else xs
    grid = (triton.cdiv(m, PROLOGUE_BLOCK_M),)
    launcher(_act_quant_kernel, x.device)[grid](
        x, inv_smooth if inv_smooth is not None else xs, l2, xq, xs, lr, m, k, r, x.stride(0),
        l2.stride(0), lr.stride(0), QMAX=qmax, GROUP=GROUP, BLOCK_M=PROLOGUE_BLOCK_M, R_PAD=_r_pad(r),
        PER_GROUP=per_group, HAS_SMOOTH=inv_smooth is not None, HAS_LORA=bool(r), num_warps=4)
    return xq, xs, (lr if r else None)


def w4_gemm(xq, xs, packed, scales, lr, lora_up, bias, out_dtype, *, block_m=32, block_n=32, groups_per_iter=1,
            swap=False, kernel=None):
    """The main kernel on prologue outputs; ``block_*``/``groups_per_iter``/``swap`` are used off CUDA (no
    autotuning); ``kernel`` (e.g. ``_tuned(BASELINE_CONFIGS)``) replaces the autotuned kernel, for benchmarks."""
    m, k = xq.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    r = 0 if lr is None else lr.shape[1]
    lr_t, l1 = (lr, lora_up) if r else (xs, xs)
    args = (xq, xs, packed, scales, lr_t, l1, bias if bias is not None else xs, out, m, n, k, r,
            scales.stride(0), scales.stride(1), lr_t.stride(0), l1.stride(0), out.stride(0))
    consts = dict(GROUP=GROUP, R_PAD=_r_pad(r), GROUP_M=8, PER_GROUP=xs.ndim == 2, HAS_LORA=bool(r),
                  HAS_BIAS=bias is not None)
    launch_tiled(kernel or _gemm_tuned, _w4_gemm_kernel, xq.device, m, n, args, consts,
                 dict(BLOCK_M=block_m, BLOCK_N=block_n, GROUPS_PER_ITER=groups_per_iter, SWAP=swap))
    return out


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))
