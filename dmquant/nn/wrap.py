"""Wrap a denoiser for a recipe: each selected ``nn.Linear`` / ``nn.Conv2d`` becomes one
:class:`~dmquant.nn.layers.QuantLayer`, each attention module gets its quantizers and its own processor
wrapped in :class:`~dmquant.nn.attention.QuantAttention` (the core attention call is routed; no
processor body is copied).

The recipe's layer sections are read here and nowhere else: one handler per section turns it into
quantizer constructors taking numbers (``weights`` -> :func:`weight_quantizers`, ``activations`` +
``time`` -> :func:`input_quantizers`, ``attention`` -> :func:`attention_quantizers`, ``split`` ->
:func:`split_concatenations`). A recipe with ``time`` gives the denoiser one
:class:`~dmquant.quantizers.timetable.TimeTable`, installed as a pre-hook and handed to every
quantizer built for it.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from dmquant.config import (
    ActQuantConfig,
    AttentionQuantConfig,
    QuantConfig,
    TimeConditioningConfig,
    WeightQuantConfig,
    layer_pattern_matches,
)
from dmquant.errors import DMQuantError
from dmquant.models.adapters import DenoiserAdapter
from dmquant.nn.attention import AttentionQuantizers, QuantAttention
from dmquant.nn.layers import FLOAT_TYPES, MakeInputQuantizer, MakeWeightQuantizer, QuantLayer
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.granularity import check_group_size
from dmquant.quantizers.timetable import TimeTable
from dmquant.quantizers.weight import WeightQuantizer


@dataclass
class WrapReport:
    quantized: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    split: dict[str, int] = field(default_factory=dict)


# -- one handler per recipe section ------------------------------------------------------------------------
def weight_quantizers(c: WeightQuantConfig) -> MakeWeightQuantizer:
    return lambda: WeightQuantizer(c.bits, c.symmetric, c.granularity, c.group_size, c.method, c.percentile,
                                   number_format=c.format, scale_dtype=c.scale_dtype)


def _time_kwargs(table: TimeTable | None, time: TimeConditioningConfig | None) -> dict:
    if table is None or time is None:
        return {}
    return {"table": table, "table_mode": time.mode, "num_intervals": time.num_intervals,
            "mlp": (time.embedding_dim, time.hidden_dim), "mlp_iterations": time.iterations}


def input_quantizers(c: ActQuantConfig | None, table: TimeTable | None,
                     time: TimeConditioningConfig | None) -> MakeInputQuantizer | None:
    if c is None:
        return None
    return lambda channel_dim: ActQuantizer(c.bits, symmetric=c.symmetric, granularity=c.granularity,
                                            group_size=c.group_size, method=c.method, percentile=c.percentile,
                                            channel_dim=channel_dim, number_format=c.format,
                                            **_time_kwargs(table, time))


def attention_quantizers(c: AttentionQuantConfig, table: TimeTable | None,
                         time: TimeConditioningConfig | None) -> Callable[[], AttentionQuantizers]:
    """Q, K, V static symmetric per tensor; the softmax output unsigned min-max (or kept in FP)."""
    def operand() -> ActQuantizer:
        return ActQuantizer(c.bits, symmetric=True, method=c.method, **_time_kwargs(table, time))

    def probs() -> ActQuantizer | None:
        if c.probs_bits is None:
            return None
        return ActQuantizer(c.probs_bits, symmetric=False, signed=False, method="minmax", **_time_kwargs(table, time))

    return lambda: AttentionQuantizers(operand(), operand(), operand(), probs())


def layer_kind(layer: nn.Module) -> str:
    """``linear`` or ``conv``: the kind a ``layers`` pattern of a recipe can select (``conv:*``)."""
    return "conv" if isinstance(layer, nn.Conv2d) or getattr(layer, "kind", None) == "conv2d" else "linear"


def layer_quantizers(name: str, config: QuantConfig, table: TimeTable | None, kind: str | None = None
                     ) -> tuple[MakeWeightQuantizer, MakeInputQuantizer | None]:
    """The weight and input quantizer constructors of the layer ``name`` of ``kind`` (the recipe's sections,
    or the layer's own under ``layers``: mixed precision, kinds of layers)."""
    w, a = config.layer_sections(name, kind)
    return weight_quantizers(w), input_quantizers(a, table, config.time)


# -- wrapping ----------------------------------------------------------------------------------------------
def selected(name: str, config: QuantConfig, adapter: DenoiserAdapter, kind: str | None = None) -> bool:
    """Whether the layer ``name`` (of ``kind``) is quantized under ``config`` (include, then exclude
    patterns; a pattern may name a kind, ``conv:*``, as in ``layers``)."""
    if not any(layer_pattern_matches(p, name, kind) for p in config.include):
        return False
    excludes = config.exclude + (adapter.default_exclude if config.use_default_excludes else ())
    return not any(layer_pattern_matches(p, name, kind) for p in excludes)


def _check_groups(name: str, layer: nn.Module, config: QuantConfig, kind: str) -> None:
    w, a = config.layer_sections(name, kind)
    if w.granularity == "group":
        check_group_size(layer.weight[0].numel(), w.group_size, where=f"layer {name!r}")
    if a is not None and a.granularity == "group":
        channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        check_group_size(channels, a.group_size, where=f"the input channels of layer {name!r} (activations.group_size)")


def wrap_denoiser(model: nn.Module, config: QuantConfig, adapter: DenoiserAdapter) -> WrapReport:
    """Replace the selected layers of ``model`` in place by simulated quantized layers; quantize attention."""
    if quant_layers(model):
        raise DMQuantError("this denoiser is quantized already: load the full-precision model again to re-quantize")
    table = TimeTable().install(model, adapter.read_timestep) if config.time is not None else None
    report = WrapReport()
    for name, layer in [(n, m) for n, m in model.named_modules() if type(m) in FLOAT_TYPES]:
        kind = layer_kind(layer)
        if not selected(name, config, adapter, kind):
            report.excluded.append(name)
            continue
        _check_groups(name, layer, config, kind)
        make_weight, make_input = layer_quantizers(name, config, table, kind)
        model.set_submodule(name, FLOAT_TYPES[type(layer)].wrap(layer, make_weight, make_input))
        report.quantized.append(name)
    if not report.quantized:
        raise DMQuantError("the recipe's include/exclude patterns select no layer of the denoiser: widen 'include'")
    if config.attention is not None and adapter.quantize_attention:
        make_attention = attention_quantizers(config.attention, table, config.time)
        for name, attn in attention_modules(model):
            if _excluded_module(name, config, adapter):
                continue
            set_attention(attn, config.attention.kernel, make_attention())
            report.attention.append(name)
    if config.split is not None:
        report.split = split_concatenations(model, config, adapter, table)
    if not adapter.quantize_attention:
        _warn_uncovered(model, config)
    return report


def _excluded_module(name: str, config: QuantConfig, adapter: DenoiserAdapter) -> bool:
    """Attention inside an excluded part (e.g. HunyuanVideo's text refiner, ``context_embedder.*``) stays FP."""
    excludes = config.exclude + (adapter.default_exclude if config.use_default_excludes else ())
    return any(fnmatch.fnmatchcase(name, p) for p in excludes)


def _warn_uncovered(model: nn.Module, config: QuantConfig) -> None:
    """One warning for a denoiser of no known family: what stays in full precision."""
    cls = type(model).__name__
    attention = len(attention_modules(model)) if config.attention is not None else 0
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv3d))})
    left = ([f"{attention} attention modules"] if attention else []) + ([f"layers of type {', '.join(others)}"]
                                                                         if others else [])
    left.append("no default exclusions (embedders and the final layer are quantized unless the recipe excludes "
                "them) and no block types for BRECQ")
    warnings.warn(f"dmquant has no adapter for the denoiser {cls}: its Linear and Conv2d layers are quantized; not "
                  f"covered: {'; '.join(left)}", stacklevel=3)


def split_concatenations(model: nn.Module, config: QuantConfig, adapter: DenoiserAdapter,
                         table: TimeTable | None) -> dict[str, int]:
    """Split quantizers on the wrapped layers that consume a skip concatenation (the adapter finds them)."""
    s = config.split
    done = {}
    for name, split in adapter.concat_points(model):
        layer = model.get_submodule(name)
        if isinstance(layer, QuantLayer):
            make_weight, make_input = layer_quantizers(name, config, table, layer_kind(layer))
            layer.split_quantizers(split, make_weight if s.weights else None, make_input if s.activations else None)
            done[name] = split
    return done


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers attention modules: those that take a processor (``set_processor``)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def set_attention(attn: nn.Module, kernel: str, quantizers: AttentionQuantizers | None) -> None:
    """Route one diffusers attention module's core attention through dmquant: the int8 kernel (no
    quantizers), or fake-quantized Q, K, V (and probabilities) with ``quantizers`` attached as
    ``attn.dmq_quant``. The module's own processor keeps doing everything else."""
    if kernel != "int8":
        attn.dmq_quant = quantizers
    attn.set_processor(QuantAttention(attn.processor, kernel))


def quantized_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules whose core attention dmquant routes."""
    return [(n, m) for n, m in attention_modules(model) if isinstance(m.processor, QuantAttention)]


def release_unrouted_attention(model: nn.Module) -> list[str]:
    """After an observation pass: give the attention modules whose processor never called SDPA (linear
    attention, a non-native dispatcher backend) their own processor back, with one warning; their names."""
    released = []
    for name, attn in quantized_attention(model):
        if attn.processor.routed == 0:
            attn.set_processor(attn.processor.processor)
            if hasattr(attn, "dmq_quant"):
                del attn.dmq_quant
            released.append(name)
    if released:
        warnings.warn(f"{len(released)} attention modules compute attention without scaled_dot_product_attention "
                      f"(e.g. linear attention, or a non-native attention backend) and stay in full precision: "
                      f"{', '.join(released[:4])}{', ...' if len(released) > 4 else ''}", stacklevel=2)
    return released


# -- walking a wrapped denoiser ----------------------------------------------------------------------------
def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def activation_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every activation quantizer of the wrapped denoiser (layer inputs and attention operands)."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def time_table(model: nn.Module) -> TimeTable | None:
    """The denoiser's one TimeTable (None without time-conditioned quantizers)."""
    return next((q.table for q in activation_quantizers(model) if q.table is not None), None)


def set_activation_mode(model: nn.Module, mode: str) -> None:
    for quantizer in activation_quantizers(model):
        quantizer.set_mode(mode)


@contextmanager
def full_precision(model: nn.Module):
    """Within the block a wrapped (simulated) denoiser computes in full precision; modes are restored after."""
    quantizers = activation_quantizers(model)
    layers = [layer for _, layer in quant_layers(model)]
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.mode = "off"
    for layer in layers:
        layer.quantize_weight = False
    try:
        yield model
    finally:
        for q, mode in zip(quantizers, modes):
            q.mode = mode
        for layer in layers:
            layer.quantize_weight = True
