"""Attention processors for diffusers ``Attention`` modules.

``AttentionProcessorBase`` does what every diffusers attention processor does around the core
(projections, reshapes, norms, output projection, residual) and leaves one method to subclasses:
``attend(attn, query, key, value, attention_mask)`` on tensors shaped (batch, heads, tokens, head_dim).
Processors are swapped in with ``set_attn_processor``; no diffusers code is patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.timetable import TimeTable


class AttentionProcessorBase:
    """Projections and bookkeeping of a diffusers attention call; subclasses implement ``attend``."""

    def attend(
        self,
        attn: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = None
        if hidden_states.ndim == 4:
            spatial_shape = hidden_states.shape
            b, c, h, w = spatial_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_split_heads(t, batch_size, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self.attend(attn, query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _split_heads(t: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return t.view(batch, -1, heads, head_dim).transpose(1, 2)


class SDPAProcessor(AttentionProcessorBase):
    """Plain full-precision attention through ``F.scaled_dot_product_attention`` (a reference)."""

    def attend(self, attn, query, key, value, attention_mask):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)


class AttentionQuantizers(nn.Module):
    """The activation quantizers of the two attention matmuls, attached to an ``Attention`` module:
    ``q``, ``k`` (for Q·Kᵀ), ``v`` and optionally ``probs`` (the softmax output, for P·V)."""

    def __init__(self, q: ActQuantizer, k: ActQuantizer, v: ActQuantizer, probs: ActQuantizer | None = None):
        super().__init__()
        self.q, self.k, self.v, self.probs = q, k, v, probs

    def quantizers(self) -> list[ActQuantizer]:
        return [m for m in (self.q, self.k, self.v, self.probs) if m is not None]

    def spec(self) -> dict:
        return {name: None if q is None else q.spec()
                for name, q in (("q", self.q), ("k", self.k), ("v", self.v), ("probs", self.probs))}

    @classmethod
    def from_spec(cls, spec: dict, table: TimeTable | None, device="meta") -> AttentionQuantizers:
        return cls(*(None if spec[n] is None else ActQuantizer.from_spec(spec[n], table, device)
                     for n in ("q", "k", "v", "probs")))


class QuantAttnProcessor(AttentionProcessorBase):
    """Attention with fake-quantized Q, K (for Q·Kᵀ), softmax probabilities and V (for P·V).

    The quantizers live on the attention module as ``attn.dmq_quant`` (an :class:`AttentionQuantizers`).
    """

    def attend(self, attn, query, key, value, attention_mask):
        quant = attn.dmq_quant
        query, key, value = quant.q(query), quant.k(key), quant.v(value)
        if quant.probs is None or quant.probs.mode == "off":  # softmax kept in full precision: fused kernel
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        if quant.probs is not None:
            probs = quant.probs(probs)
        return torch.matmul(probs, value)
