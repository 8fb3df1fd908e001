"""Quantized twins of ``nn.Linear`` and ``nn.Conv2d`` (simulation: fake quantization).

A twin keeps the original module's parameters, quantizes its weight with a
:class:`~dmquant.quantizers.modules.WeightQuantizer` and its input with an optional
:class:`~dmquant.quantizers.modules.ActQuantizer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.config import ActQuantConfig, TimeConditioningConfig, WeightQuantConfig
from dmquant.nn.outlier import OutlierBranch, apply_branch
from dmquant.quantizers.modules import ActQuantizer, SplitActQuantizer, SplitWeightQuantizer, WeightQuantizer


class _QuantLayer(nn.Module):
    channel_dim: int = -1

    def __init__(self, layer: nn.Module, weights: WeightQuantConfig, activations: ActQuantConfig | None,
                 time: TimeConditioningConfig | None = None):
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.weight_quantizer = WeightQuantizer(weights)
        self.input_quantizer = None if activations is None else ActQuantizer(activations, self.channel_dim, time=time)
        self.quantize_weight = True
        self.weight_override = None  # a function giving the weight to use (reconstruction sets it)
        self._cached_weight: torch.Tensor | None = None
        self.outlier: OutlierBranch | None = None  # input transform and low-rank branch (outliers)

    def branch_geometry(self) -> dict | None:
        """What an :class:`OutlierBranch` needs to know of the layer (None for a linear layer)."""
        return None

    def attach_outlier_branch(self, branch: OutlierBranch) -> None:
        """Fold ``branch``'s transform into the weight and keep only the residual ``R = W' - L1·L2``
        in ``weight`` (the original weight stays untouched: the layer gets a new parameter)."""
        folded = branch.fold(self.weight)
        if branch.rank:
            matrix = folded.reshape(folded.shape[0], -1)
            from dmquant.quantizers.outliers import svd_split

            l1, l2, _ = svd_split(matrix, branch.rank)
            branch.set_low_rank(l1, l2)
            folded = (matrix - branch.low_rank_weight()).reshape(folded.shape)
        self.weight = nn.Parameter(folded.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        self.outlier = branch.to(self.weight.device)
        self._cached_weight = None

    @property
    def split(self) -> int | None:
        """The channel index where the input is a concatenation with its own quantizers, or None."""
        for q in (self.weight_quantizer, self.input_quantizer):
            if isinstance(q, (SplitWeightQuantizer, SplitActQuantizer)):
                return q.split
        return None

    def split_quantizers(self, split: int, weights: bool = True, activations: bool = True) -> None:
        """Give the two parts of the input (channels ``[:split]`` and ``[split:]``) their own quantizers."""
        if weights:
            self.weight_quantizer = SplitWeightQuantizer(self.weight_quantizer.config, split)
            self._cached_weight = None
        q = self.input_quantizer
        if activations and q is not None:
            parts = tuple(ActQuantizer(q.config, self.channel_dim, time=q.time) for _ in range(2))
            self.input_quantizer = SplitActQuantizer(parts, split, self.channel_dim)

    def calibrate_weight(self) -> None:
        self.weight_quantizer.calibrate(self.weight.detach())
        self._cached_weight = None

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with: fake-quantized (cached outside training) or as is."""
        if self.weight_override is not None:
            return self.weight_override()
        if not self.quantize_weight:
            return self.weight
        if self.training or torch.is_grad_enabled() and self.weight.requires_grad:
            return self.weight_quantizer(self.weight)
        cached = self._cached_weight
        if cached is None or cached.device != self.weight.device or cached.dtype != self.weight.dtype:
            cached = self._cached_weight = self.weight_quantizer(self.weight).detach()
        return cached

    def set_act_mode(self, mode: str) -> None:
        if self.input_quantizer is not None:
            self.input_quantizer.set_mode(mode)

    def _apply(self, fn, recurse=True):
        self._cached_weight = None
        return super()._apply(fn, recurse)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_branch(self.outlier, self._main, x, self.channel_dim)

    def _main(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on its (already transformed) input: quantized input times quantized weight."""
        raise NotImplementedError


class QuantLinear(_QuantLayer):
    channel_dim = -1

    def __init__(self, layer: nn.Linear, weights: WeightQuantConfig, activations: ActQuantConfig | None,
                 time: TimeConditioningConfig | None = None):
        super().__init__(layer, weights, activations, time)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def _main(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {_bits(self)}"


class QuantConv2d(_QuantLayer):
    channel_dim = 1

    def __init__(self, layer: nn.Conv2d, weights: WeightQuantConfig, activations: ActQuantConfig | None,
                 time: TimeConditioningConfig | None = None):
        super().__init__(layer, weights, activations, time)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.padding_mode = layer.padding_mode
        self._reversed_padding = getattr(layer, "_reversed_padding_repeated_twice", None)

    def branch_geometry(self) -> dict | None:
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return {"unsupported": True}
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation}

    def _main(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        weight = self.effective_weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {_bits(self)}"


def _bits(layer: _QuantLayer) -> str:
    a = "16" if layer.input_quantizer is None else str(layer.input_quantizer.config.bits)
    return f"W{layer.weight_quantizer.config.bits}A{a}"


def quant_twin(layer: nn.Module, weights: WeightQuantConfig, activations: ActQuantConfig | None,
               time: TimeConditioningConfig | None = None) -> _QuantLayer:
    """The quantized twin of a ``nn.Linear`` or ``nn.Conv2d`` (the twin shares its parameters)."""
    if isinstance(layer, nn.Linear):
        return QuantLinear(layer, weights, activations, time)
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d(layer, weights, activations, time)
    raise TypeError(f"no quantized twin for {type(layer).__name__}")
