"""W4A8 / W4A4 linear: packed int4 weights, int8 activations quantized on the fly, fused low-rank branch.

``int4_linear`` computes, for ``x [..., K]`` and a weight quantized by
:func:`dmquant.kernels.int4.quantize_int4` (``packed uint8 [N, K/2]``, ``scales [N, K/64]``)::

    x' = x / smooth                                   (optional per-input-channel smoothing λ)
    xq, sx = int8 quantization of x' per token, or per group of 64 (act_bits 8 or 4, symmetric)
    y = Σ_g sx · s_w[:, g] · (xq_g · q_gᵀ)            (int8 math, int32 per group, FP32 scaling)
        + ((x'·L2ᵀ) in 16-bit)·L1ᵀ + bias            (SVDQuant low-rank branch, FP32 accumulation)

On CUDA the Triton prologue + GEMM run (falling back to the torch path with a warning if they fail);
elsewhere the torch path runs the same integer math group by group with ``torch._int_mm``.
``int4_linear_reference`` is the obviously-correct version: dequantize, then matmul in float64.
"""

from __future__ import annotations

import torch

from dmquant.kernels._dispatch import run_with_fallback, use_triton
from dmquant.kernels.attention import round_half_away
from dmquant.kernels.int4 import GROUP_SIZE, dequantize_int4, unpack_int4

_EPS = 1e-12


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, *, act_bits: int = 8,
                act_group: int | None = None, smooth: torch.Tensor | None = None,
                lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``x [..., K]`` times an int4 weight (see module docstring) -> ``[..., N]`` in ``x``'s dtype.

    ``act_bits``: 8 (W4A8) or 4 (W4A4); ``act_group``: ``None`` (per token) or 64 (per group);
    ``smooth``: λ ``[K]``; ``lora_down`` L2 ``[r, K]`` and ``lora_up`` L1 ``[N, r]`` (both or neither);
    ``bias`` ``[N]``; ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``. ``scales`` may be any
    strided view; a column-major one (``scales.t().contiguous().t()``) is the fastest for the kernel.
    """
    _check(x, packed, scales, act_bits, act_group, lora_down, lora_up)
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    inv_smooth = None if smooth is None else (1.0 / smooth.float()).contiguous()
    args = (x2, packed.contiguous(), scales.float(), act_bits, act_group is not None, inv_smooth,
            _like(lora_down, x2), _like(lora_up, x2), bias)
    if not use_triton(backend, x2):
        out = _int4_linear_torch(*args)
    else:
        out = run_with_fallback("int4_linear", backend, lambda: _int4_linear_triton(*args),
                                lambda: _int4_linear_torch(*args))
    return out.reshape(*x.shape[:-1], packed.shape[0])


def w4a8_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`int4_linear` with 8-bit activations (per token unless ``act_group=64``)."""
    return int4_linear(x, packed, scales, act_bits=8, **kwargs)


def w4a4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`int4_linear` with 4-bit activations, per group of 64 unless ``act_group`` says otherwise."""
    kwargs.setdefault("act_group", GROUP_SIZE)
    return int4_linear(x, packed, scales, act_bits=4, **kwargs)


def quantize_activations(x: torch.Tensor, act_bits: int = 8, act_group: int | None = None,
                         inv_smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of ``x [M, K]`` (after ``x * inv_smooth``) as the kernel's prologue does it.

    Returns ``(int8 [M, K], float32 scales [M] or [M, K/act_group])``; rounding is half away from zero.
    """
    qmax = 2 ** (act_bits - 1) - 1
    xf = x.float() if inv_smooth is None else x.float() * inv_smooth
    view = xf.unflatten(-1, (-1, act_group)) if act_group else xf.unsqueeze(-2)
    amax = view.abs().amax(dim=-1).clamp_min(_EPS)
    q = round_half_away(view * (qmax / amax)[..., None]).to(torch.int8)
    scales = amax / qmax
    return q.flatten(-2), (scales if act_group else scales.squeeze(-1))


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, k] · b [N, k]ᵀ`` of int8 tensors in int32 (``torch._int_mm`` where it applies)."""
    m, k = a.shape
    if a.device.type == "cpu" and m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a.contiguous(), b.t().contiguous())
    return (a.double() @ b.double().t()).to(torch.int32)


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, *, act_bits: int = 8,
                          act_group: int | None = None, smooth: torch.Tensor | None = None,
                          lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize activations and weights, then one float64 matmul (plus the 16-bit low-rank branch)."""
    x2 = x.reshape(-1, x.shape[-1])
    inv_smooth = None if smooth is None else 1.0 / smooth.float()
    xq, xs = quantize_activations(x2, act_bits, act_group, inv_smooth)
    x_hat = xq.double().unflatten(-1, (xs.shape[-1] if act_group else 1, -1)) * xs.double().reshape(
        xs.shape[0], -1, 1)
    y = x_hat.flatten(-2) @ dequantize_int4(packed, scales, torch.float64).t()
    y = y + _low_rank(x2, inv_smooth, lora_down, lora_up).double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


def _int4_linear_torch(x2, packed, scales, act_bits, per_group, inv_smooth, lora_down, lora_up, bias):
    xq, xs = quantize_activations(x2, act_bits, GROUP_SIZE if per_group else None, inv_smooth)
    wq = unpack_int4(packed)
    acc = torch.zeros(x2.shape[0], packed.shape[0], dtype=torch.float32, device=x2.device)
    for g in range(scales.shape[1]):
        cols = slice(g * GROUP_SIZE, (g + 1) * GROUP_SIZE)
        scale = scales[:, g][None, :] * (xs[:, g:g + 1] if per_group else 1.0)
        acc += int_matmul(xq[:, cols], wq[:, cols]).float() * scale
    if not per_group:
        acc = acc * xs[:, None]
    acc = acc + _low_rank(x2, inv_smooth, lora_down, lora_up)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x2.dtype)


def _int4_linear_triton(x2, packed, scales, act_bits, per_group, inv_smooth, lora_down, lora_up, bias):
    from dmquant.kernels import _gemm_triton

    qmax = 2 ** (act_bits - 1) - 1
    xq, xs, lr = _gemm_triton.quantize_activations(x2, qmax, per_group, inv_smooth, lora_down)
    return _gemm_triton.w4_gemm(xq, xs, packed, scales, lr, lora_up, bias, x2.dtype)


def _low_rank(x2, inv_smooth, lora_down, lora_up) -> torch.Tensor:
    """((x'·L2ᵀ) rounded to x's dtype)·L1ᵀ in FP32, with 16-bit inputs as the kernel has them."""
    if lora_down is None:
        return torch.zeros((), device=x2.device)
    xs16 = (x2.float() if inv_smooth is None else x2.float() * inv_smooth).to(x2.dtype)
    down = (xs16.float() @ lora_down.to(x2.dtype).float().t()).to(x2.dtype)
    return down.float() @ lora_up.to(x2.dtype).float().t()


def _like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(dtype=x.dtype).contiguous()


def _check(x, packed, scales, act_bits, act_group, lora_down, lora_up) -> None:
    k = x.shape[-1]
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] * 2 != k:
        raise ValueError(f"packed must be uint8 [N, K/2] with K={k}, got {packed.dtype} {tuple(packed.shape)}")
    if tuple(scales.shape) != (packed.shape[0], k // GROUP_SIZE) or k % GROUP_SIZE:
        raise ValueError(f"scales must be [N, K/{GROUP_SIZE}] = {(packed.shape[0], k // GROUP_SIZE)}, "
                         f"got {tuple(scales.shape)}")
    if act_bits not in (4, 8):
        raise ValueError(f"act_bits must be 4 or 8, got {act_bits}")
    if act_group not in (None, GROUP_SIZE):
        raise ValueError(f"act_group must be None (per token) or {GROUP_SIZE}, got {act_group}")
    if (lora_down is None) != (lora_up is None):
        raise ValueError("lora_down and lora_up come together")
    if lora_down is not None and (lora_down.shape[1] != k or lora_up.shape != (packed.shape[0], lora_down.shape[0])):
        raise ValueError(f"lora shapes must be L2 [r, {k}] and L1 [{packed.shape[0]}, r]")
