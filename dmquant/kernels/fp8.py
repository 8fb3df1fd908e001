"""W8A8 in float8 e4m3: ``torch._scaled_mm`` on the FP8 tensor cores (CUDA, compute capability 8.9+:
Ada, Hopper, Blackwell), and its float32 reference everywhere else.

``fp8_linear(x, w_codes, w_scale, act_scale, bias)`` computes ``y = Q(x) · Wᵀ + bias`` where ``W = codes
* w_scale`` (one scale per output channel) and ``Q(x) = float8(clamp(x / s, ±448)) * s`` with ``s`` the
static per-tensor ``act_scale`` or, when it is ``None``, ``amax / 448`` of each token (row), computed on
the fly in float32. The activation codes are the ones :func:`dmquant.quantizers.affine.float8_codes`
gives (same float32 division, same cast), so the GEMM differs from the simulated layer only by the
order in which it sums and scales.
"""

from __future__ import annotations

import torch

from dmquant.formats import FloatFormat

FP8 = FloatFormat("e4m3")
_EPS = 1e-12  # the scale floor of dmquant.quantizers.affine.qparams_from_range
MIN_CAPABILITY = (8, 9)
ALIGN = 16  # _scaled_mm needs K and N multiples of 16


def quantize_rows(x2: torch.Tensor, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of a 2-D activation: float8 codes and a float32 ``(M, 1)`` scale (per token,
    or the static scale repeated)."""
    if act_scale is None:
        amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True)  # exact in x's dtype
        scale = (amax.float() / FP8.max).clamp_min(_EPS)
    else:
        scale = act_scale.detach().to(x2.device, torch.float32).reshape(1, 1).expand(x2.shape[0], 1).contiguous()
    q = x2 / scale  # float32 by type promotion: the division of dmquant.quantizers.affine.float8_codes
    return q.clamp_(-FP8.max, FP8.max).to(FP8.dtype), scale


def capable(device: torch.device) -> bool:
    """Whether ``device`` has float8 tensor cores (CUDA, compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def fp8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, act_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[..., K]`` (float32/16, bfloat16) times float8 ``w_codes`` ``[N, K]`` with float32 ``w_scale``
    ``[N]`` (or one value), in ``x``'s dtype. ``torch._scaled_mm`` with row-wise scales on a capable GPU;
    :func:`fp8_linear_reference` (float32) elsewhere."""
    if not capable(x.device):
        return fp8_linear_reference(x, w_codes, w_scale, act_scale, bias)
    n, k = w_codes.shape
    x2 = x.reshape(-1, k)
    codes, scale_a = quantize_rows(x2, act_scale)
    scale_b = w_scale.detach().float().reshape(1, -1).expand(1, n).contiguous()
    fused_bias = bias is not None and x.dtype != torch.float32  # _scaled_mm adds no bias to float32 outputs
    out = torch._scaled_mm(codes, w_codes.t(), scale_a=scale_a, scale_b=scale_b,
                           bias=bias.to(x.dtype) if fused_bias else None, out_dtype=x.dtype)
    if bias is not None and not fused_bias:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], n)


def fp8_linear_reference(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                         act_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The same product in float32 on any device: the decoded codes multiplied, then both scales."""
    n, k = w_codes.shape
    x2 = x.reshape(-1, k)
    codes, scale_a = quantize_rows(x2, act_scale)
    out = (codes.float() @ w_codes.float().t()) * scale_a * w_scale.detach().float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
