"""A diffusers attention processor whose Q·Kᵀ runs in int8 through :func:`dmquant.kernels.int8_attention`.

The projections, norms and output path are those of every diffusers processor
(:class:`dmquant.nn.attention.AttentionProcessorBase`); only the scaled-dot-product call changes.
Masks that act on keys alone (padding of text tokens, PixArt's T5 mask) become the kernel's key bias;
any other mask, or a head size outside the kernel's range, runs full-precision SDPA for that call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, int8_attention
from dmquant.nn.attention import AttentionProcessorBase


class Int8AttnProcessor(AttentionProcessorBase):
    """SageAttention-style int8 attention for diffusers ``Attention`` modules.

    ``backend`` is passed to :func:`int8_attention` (``"auto"``: Triton on CUDA, torch elsewhere).
    """

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def attend(self, attn, query, key, value, attention_mask):
        key_bias = key_bias_from_mask(attention_mask, query.shape[0], key.shape[2])
        supported = MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM
        if not supported or (attention_mask is not None and key_bias is None):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        return int8_attention(query, key, value, scale=attn.scale, key_bias=key_bias, backend=self.backend)


def key_bias_from_mask(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """A ``[batch, keys]`` additive bias if ``mask`` (as SDPA takes it) depends on batch and key only."""
    if mask is None:
        return None
    if mask.ndim != 4 or mask.shape[0] != batch or mask.shape[-1] != keys:
        return None
    if mask.shape[2] != 1 or (mask.shape[1] > 1 and not torch.equal(mask, mask[:, :1].expand_as(mask))):
        return None
    bias = mask[:, 0, 0, :]
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, device=bias.device).masked_fill(~bias, float("-inf"))
    return bias.float()


def apply_int8_attention(model: nn.Module, *, self_attention: bool = True, cross_attention: bool = True,
                         backend: str = "auto") -> int:
    """Give every selected diffusers ``Attention`` in ``model`` an :class:`Int8AttnProcessor`; returns the count."""
    count = 0
    for module in model.modules():
        if not hasattr(module, "set_processor") or not hasattr(module, "to_q"):
            continue
        is_cross = bool(getattr(module, "is_cross_attention", False))
        if (cross_attention if is_cross else self_attention):
            module.set_processor(Int8AttnProcessor(backend))
            count += 1
    return count
