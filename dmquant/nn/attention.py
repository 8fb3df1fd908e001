"""Quantized attention for every diffusers attention module, without copying a processor body.

:class:`QuantAttention` wraps the module's own processor (FLUX's, SD3's, Wan's, ... or the classic
``AttnProcessor2_0``). While that processor runs, a :class:`torch.overrides.TorchFunctionMode` routes
its core attention call, ``torch.nn.functional.scaled_dot_product_attention``, through dmquant; every
other op runs untouched. That call is where diffusers' processors end: the classic ones call SDPA
directly (tensors ``[B, H, S, D]``), the modern ones through diffusers' dispatcher
(``dispatch_attention_fn``, tensors ``[B, S, H, D]``), whose ``native`` backend (the default) permutes
to ``[B, H, S, D]`` and calls SDPA. So Q, K and V arrive after rotary embeddings, q/k norms and the
joint text+image concatenation, with masks exactly as diffusers built them; the quantizers are per
tensor, so the layout does not matter.

Why SDPA and not the dispatcher: each model file imports ``dispatch_attention_fn`` by name, so
intercepting it means patching diffusers' module globals, and the classic processors never call it.
The SDPA hook covers both paths with one mechanism and patches nothing. What it cannot see: processors
that compute attention otherwise (SANA's linear attention, a non-native dispatcher backend such as
flash or sage). The wrapper counts the calls it routed; calibration leaves the modules that routed none
in full precision and says so in one warning (:func:`dmquant.nn.wrap.release_unrouted_attention`).

Routes: ``fake-quant`` (the module's :class:`AttentionQuantizers`, ``attn.dmq_quant``: Q, K, V and
optionally the softmax output) and ``int8`` (the SageAttention-style kernel of
:mod:`dmquant.kernels.attention`; masks that act on keys alone become its key bias, anything else runs
full-precision SDPA for that call).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dmquant.errors import DMQuantError
from dmquant.kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, int8_attention
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.timetable import TimeTable

KERNELS = ("fake-quant", "int8")


class AttentionQuantizers(nn.Module):
    """The activation quantizers of the two attention matmuls, attached to an attention module as
    ``dmq_quant``: ``q``, ``k`` (for Q·Kᵀ), ``v`` and optionally ``probs`` (the softmax output, for P·V)."""

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


# -- the core attention, routed ----------------------------------------------------------------------------
def fake_quant_attention(quant: AttentionQuantizers, query, key, value, attn_mask=None, dropout_p=0.0,
                         is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """SDPA on fake-quantized Q, K, V; with a ``probs`` quantizer in use, the softmax output too."""
    query, key, value = quant.q(query), quant.k(key), quant.v(value)
    if quant.probs is None or quant.probs.mode == "off":  # softmax kept in full precision: the fused kernel
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        attn_mask = keep if attn_mask is None else attn_mask
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.matmul(quant.probs(scores.softmax(dim=-1)), value)


def int8_core_attention(backend: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                        scale=None, enable_gqa=False) -> torch.Tensor:
    """The int8 kernel where it applies (key-only masks, head size in range); full-precision SDPA otherwise."""
    key_bias = key_bias_from_mask(attn_mask, query.shape[0], key.shape[-2])
    supported = (MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM and query.ndim == 4 and not is_causal
                 and not dropout_p and key.shape[1] == query.shape[1])
    if not supported or (attn_mask is not None and key_bias is None):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return int8_attention(query, key, value, scale=scale, key_bias=key_bias, backend=backend)


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


class _CoreAttentionMode(TorchFunctionMode):
    """Within the block, ``F.scaled_dot_product_attention`` calls ``attend`` instead (every other op runs as is)."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.attend(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class QuantAttention:
    """An attention processor that runs ``processor`` (the module's own) with its core attention routed
    through dmquant (``kernel``: ``fake-quant`` or ``int8``).

    diffusers filters the keyword arguments of an attention call by the signature of the processor's
    ``__call__``, so the wrapper presents ``processor``'s: ``QuantAttention(processor)`` is an instance of a
    subclass made once per processor class, whose ``__call__`` carries that signature. (A ``__call__``
    set on the instance would do for diffusers, but ``torch.compile`` cannot trace calling such an
    object.) Other attributes (``_attention_backend``, ...) are ``processor``'s.
    """

    def __new__(cls, processor=None, *args, **kwargs):
        if cls is QuantAttention and processor is not None:  # copies call __new__ with no arguments
            cls = _quant_attention_class(type(_unwrapped(processor)))
        return super().__new__(cls)

    def __init__(self, processor, kernel: str = "fake-quant", backend: str = "auto"):
        if kernel not in KERNELS:
            raise DMQuantError(f"unknown attention kernel {kernel!r}: use one of {', '.join(KERNELS)}")
        self.processor, self.kernel, self.backend = _unwrapped(processor), kernel, backend
        self.routed = 0  # core attention calls routed through dmquant in eager mode (calibration checks it)

    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, *args, **kwargs)

    def __getattr__(self, name):
        if name == "processor":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self.processor, name)

    def _run(self, attn, *args, **kwargs):
        if self.kernel == "int8":
            attend = functools.partial(int8_core_attention, self.backend)
        else:
            attend = functools.partial(fake_quant_attention, attn.dmq_quant)
        if torch.compiler.is_compiling():
            routed = attend  # no Python counter in a compiled graph (an int attribute read is a guard: a recompile per call)
        else:
            def routed(*a, **k):
                self.routed += 1
                return attend(*a, **k)

        with _CoreAttentionMode(routed):
            return self.processor(attn, *args, **kwargs)


def _unwrapped(processor):
    return processor.processor if isinstance(processor, QuantAttention) else processor


@functools.lru_cache(maxsize=None)
def _quant_attention_class(processor_cls: type) -> type:
    """The subclass of :class:`QuantAttention` whose ``__call__`` has ``processor_cls.__call__``'s signature."""
    bound = inspect.signature(processor_cls.__call__)
    params = list(bound.parameters.values())[1:]  # the processor's own ``self`` dropped
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)

    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, *args, **kwargs)

    __call__.__signature__ = bound.replace(parameters=[this, *params])
    return type(QuantAttention.__name__, (QuantAttention,), {"__call__": __call__, "__module__": __name__,
                                                             "__qualname__": QuantAttention.__qualname__})
