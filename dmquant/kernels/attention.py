"""Fused low-bit attention (SageAttention-style) and its plain-torch reference.

``int8_attention(q, k, v)`` takes what ``F.scaled_dot_product_attention`` takes, shaped
(batch, heads, tokens, head_dim), and computes softmax(Q·Kᵀ·scale + key_bias)·V with:

* K smoothed by subtracting its mean over tokens (each query's scores shift by a constant, which the
  softmax ignores), then quantized to int8 with one scale per block of 64 keys (as SageAttention);
* Q quantized to int8 with one scale per query (SageAttention uses blocks of 128 queries; a scale
  per row costs the kernel nothing and removes about a fifth of the error on random inputs);
* Q·Kᵀ in int8 with int32 accumulation, the softmax in FP32, and P·V in 16-bit (V's dtype; FP16
  for FP32 inputs) with FP32 accumulation (``pv="fp16"``);
* or (``pv="fp8"``, SageAttention2's recipe, for GPUs with FP8 tensor cores) P·V in float8 e4m3: V
  smoothed by subtracting its per-channel mean over tokens (added back to the output: each softmax
  row sums to 1) and quantized with one scale per channel (``amax / 448``), P (in [0, 1] after the
  max subtraction) scaled by 448 and cast to e4m3, the product accumulated in FP32 and divided by
  the row sums of the unquantized 448·P. K then has one scale per ``K_BLOCK_FP8`` keys.

``pv="auto"`` is ``"fp16"`` everywhere for now: the FP8 kernel has not yet run on a GPU (``AUTO_FP8``
turns it on for CUDA devices of compute capability >= 8.9 once eval/bench_gpu.py has measured it faster
than cuDNN at cos >= 0.999; its torch reference gives cos 0.9992 at 4096 tokens). ``pv="fp8"`` opts in.
On CUDA tensors the Triton kernel runs (falling back with a warning if it fails: an automatically
chosen FP8 variant to the FP16 one, else to the torch path); elsewhere the torch path below, which
computes the same quantized math query-chunk by query-chunk.
"""

from __future__ import annotations

import torch

from dmquant.kernels._dispatch import run_with_fallback, use_triton

K_BLOCK = 64
AUTO_FP8 = False  # not measured on a GPU yet: see the module docstring
K_BLOCK_FP8 = 128  # keys per K scale with pv="fp8" (the kernel's key block is 64 or 128)
FP8_MAX = 448.0  # largest float8 e4m3 (torch.float8_e4m3fn) value
PV_MODES = ("auto", "fp16", "fp8")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
_EPS = 1e-12
_QUERY_CHUNK = 1024  # torch path: queries per chunk


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                   key_bias: torch.Tensor | None = None, backend: str = "auto", pv: str = "auto") -> torch.Tensor:
    """Int8 Q·Kᵀ attention on ``(B, H, N, D)`` tensors; returns ``(B, H, N_q, D)`` in ``q``'s dtype.

    ``scale`` defaults to ``D ** -0.5``; ``key_bias`` (``[B, N_kv]``, additive, ``-inf`` allowed) masks
    or biases keys per batch element; ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``; ``pv``:
    ``"auto"``, ``"fp16"`` or ``"fp8"`` (the precision of P·V, see the module docstring).
    """
    _check_inputs(q, k, v, key_bias)
    chosen = resolve_pv(pv, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    key_bias = None if key_bias is None else key_bias.float().contiguous()

    def slow() -> torch.Tensor:
        return int8_attention_reference(q, k, v, scale=scale, key_bias=key_bias, pv=chosen)

    if not use_triton(backend, q):
        return slow()

    def fast() -> torch.Tensor:
        from dmquant.kernels import _attention_triton

        q_, k_, v_ = _last_dim_contiguous(q, k, v)
        return _attention_triton.attention(q_, k_, v_, scale, key_bias, pv=chosen)

    if chosen == "fp16":
        return run_with_fallback("int8_attention", backend, fast, slow)

    def fp16_kernel() -> torch.Tensor:  # an automatically chosen FP8 kernel that fails degrades to this
        return int8_attention(q, k, v, scale=scale, key_bias=key_bias, backend=backend, pv="fp16")

    return run_with_fallback("int8_attention_fp8", backend, fast, fp16_kernel if pv == "auto" else slow)


def resolve_pv(pv: str, t: torch.Tensor) -> str:
    """``"fp16"`` or ``"fp8"``: ``pv`` itself, or for ``"auto"`` FP8 on CUDA devices of capability >= 8.9 when
    ``AUTO_FP8`` is on (it is off until measured)."""
    if pv not in PV_MODES:
        raise ValueError(f"pv must be one of {PV_MODES}, got {pv!r}")
    if pv != "auto":
        return pv
    if AUTO_FP8 and t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9):
        return "fp8"
    return "fp16"


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """K minus its mean over tokens (per batch, head and channel), in FP32."""
    k = k.float()
    return k - k.mean(dim=-2, keepdim=True)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (what the kernels do: add ±0.5, truncate)."""
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of ``block`` tokens: ``x [..., N, D]`` -> (int8 ``[..., N, D]``, scale ``[..., N]``).

    Each token gets the scale of its block (``max|x_block| / 127``).
    """
    n = x.shape[-2]
    pad = -n % block
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    blocks = xp.unflatten(-2, (xp.shape[-2] // block, block))
    amax = blocks.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
    q = round_half_away(blocks * (127.0 / amax)).to(torch.int8)
    scale = (amax / 127.0).expand(*blocks.shape[:-1], 1)
    return q.flatten(-3, -2)[..., :n, :], scale.flatten(-3, -1)[..., :n]


def pv_dtype(v: torch.Tensor) -> torch.dtype:
    """The 16-bit type of the P·V product."""
    return v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float16


def quantize_v_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V minus its per-channel mean over tokens, in float8 e4m3 with one scale per channel.

    Returns (``torch.float8_e4m3fn`` ``[..., N, D]``, scale ``[..., 1, D]``, mean ``[..., 1, D]``, FP32):
    ``v ≈ codes·scale + mean``, ``scale = max_n |v - mean| / 448``.
    """
    v = v.float()
    mean = v.mean(dim=-2, keepdim=True)
    centred = v - mean
    amax = centred.abs().amax(dim=-2, keepdim=True).clamp_min(_EPS)
    codes = (centred * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, amax / FP8_MAX, mean


def int8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                             key_bias: torch.Tensor | None = None, pv: str = "fp16") -> torch.Tensor:
    """Plain-torch version of the kernel's math (also the CPU path), chunked over queries.

    ``pv``: ``"fp16"`` or ``"fp8"`` (``"auto"`` resolves as in ``int8_attention``).
    """
    pv = resolve_pv(pv, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kq, ks = quantize_blocks(smooth_k(k), K_BLOCK if pv == "fp16" else K_BLOCK_FP8)
    kq_t = kq.float().transpose(-1, -2)
    if pv == "fp8":
        codes, v_scale, v_mean = quantize_v_fp8(v)
        vv = codes.float()
        chunks = [_reference_chunk_fp8(q[..., i:i + _QUERY_CHUNK, :], kq_t, ks, vv, scale, key_bias, v_scale, v_mean)
                  for i in range(0, q.shape[-2], _QUERY_CHUNK)]
        return torch.cat(chunks, dim=-2).to(q.dtype)
    p_dtype = pv_dtype(v)
    vv = v.to(p_dtype).float()
    chunks = [_reference_chunk(q[..., i:i + _QUERY_CHUNK, :], kq_t, ks, vv, scale, key_bias, p_dtype)
              for i in range(0, q.shape[-2], _QUERY_CHUNK)]
    return torch.cat(chunks, dim=-2).to(q.dtype)


def _reference_chunk_fp8(q, kq_t, ks, codes, scale, key_bias, v_scale, v_mean):
    qq, qs = quantize_blocks(q, 1)
    scores = (qq.float() @ kq_t) * (qs[..., :, None] * ks[..., None, :] * scale)
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * FP8_MAX  # 448·P, in [0, 448]
    p8 = p.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    return (p8 @ codes) * (v_scale / p.sum(dim=-1, keepdim=True)) + v_mean


def _reference_chunk(q, kq_t, ks, v, scale, key_bias, p_dtype):
    qq, qs = quantize_blocks(q, 1)
    scores = (qq.float() @ kq_t) * (qs[..., :, None] * ks[..., None, :] * scale)
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    probs = torch.softmax(scores, dim=-1)
    return probs.to(p_dtype).float() @ v


def _check_inputs(q, k, v, key_bias) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("int8_attention expects (batch, heads, tokens, head_dim) tensors")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    if not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if key_bias is not None and tuple(key_bias.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_bias must be [batch, keys] = {(k.shape[0], k.shape[2])}, got {tuple(key_bias.shape)}")


def _last_dim_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]
