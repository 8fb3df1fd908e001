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

``EVEN`` (a constexpr) drops the tail masks when the keys fill whole blocks. ``_chunk_stats_kernel``
computes K's per-channel sums in parallel chunks (deterministic: no atomics), and the K quantization
reads them, which replaces a torch mean launch. Two FlashAttention-4-style variants (two key blocks
per softmax update; rescaling the accumulator only when a row's max grows by more than 2⁸) were
15-40% slower on an H100 with Triton 3.6 and were removed (measured at commit 7c39227 with
``eval/bench_kernels.py --sweep``).

``PV_FP8`` (SageAttention2's P·V, for GPUs with FP8 tensor cores, compute capability >= 8.9): K is
quantized per ``K_BLOCK_FP8`` keys, ``quantize_v_fp8`` smooths V by its per-channel mean over tokens
(added back in the epilogue: the softmax rows sum to 1) and stores it as float8 e4m3 with one scale
per channel (``amax / 448``), transposed (``[B*H, HEAD_DIM, N_PAD]``, tokens contiguous: Hopper's FP8
wgmma needs its B operand K-major); inside the loop ``exp2`` yields ``448·p`` directly (``log2 448``
is subtracted from the row term, no extra multiply), which is cast to e4m3 and multiplied with V in
FP8 with FP32 accumulation. ``max_num_imprecise_acc=BLOCK_N`` makes each block's FP8 product start
from zero and be added to the FP32 accumulator at full precision (SageAttention2's two-level
accumulation; Hopper's FP8 MMA accumulates with fewer mantissa bits). The row sums ``l`` are of the
unquantized ``448·p``. ``ROUND_FP8`` (the CPU interpreter only) rounds to the e4m3 grid in FP32
before each cast, because the interpreter's FP32->FP8 cast mis-rounds when the mantissa carries into
the exponent (Triton 3.8: 127.7 -> 64); on a GPU the hardware cast (RTNE, saturating) runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmquant.kernels._dispatch import launcher

K_BLOCK = 64  # keys per K scale, and keys per step of the attention loop
K_BLOCK_FP8 = 128  # keys per K scale of the FP8 P·V variant (BLOCK_N 64 or 128 divides it)
FP8_MAX = 448.0
LOG2_FP8_MAX = 8.807354922057604  # log2(448)
MAGIC = 12582912.0  # 1.5 * 2**23, whose float32 bits are 0x4B400000
LOG2E = 1.4426950408889634


@triton.jit
def _chunk_stats_kernel(X, PART, stride_xb, stride_xh, stride_xn, H, N, N_SPLIT,
                        D: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
                        MINMAX: tl.constexpr):
    """Per-channel sums of X (``(B, H, N, D)``) over chunks of ``CHUNK`` tokens, and with ``MINMAX`` their
    maxima and minima: ``PART [B*H, N_SPLIT, 1 or 3, HEAD_DIM]`` (FP32; deterministic: no atomics)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    s = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    hi = tl.full([ROWS, HEAD_DIM], float("-inf"), tl.float32)
    lo = tl.full([ROWS, HEAD_DIM], float("inf"), tl.float32)
    for r in tl.static_range(0, CHUNK, ROWS):
        offs_n = pid * CHUNK + r + tl.arange(0, ROWS)
        valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        x = tl.load(X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :],
                    mask=valid, other=0.0).to(tl.float32)
        s += x
        if MINMAX:
            hi = tl.maximum(hi, tl.where(valid, x, float("-inf")))
            lo = tl.minimum(lo, tl.where(valid, x, float("inf")))
    if MINMAX:
        base = PART + (bh * N_SPLIT + pid) * 3 * HEAD_DIM
        tl.store(base + offs_d, tl.sum(s, 0))
        tl.store(base + HEAD_DIM + offs_d, tl.max(hi, 0))
        tl.store(base + 2 * HEAD_DIM + offs_d, tl.min(lo, 0))
    else:
        tl.store(PART + (bh * N_SPLIT + pid) * HEAD_DIM + offs_d, tl.sum(s, 0))


@triton.jit
def _k_quant_kernel(K, MEAN, KQ, KS, stride_kb, stride_kh, stride_kn, H, N, N_PAD, N_SPLIT,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, FROM_SUMS: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    if FROM_SUMS:  # MEAN holds the chunk sums of _chunk_stats_kernel
        total = tl.zeros([HEAD_DIM], tl.float32)
        for i in range(N_SPLIT):
            total += tl.load(MEAN + (bh * N_SPLIT + i) * HEAD_DIM + offs_d)
        mean = total / N
    else:
        mean = tl.load(MEAN + bh * D + offs_d, mask=offs_d < D, other=0.0)
    k = tl.where(valid, k - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.abs(k)), 1e-12)
    x = k * (127.0 / amax)
    q = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)
    tl.store(KQ + bh * N_PAD * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :], q)
    tl.store(KS + bh * (N_PAD // BLOCK) + pid_n, amax / 127.0)


@triton.jit
def _round_e4m3(x):
    """FP32 ``x`` (``|x| <= 448``) rounded to nearest-even on the float8 e4m3 grid, still FP32."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # keep 3 bits
    a = tl.abs(x)
    sub = (a + 16384.0) - 16384.0  # multiples of 2**-9 below the smallest normal, 2**-6
    return tl.where(a < 0.015625, tl.where(x < 0, -sub, sub), normal)


@triton.jit
def _v_quant_kernel(V, PART, VQ, VS, VM, stride_vb, stride_vh, stride_vn, H, N, N_PAD, N_SPLIT,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROUND_FP8: tl.constexpr):
    """V minus its channel means, in float8 e4m3 with one scale per channel, transposed into ``VQ``."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], tl.float32)
    hi = tl.full([HEAD_DIM], float("-inf"), tl.float32)
    lo = tl.full([HEAD_DIM], float("inf"), tl.float32)
    for i in range(N_SPLIT):
        base = PART + (bh * N_SPLIT + i) * 3 * HEAD_DIM
        total += tl.load(base + offs_d)
        hi = tl.maximum(hi, tl.load(base + HEAD_DIM + offs_d))
        lo = tl.minimum(lo, tl.load(base + 2 * HEAD_DIM + offs_d))
    mean = total / N
    amax = tl.maximum(tl.maximum(hi - mean, mean - lo), 1e-12)  # max |v - mean| (rounding is monotonic)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    x = tl.where(valid, (v - mean[None, :]) * (448.0 / amax)[None, :], 0.0)
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if ROUND_FP8:
        x = _round_e4m3(x)
    tl.store(VQ + bh * HEAD_DIM * N_PAD + offs_d[None, :] * N_PAD + offs_n[:, None], x.to(tl.float8e4nv))
    if pid_n == 0:
        tl.store(VS + bh * HEAD_DIM + offs_d, amax / 448.0)
        tl.store(VM + bh * HEAD_DIM + offs_d, mean)


@triton.jit
def _scores(qi, k_base, ks_base, bias_ptr, offs_n, offs_d, q_row, N_KV, blk,
            HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr):
    """One block's int dot as FP32 ``1.5·2²³ + qk`` (or -inf past the keys), its row scales and offsets.

    Without a bias: ``score·log2(e) = (u - 1.5·2²³)·c``. With one, ``u`` is already the score
    (``u·c + bias·log2(e)``) and the offset is ``1.5·2²³·c``.
    """
    k = tl.load(k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
    c = q_row * tl.load(ks_base + blk)
    if EVEN:
        init = tl.full([qi.shape[0], offs_n.shape[0]], 0x4B400000, tl.int32)
    else:
        init = tl.broadcast_to(tl.where(offs_n < N_KV, 0x4B400000, -8388608)[None, :],
                               (qi.shape[0], offs_n.shape[0]))  # bits of 1.5·2²³ / of -inf
    qk = tl.dot(qi, tl.trans(k), acc=init, out_dtype=tl.int32)  # an int32 accumulator must be named (Triton 3.6)
    u = qk.to(tl.float32, bitcast=True)  # 1.5·2²³ + int dot, or -inf
    offset = c * 12582912.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N_KV, other=0.0)
        u = u * c[:, None] + bias[None, :] * 1.4426950408889634
    return u, c, offset


@triton.jit
def _load_v(v_ptr, offs_n, offs_d, stride_vn, N_KV, D: tl.constexpr, EVEN: tl.constexpr, PV_DTYPE: tl.constexpr):
    if EVEN:
        if D == offs_d.shape[0]:
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=(offs_d < D)[None, :], other=0.0)
    else:
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=(offs_n[:, None] < N_KV) & (offs_d < D)[None, :], other=0.0)
    return v.to(PV_DTYPE)


@triton.jit
def _attn_kernel(Q, KQ, KS, V, BIAS, OUT, VS, VM,
                 stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn,
                 stride_ob, stride_oh, stride_on, stride_bias,
                 H, N_Q, N_KV, N_PAD, qk_scale,
                 D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PV_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 EVEN: tl.constexpr, PV_FP8: tl.constexpr = False, KS_BLOCK: tl.constexpr = 64,
                 ROUND_FP8: tl.constexpr = False):
    """``PV_FP8``: ``V`` is ``quantize_v_fp8``'s transposed e4m3 buffer, ``VS``/``VM`` its scales and means."""
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
    ks_base = KS + bh * (N_PAD // KS_BLOCK)
    v8_base = V + bh * HEAD_DIM * N_PAD
    for start in range(0, N_KV, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        u, c, offset = _scores(qi, k_base, ks_base, BIAS + b * stride_bias, offs_n, offs_d, q_row, N_KV,
                               start // KS_BLOCK, HEAD_DIM, HAS_BIAS, EVEN)
        if HAS_BIAS:
            m_new = tl.maximum(m_i, tl.max(u, 1) - offset)
        else:
            m_new = tl.maximum(m_i, (tl.max(u, 1) - 12582912.0) * c)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
        row = offset + m_i
        if PV_FP8:
            row = row - 8.807354922057604  # p scaled by 448 = 2**log2(448), the e4m3 maximum
        if HAS_BIAS:
            p = tl.exp2(u - row[:, None])
        else:
            p = tl.exp2(u * c[:, None] - row[:, None])
        l_i += tl.sum(p, 1)
        if PV_FP8:
            if ROUND_FP8:
                p = _round_e4m3(p)
            v8 = tl.load(v8_base + offs_d[None, :] * N_PAD + offs_n[:, None])  # [BLOCK_N, HEAD_DIM], K-major
            acc = tl.dot(p.to(tl.float8e4nv), v8, acc=acc, max_num_imprecise_acc=BLOCK_N)
        else:
            acc = tl.dot(p.to(PV_DTYPE), _load_v(V + v_base, offs_n, offs_d, stride_vn, N_KV, D, EVEN, PV_DTYPE),
                         acc=acc)
    if PV_FP8:
        out = acc * (1.0 / l_i)[:, None] * tl.load(VS + bh * HEAD_DIM + offs_d)[None, :] \
            + tl.load(VM + bh * HEAD_DIM + offs_d)[None, :]
    else:
        out = acc / l_i[:, None]
    tl.store(OUT + o_base + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & d_ok[None, :])


# (BLOCK_M, num_warps, num_stages): measured on an H100 (eval/bench_kernels.py --sweep)
BASELINE_CONFIGS = [(128, 8, 2), (128, 8, 3), (64, 4, 3)]  # the first version's set
TUNED_CONFIGS = [(128, 8, 3), (64, 4, 3), (128, 8, 4), (64, 4, 4)]


def _attn_configs(shapes=None):
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in (shapes or TUNED_CONFIGS)]


def _tuned(shapes):
    return triton.autotune(configs=_attn_configs(shapes), key=["N_KV", "D", "HAS_BIAS", "PV_DTYPE", "ALIGNED", "EVEN"])(
        _attn_kernel)


_attn_tuned = _tuned(TUNED_CONFIGS)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the FP8 P·V variant: not yet measured on a GPU
FP8_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 4)]


def _tuned_fp8(shapes):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]
    return triton.autotune(configs=configs, key=["N_KV", "D", "HAS_BIAS", "ALIGNED", "EVEN"])(_attn_kernel)


_attn_fp8_tuned = _tuned_fp8(FP8_CONFIGS)

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUM_CHUNK = 256  # keys per program of the K sums


def _rows_aligned(t: torch.Tensor) -> bool:
    """Whether every (batch, head, token) row of ``t`` starts on a 16-byte boundary."""
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def head_dim_padded(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


def quantize_k(k: torch.Tensor, mean: torch.Tensor | None = None,
               block: int = K_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed int8 K ``[B*H, N_PAD, HEAD_DIM]`` and its block scales ``[B*H, N_PAD / block]`` (float32).

    ``mean`` ``[B, H, D]`` (FP32); ``None`` computes it on the device (chunk sums, then the quantization
    kernel divides). ``N_PAD`` is the key count rounded up to a multiple of ``block`` (keys per scale).
    """
    b, h, n, d = k.shape
    hd = head_dim_padded(d)
    n_pad = triton.cdiv(n, block) * block
    kq = torch.empty(b * h, n_pad, hd, dtype=torch.int8, device=k.device)
    ks = torch.empty(b * h, n_pad // block, dtype=torch.float32, device=k.device)
    n_split, from_sums = 1, mean is None
    if from_sums:
        n_split = triton.cdiv(n, SUM_CHUNK)
        mean = torch.empty(b * h, n_split, hd, dtype=torch.float32, device=k.device)
        launcher(_chunk_stats_kernel, k.device)[(n_split, b * h)](
            k, mean, k.stride(0), k.stride(1), k.stride(2), h, n, n_split, D=d, HEAD_DIM=hd, CHUNK=SUM_CHUNK,
            ROWS=32, MINMAX=False, num_warps=4)
    grid = (n_pad // block, b * h)
    launcher(_k_quant_kernel, k.device)[grid](
        k, mean, kq, ks, k.stride(0), k.stride(1), k.stride(2), h, n, n_pad, n_split,
        D=d, HEAD_DIM=hd, BLOCK=block, FROM_SUMS=from_sums)
    return kq, ks


def quantize_v_fp8(v: torch.Tensor, n_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V smoothed and in float8 e4m3: (``[B*H, HEAD_DIM, n_pad]`` transposed, zero-padded; scales and
    channel means ``[B*H, HEAD_DIM]``, FP32). ``v`` is ``(B, H, N, D)`` with its last dimension contiguous."""
    b, h, n, d = v.shape
    hd = head_dim_padded(d)
    n_split = triton.cdiv(n, SUM_CHUNK)
    part = torch.empty(b * h, n_split, 3, hd, dtype=torch.float32, device=v.device)
    launcher(_chunk_stats_kernel, v.device)[(n_split, b * h)](
        v, part, v.stride(0), v.stride(1), v.stride(2), h, n, n_split, D=d, HEAD_DIM=hd, CHUNK=SUM_CHUNK,
        ROWS=32, MINMAX=True, num_warps=4)
    vq = torch.empty(b * h, hd, n_pad, dtype=torch.float8_e4m3fn, device=v.device)
    vs = torch.empty(b * h, hd, dtype=torch.float32, device=v.device)
    vm = torch.empty(b * h, hd, dtype=torch.float32, device=v.device)
    launcher(_v_quant_kernel, v.device)[(n_pad // K_BLOCK, b * h)](
        v, part, vq, vs, vm, v.stride(0), v.stride(1), v.stride(2), h, n, n_pad, n_split,
        D=d, HEAD_DIM=hd, BLOCK=K_BLOCK, ROUND_FP8=not v.is_cuda)
    return vq, vs, vm


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              key_bias: torch.Tensor | None, *, kernel=None, fused_mean: bool = True,
              even: bool | None = None, pv: str = "fp16", block_n: int = 64) -> torch.Tensor:
    """Launch the kernels on ``(B, H, N, D)`` tensors whose last dimension is contiguous.

    ``pv``: ``"fp16"`` (P·V in V's 16-bit type) or ``"fp8"`` (float8 e4m3 P and V). ``kernel`` (an
    autotuned ``_attn_kernel``, e.g. ``_tuned(BASELINE_CONFIGS)`` or ``_tuned_fp8(...)``), ``fused_mean``
    (False: torch's mean) and ``even`` (False: tail masks kept) are for benchmarks (the first version
    is ``kernel=_tuned(BASELINE_CONFIGS), fused_mean=False, even=False``); ``block_n`` (64 or 128) is the
    FP8 variant's key block on the CPU interpreter (for tests; on a GPU it is autotuned).
    """
    if pv == "fp8":
        return _attention_fp8(q, k, v, scale, key_bias, kernel=kernel, even=even, block_n=block_n)
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    mean = None if fused_mean else k.mean(dim=2, dtype=torch.float32).contiguous()
    kq, ks = quantize_k(k, mean)
    out = torch.empty(b, n_q, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    bias = key_bias if key_bias is not None else ks
    pv = _TL_DTYPE.get(v.dtype, tl.float16)
    args = (q, kq, ks, v, bias, out, ks, ks, q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1),
            v.stride(2), out.stride(0), out.stride(1), out.stride(2), bias.stride(0),
            h, n_q, n_kv, kq.shape[1], scale * LOG2E)
    consts = dict(D=d, HEAD_DIM=kq.shape[2], BLOCK_N=K_BLOCK, HAS_BIAS=key_bias is not None,
                  PV_DTYPE=pv, ALIGNED=all(_rows_aligned(t) for t in (q, v, out)), EVEN=n_kv % K_BLOCK == 0 if even is None else even)
    if q.is_cuda:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
        (kernel or _attn_tuned)[grid](*args, **consts)
    else:
        grid = (triton.cdiv(n_q, 64), b * h)
        launcher(_attn_kernel, q.device)[grid](*args, **consts, BLOCK_M=64)
    return out


def _attention_fp8(q, k, v, scale, key_bias, *, kernel=None, even=None, block_n=64) -> torch.Tensor:
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    kq, ks = quantize_k(k, None, K_BLOCK_FP8)
    n_pad = kq.shape[1]
    vq, vs, vm = quantize_v_fp8(v, n_pad)
    out = torch.empty(b, n_q, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    bias = key_bias if key_bias is not None else ks
    args = (q, kq, ks, vq, bias, out, vs, vm, q.stride(0), q.stride(1), q.stride(2), 0, 0, 0,
            out.stride(0), out.stride(1), out.stride(2), bias.stride(0), h, n_q, n_kv, n_pad, scale * LOG2E)
    consts = dict(D=d, HEAD_DIM=kq.shape[2], HAS_BIAS=key_bias is not None, PV_DTYPE=tl.float16,
                  ALIGNED=all(_rows_aligned(t) for t in (q, out)),
                  EVEN=n_kv % K_BLOCK_FP8 == 0 if even is None else even, PV_FP8=True, KS_BLOCK=K_BLOCK_FP8)
    if q.is_cuda:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
        (kernel or _attn_fp8_tuned)[grid](*args, **consts)
    else:
        if K_BLOCK_FP8 % block_n:
            raise ValueError(f"block_n must divide {K_BLOCK_FP8}, got {block_n}")
        launcher(_attn_kernel, q.device)[(triton.cdiv(n_q, 64), b * h)](
            *args, **consts, BLOCK_M=64, BLOCK_N=block_n, ROUND_FP8=True)
    return out
