"""Frozen low-bit layers: real integer storage and, where the format allows it, integer compute.

``IntLinear`` / ``IntConv2d`` hold a :class:`~dmquant.quantizers.packed.QuantizedWeight` (int8 or
packed int4), the bias, and the input's static scale and zero point. Paths, chosen per layer:

* static activations + per-channel symmetric weights: ``x`` is quantized to uint8 codes and the
  layer runs as int8 x uint8 -> int32 on oneDNN (``dmquant.kernels.cpu_int8``); int4 weights are
  unpacked to int8 once, when the kernel's packed weight is built (lazily, not saved);
* otherwise (weight-only, group scales, dynamic per-token activations): the input is fake-quantized
  as in simulation and the weight is dequantized on the fly, so memory stays low-bit.

Both paths compute the same integers as the simulation; they differ only in float rounding.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.formats import IntFormat
from dmquant.kernels import cpu_int8
from dmquant.nn.layers import QuantConv2d, QuantLinear, _QuantLayer
from dmquant.quantizers.affine import fake_quant, fake_quant_inference, qparams_from_range
from dmquant.quantizers.granularity import from_rows, to_rows
from dmquant.quantizers.packed import QuantizedWeight


class ActSpec:
    """How a frozen layer's input is quantized: ``static`` (stored scale) or ``token`` (dynamic)."""

    def __init__(self, bits: int, qmin: int, qmax: int, granularity: str, symmetric: bool):
        self.bits, self.qmin, self.qmax = int(bits), int(qmin), int(qmax)
        self.granularity, self.symmetric = granularity, bool(symmetric)

    @classmethod
    def from_quantizer(cls, q) -> ActSpec:
        return cls(q.config.bits, q.fmt.qmin, q.fmt.qmax, q.config.granularity, q.config.symmetric)

    def spec(self) -> dict:
        return {"bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "granularity": self.granularity,
                "symmetric": self.symmetric}

    @property
    def static(self) -> bool:
        return self.granularity == "tensor"


class _IntLayer(nn.Module):
    channel_dim = -1

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, act: ActSpec | None, device="cpu"):
        super().__init__()
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.act = act
        if act is not None and act.static:
            self.register_buffer("input_scale", torch.empty((), device=device))
            self.register_buffer("input_zero_point", torch.empty((), device=device))
        self._packed = None

    @property
    def integer_path(self) -> bool:
        return (self.act is not None and self.act.static and self.qweight.per_channel_symmetric
                and self.act.qmax - self.act.qmin <= 255 and cpu_int8.onednn_available()
                and self.qweight.qdata.device.type == "cpu")

    def _apply(self, fn, recurse=True):
        self._packed = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _input_codes(self, x: torch.Tensor):
        """uint8 codes of ``x`` and their zero point (a signed grid is shifted by 128).

        Layers that read the same tensor with the same range (an attention's to_q, to_k, to_v)
        share one quantization: the last result is kept with a weak reference to its input.
        """
        shift = 128 if self.act.qmin < 0 else 0
        zero = int(self.input_zero_point.item()) + shift
        key = (float(self.input_scale), zero, self.act.qmin + shift, self.act.qmax + shift)
        cached_input, version, cached_key, codes = _LAST_CODES
        if cached_input is not None and cached_input() is x and version == x._version and cached_key == key:
            return codes, zero
        codes = cpu_int8.quantize_uint8(x, *key)
        _LAST_CODES[:] = [weakref.ref(x), x._version, key, codes]
        return codes, zero

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return x
        fmt = _Grid(self.act.qmin, self.act.qmax)
        if self.act.static:
            if x.dtype == torch.float32:
                return fake_quant_inference(x, self.input_scale, self.input_zero_point, fmt)
            return fake_quant(x, self.input_scale, self.input_zero_point, fmt)
        rows = to_rows(x, "token", channel_dim=self.channel_dim)
        signed_fmt = IntFormat(self.act.bits, signed=self.act.qmin < 0)
        scale, zero = qparams_from_range(rows.amin(1), rows.amax(1), signed_fmt, self.act.symmetric)
        return from_rows(fake_quant(rows, scale[:, None], zero[:, None], fmt), x, "token", self.channel_dim)

    def weight_nbytes(self) -> int:
        return self.qweight.nbytes()


_LAST_CODES: list = [None, None, None, None]  # [weakref to input, its version, range, codes]


class _Grid:
    """The two numbers of a grid that :func:`fake_quant` reads."""

    def __init__(self, qmin: int, qmax: int):
        self.qmin, self.qmax = qmin, qmax


class IntLinear(_IntLayer):
    channel_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.integer_path:
            return F.linear(self._fake_quant_input(x), self.qweight.dequantize(x.dtype), _cast(self.bias, x))
        if self._packed is None:
            self._packed = cpu_int8.prepack_linear(self.qweight.int8())
        codes, zero = self._input_codes(x)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        y = cpu_int8.int8_linear(codes, float(self.input_scale), zero, self._packed, self.qweight.channel_scales(),
                                 self.bias, out_dtype)
        return y.to(x.dtype)


class IntConv2d(_IntLayer):
    channel_dim = 1

    def __init__(self, qweight, bias, act, stride, padding, dilation, groups, device="cpu"):
        super().__init__(qweight, bias, act, device)
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), int(groups)

    def geometry(self) -> dict:
        return {"stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geo = (self.stride, self.padding, self.dilation, self.groups)
        if not self.integer_path:
            return F.conv2d(self._fake_quant_input(x), self.qweight.dequantize(x.dtype), _cast(self.bias, x), *geo)
        codes, zero = self._input_codes(x)
        if self._packed is None:
            self._packed = cpu_int8.prepack_conv2d(self.qweight.int8(), self.qweight.channel_scales(),
                                                   float(self.input_scale), zero, *geo)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        y = cpu_int8.int8_conv2d(codes, float(self.input_scale), zero, self._packed, self.qweight.channel_scales(),
                                 self.bias, *geo, out_dtype=out_dtype)
        return y.to(x.dtype)


def _cast(t, like):
    return None if t is None else t.to(like.dtype)


def freeze_layer(layer: _QuantLayer) -> _IntLayer:
    """The frozen (integer-storage) twin of a calibrated simulation layer."""
    qweight = QuantizedWeight.from_quantizer(layer.weight.detach(), layer.weight_quantizer)
    q = layer.input_quantizer
    act = None if q is None else ActSpec.from_quantizer(q)
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if isinstance(layer, QuantLinear):
        frozen = IntLinear(qweight, bias, act, layer.weight.device)
    elif isinstance(layer, QuantConv2d):
        if layer.padding_mode != "zeros":
            raise NotImplementedError("freezing a conv with padding_mode other than 'zeros'")
        frozen = IntConv2d(qweight, bias, act, layer.stride, layer.padding, layer.dilation, layer.groups,
                           layer.weight.device)
    else:
        raise TypeError(type(layer).__name__)
    if act is not None and act.static:
        frozen.input_scale = q.scale.detach().float().reshape(()).clone()
        frozen.input_zero_point = q.zero_point.detach().float().reshape(()).clone()
    return frozen
