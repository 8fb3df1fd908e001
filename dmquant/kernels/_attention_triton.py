"""Triton kernels of the int8 attention (imported lazily: only when the Triton backend runs).

Two kernels: ``_k_quant_kernel`` smooths K by its per-channel mean and quantizes it to int8 with one
scale per block of ``K_BLOCK`` keys, into a buffer padded with zero keys to a multiple of
``K_BLOCK`` and with zero channels to ``HEAD_DIM``; ``_attn_kernel`` quantizes each of its queries
to int8 (one scale per query), computes Q·Kᵀ in int8 with int32 accumulation a block of
``K_BLOCK`` keys at a time, runs the online softmax in FP32 (base 2) and P·V in 16-bit with FP32
accumulation.

The int32 accumulator of Q·Kᵀ starts at the bits of 1.5·2²³ (of -inf for padding keys, whose int8
rows are zero), so reading it as FP32 gives ``1.5·2²³ + qk`` exactly (|qk| ≤ 128·127·127 < 2²²), or
-inf: with one K scale per block and one Q scale per row, the dequantization, the max subtraction
and the tail mask all fold into the single FMA inside exp2, as in a 16-bit flash attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmquant.kernels._dispatch import launcher

K_BLOCK = 64  # keys per K scale, and keys per step of the attention loop
MAGIC = 12582912.0  # 1.5 * 2**23, whose float32 bits are 0x4B400000
LOG2E = 1.4426950408889634


@triton.jit
def _k_quant_kernel(K, MEAN, KQ, KS, stride_kb, stride_kh, stride_kn, H, N, N_PAD,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + bh * D + offs_d, mask=offs_d < D, other=0.0)
    k = tl.where(valid, k - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.abs(k)), 1e-12)
    x = k * (127.0 / amax)
    q = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)
    tl.store(KQ + bh * N_PAD * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :], q)
    tl.store(KS + bh * (N_PAD // BLOCK) + pid_n, amax / 127.0)


@triton.jit
def _attn_kernel(Q, KQ, KS, V, BIAS, OUT,
                 stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn,
                 stride_ob, stride_oh, stride_on, stride_bias,
                 H, N_Q, N_KV, N_PAD, qk_scale,
                 D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PV_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_base = b * stride_qb + h * stride_qh
    v_base = b * stride_vb + h * stride_vh
    o_base = b * stride_ob + h * stride_oh
    if ALIGNED:  # every row starts on 16 bytes: lets the loads of Q and V vectorize when D % 16 != 0
        q_base = tl.multiple_of(q_base, 8)
        v_base = tl.multiple_of(v_base, 8)
        o_base = tl.multiple_of(o_base, 8)
        stride_qn = tl.multiple_of(stride_qn, 8)
        stride_vn = tl.multiple_of(stride_vn, 8)
        stride_on = tl.multiple_of(stride_on, 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=(offs_m[:, None] < N_Q) & d_ok[None, :], other=0.0).to(tl.float32)
    q_amax = tl.maximum(tl.max(tl.abs(q), 1), 1e-12)
    qx = q * (127.0 / q_amax)[:, None]
    qi = tl.where(qx >= 0, qx + 0.5, qx - 0.5).to(tl.int8)
    q_row = (q_amax / 127.0) * qk_scale  # log2-score units per unit of int dot, before the K scale

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = KQ + bh * N_PAD * HEAD_DIM
    for start in range(0, N_KV, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        c = q_row * tl.load(KS + bh * (N_PAD // BLOCK_N) + start // BLOCK_N)
        init = tl.where(offs_n < N_KV, 0x4B400000, -8388608)  # bits of 1.5·2²³ / of -inf
        qk = tl.dot(qi, tl.trans(k), acc=tl.broadcast_to(init[None, :], (BLOCK_M, BLOCK_N)),
                    out_dtype=tl.int32)  # an int32 accumulator must be named (Triton 3.6 asserts it)
        u = qk.to(tl.float32, bitcast=True)  # 1.5·2²³ + int dot, or -inf
        offset = c * 12582912.0
        if HAS_BIAS:
            bias = tl.load(BIAS + b * stride_bias + offs_n, mask=offs_n < N_KV, other=0.0)
            u = u * c[:, None] + bias[None, :] * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(u, 1) - offset)
            p = tl.exp2(u - (offset + m_new)[:, None])
        else:
            m_new = tl.maximum(m_i, (tl.max(u, 1) - 12582912.0) * c)
            p = tl.exp2(u * c[:, None] - (offset + m_new)[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=(offs_n[:, None] < N_KV) & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(PV_DTYPE), v.to(PV_DTYPE), acc=acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + o_base + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & d_ok[None, :])


def _attn_configs():
    shapes = [(128, 8, 2), (128, 8, 3), (64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in shapes]


_attn_tuned = triton.autotune(configs=_attn_configs(), key=["N_KV", "D", "HAS_BIAS", "PV_DTYPE", "ALIGNED"])(_attn_kernel)

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _rows_aligned(t: torch.Tensor) -> bool:
    """Whether every (batch, head, token) row of ``t`` starts on a 16-byte boundary."""
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def head_dim_padded(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


def quantize_k(k: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed int8 K ``[B*H, N_PAD, HEAD_DIM]`` and its block scales ``[B*H, N_PAD / K_BLOCK]`` (float32)."""
    b, h, n, d = k.shape
    hd = head_dim_padded(d)
    n_pad = triton.cdiv(n, K_BLOCK) * K_BLOCK
    kq = torch.empty(b * h, n_pad, hd, dtype=torch.int8, device=k.device)
    ks = torch.empty(b * h, n_pad // K_BLOCK, dtype=torch.float32, device=k.device)
    grid = (n_pad // K_BLOCK, b * h)
    launcher(_k_quant_kernel, k.device)[grid](
        k, mean, kq, ks, k.stride(0), k.stride(1), k.stride(2), h, n, n_pad,
        D=d, HEAD_DIM=hd, BLOCK=K_BLOCK)
    return kq, ks


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              key_bias: torch.Tensor | None) -> torch.Tensor:
    """Launch the kernels on ``(B, H, N, D)`` tensors whose last dimension is contiguous."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    mean = k.mean(dim=2, dtype=torch.float32).contiguous()
    kq, ks = quantize_k(k, mean)
    out = torch.empty(b, n_q, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    bias = key_bias if key_bias is not None else ks
    pv = _TL_DTYPE.get(v.dtype, tl.float16)
    args = (q, kq, ks, v, bias, out, q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1),
            v.stride(2), out.stride(0), out.stride(1), out.stride(2), bias.stride(0),
            h, n_q, n_kv, kq.shape[1], scale * LOG2E)
    consts = dict(D=d, HEAD_DIM=kq.shape[2], BLOCK_N=K_BLOCK, HAS_BIAS=key_bias is not None,
                  PV_DTYPE=pv, ALIGNED=all(_rows_aligned(t) for t in (q, v, out)))
    if q.is_cuda:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
        _attn_tuned[grid](*args, **consts)
    else:
        grid = (triton.cdiv(n_q, 64), b * h)
        launcher(_attn_kernel, q.device)[grid](*args, **consts, BLOCK_M=64)
    return out
