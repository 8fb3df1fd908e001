"""Swap a denoiser's layers for quantized twins, and its attention for a quantized processor."""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from dmquant.config import QuantConfig
from dmquant.errors import DMQuantError
from dmquant.models.adapters import DenoiserAdapter
from dmquant.nn.attention import AttentionQuantizers, QuantAttnProcessor
from dmquant.nn.layers import _QuantLayer, quant_twin
from dmquant.quantizers.granularity import check_group_size
from dmquant.quantizers.modules import SplitActQuantizer


@dataclass
class WrapReport:
    quantized: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    split: dict[str, int] = field(default_factory=dict)


def selected(name: str, config: QuantConfig, adapter: DenoiserAdapter) -> bool:
    """Whether the layer ``name`` is quantized under ``config`` (include, then exclude patterns)."""
    if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return False
    excludes = config.exclude + (adapter.default_exclude if config.use_default_excludes else ())
    return not any(fnmatch.fnmatchcase(name, p) for p in excludes)


def wrap_denoiser(model: nn.Module, config: QuantConfig, adapter: DenoiserAdapter) -> WrapReport:
    """Replace the selected ``nn.Linear``/``nn.Conv2d`` layers of ``model`` in place; quantize attention."""
    if any(isinstance(m, _QuantLayer) for m in model.modules()):
        raise DMQuantError("this denoiser is quantized already: load the full-precision model again to re-quantize")
    report = WrapReport()
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    for name, layer in targets:
        if not selected(name, config, adapter):
            report.excluded.append(name)
            continue
        if config.weights.granularity == "group":
            check_group_size(layer.weight[0].numel(), config.weights.group_size, where=f"layer {name!r}")
        a = config.activations
        if a is not None and a.granularity == "group":
            channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            check_group_size(channels, a.group_size, where=f"the input channels of layer {name!r} "
                             "(activations.group_size)")
        _set_submodule(model, name, quant_twin(layer, config.weights, config.activations, config.time))
        report.quantized.append(name)
    if config.attention is not None:
        report.attention = _wrap_attention(model, config)
    if not report.quantized:
        raise DMQuantError("the recipe's include/exclude patterns select no layer of the denoiser: widen 'include'")
    if config.split is not None:
        report.split = split_concatenations(model, config, adapter)
    if config.time is not None:
        from dmquant.nn.timestep import install_timestep_hook

        install_timestep_hook(model, adapter)
    return report


def split_concatenations(model: nn.Module, config: QuantConfig, adapter: DenoiserAdapter) -> dict[str, int]:
    """Split quantizers on the wrapped layers that consume a skip concatenation (the adapter finds them)."""
    done = {}
    for name, split in adapter.concat_points(model):
        layer = model.get_submodule(name)
        if isinstance(layer, _QuantLayer):
            layer.split_quantizers(split, config.split.weights, config.split.activations)
            done[name] = split
    return done


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers attention modules: those that take a processor (``set_processor``)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def _wrap_attention(model: nn.Module, config: QuantConfig) -> list[str]:
    names = []
    for name, attn in attention_modules(model):
        quantize_attention(attn, config.attention, config.time)
        names.append(name)
    return names


def quantize_attention(attn: nn.Module, config, time=None) -> None:
    """Give one diffusers attention module the processor (and quantizers) ``config`` asks for."""
    if config.kernel == "int8":
        from dmquant.nn.int8_attention import Int8AttnProcessor

        attn.set_processor(Int8AttnProcessor())
        return
    attn.dmq_quant = AttentionQuantizers(config, time)
    attn.set_processor(QuantAttnProcessor())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quant_layers(model: nn.Module) -> list[tuple[str, _QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLayer)]


def activation_quantizers(model: nn.Module):
    """Every activation quantizer of the wrapped denoiser (layer inputs and attention operands)."""
    out = []
    for module in model.modules():
        if isinstance(module, _QuantLayer) and isinstance(module.input_quantizer, SplitActQuantizer):
            out.extend(module.input_quantizer.parts)
        elif isinstance(module, _QuantLayer) and module.input_quantizer is not None:
            out.append(module.input_quantizer)
        elif isinstance(module, AttentionQuantizers):
            out.extend(module.quantizers())
    return out


def set_activation_mode(model: nn.Module, mode: str) -> None:
    for quantizer in activation_quantizers(model):
        quantizer.set_mode(mode)


@contextmanager
def full_precision(model: nn.Module):
    """Within the block a wrapped (simulated) denoiser computes in full precision; modes are restored after."""
    quantizers = activation_quantizers(model)
    layers = [layer for _, layer in quant_layers(model)]
    modes = [q.mode for q in quantizers]
    flags = [(layer.quantize_weight, getattr(layer, "weight_override", None)) for layer in layers]
    for q in quantizers:
        q.mode = "off"
    for layer in layers:
        layer.quantize_weight, layer.weight_override = False, None
    try:
        yield model
    finally:
        for q, mode in zip(quantizers, modes):
            q.mode = mode
        for layer, (flag, override) in zip(layers, flags):
            layer.quantize_weight, layer.weight_override = flag, override
