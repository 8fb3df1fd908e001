"""Frozen low-bit layers: real integer storage and, where the format allows it, integer compute.

``IntLinear`` / ``IntConv2d`` hold a :class:`~dmquant.quantizers.packed.QuantizedWeight` (int8 or
packed int4), the bias, and the input's static scale and zero point. Paths, chosen per layer:

* static activations + per-channel symmetric weights: ``x`` is quantized to uint8 codes and the
  layer runs as int8 x uint8 -> int32 on oneDNN (``dmquant.kernels.cpu_int8``); int4 weights are
  unpacked to int8 once, when the kernel's packed weight is built (lazily, not saved);
* otherwise (weight-only, group scales, dynamic per-token activations): the input is fake-quantized
  as in simulation and the weight is dequantized on the fly, so memory stays low-bit.

Both paths compute the same integers as the simulation; they differ only in float rounding.

Time-conditioned inputs store tables ``input_scale``/``input_zero_point`` of shape ``[K]`` beside
``input_timesteps`` ``[K]`` and read the current step's entry from the denoiser's timestep state (the
same lookup as the simulation). A layer fed by a skip concatenation with split quantizers freezes to
:class:`IntSplitLayer`: two frozen layers on the two channel parts, outputs added.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.formats import IntFormat
from dmquant.kernels import cpu_int8
from dmquant.nn.layers import QuantConv2d, QuantLinear, _QuantLayer
from dmquant.nn.outlier import OutlierBranch, apply_branch
from dmquant.quantizers.affine import fake_quant, fake_quant_inference, qparams_from_range
from dmquant.quantizers.granularity import dynamic_rows, from_dynamic_rows
from dmquant.quantizers.modules import SplitActQuantizer, SplitWeightQuantizer, split_channels
from dmquant.quantizers.packed import QuantizedWeight


class ActSpec:
    """How a frozen layer's input is quantized: ``static`` (stored scale) or ``token`` (dynamic)."""

    def __init__(self, bits: int, qmin: int, qmax: int, granularity: str, symmetric: bool, table: int = 0,
                 group_size: int | None = None, learned: dict | None = None):
        self.bits, self.qmin, self.qmax = int(bits), int(qmin), int(qmax)
        self.granularity, self.symmetric = granularity, bool(symmetric)
        self.table = int(table)  # entries of the timestep table; 0: one static scale
        self.group_size = None if group_size is None else int(group_size)  # granularity 'group' only
        self.learned = learned  # TDQ: {"num_frequencies", "hidden"} of the range MLP kept with the table

    @classmethod
    def from_quantizer(cls, q) -> ActSpec:
        table = q.scale.numel() if q.config.static and q.scale.ndim == 1 else 0
        learned = {"num_frequencies": q.time.embedding_dim, "hidden": q.time.hidden_dim} if q.learned else None
        return cls(q.config.bits, q.fmt.qmin, q.fmt.qmax, q.config.granularity, q.config.symmetric, table,
                   q.config.group_size if q.config.granularity == "group" else None, learned)

    def spec(self) -> dict:
        spec = {"bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "granularity": self.granularity,
                "symmetric": self.symmetric}
        if self.table:
            spec["table"] = self.table
        if self.group_size is not None:
            spec["group_size"] = self.group_size
        if self.learned is not None:
            spec["learned"] = dict(self.learned)
        return spec

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
        self.time_state = None
        shape = (act.table,) if act is not None and act.table else ()
        if act is not None and act.static:
            self.register_buffer("input_scale", torch.empty(shape, device=device))
            self.register_buffer("input_zero_point", torch.empty(shape, device=device))
        if act is not None and act.table:
            self.register_buffer("input_timesteps", torch.empty(shape, device=device))
        if act is not None and act.learned:
            from dmquant.quantizers.timestep import RangeMLP

            self.range_mlp = RangeMLP(act.learned["num_frequencies"], act.learned["hidden"]).to(device)
        self._packed = None

    @property
    def learned(self) -> bool:
        """Whether the layer keeps its TDQ range MLP (its table can be recomputed for other timesteps)."""
        return self.act is not None and self.act.learned is not None

    @torch.no_grad()
    def retable(self, keys: torch.Tensor) -> None:
        """TDQ: the input's scale / zero-point table for new timesteps, from the kept range MLP."""
        lo, hi = self.range_mlp(keys.float().to(self.input_scale.device))
        fmt = IntFormat(self.act.bits, signed=self.act.qmin < 0)
        scale, zero = qparams_from_range(lo, hi, fmt, self.act.symmetric)
        self.input_scale, self.input_zero_point = scale.reshape(-1).float(), zero.reshape(-1).float()
        self.input_timesteps = keys.float().clone().to(self.input_scale.device)
        self.act.table = int(keys.numel())
        self._packed = None

    @property
    def time_conditioned(self) -> bool:
        return self.act is not None and self.act.table > 0

    @property
    def timesteps(self) -> torch.Tensor | None:
        return self.input_timesteps if self.time_conditioned else None

    def _qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The input's scale and zero point in force now (the current step's entry for a table)."""
        if not self.time_conditioned:
            return self.input_scale, self.input_zero_point
        if self.time_state is None:
            from dmquant.errors import DMQuantError

            raise DMQuantError("a frozen time-conditioned layer has no timestep source: load the model with "
                               "dmquant.load_quantized_denoiser, which installs the timestep hook")
        index = self.time_state.current_index()
        return self.input_scale[index], self.input_zero_point[index]

    def _packed_key(self):
        return self.time_state.current_index() if self.time_conditioned else None

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
        """uint8 codes of ``x``, their scale and zero point (a signed grid is shifted by 128).

        Layers that read the same tensor with the same range (an attention's to_q, to_k, to_v)
        share one quantization: the last result is kept with a weak reference to its input.
        """
        shift = 128 if self.act.qmin < 0 else 0
        scale, zero_point = self._qparams()
        zero = int(zero_point.item()) + shift
        key = (float(scale), zero, self.act.qmin + shift, self.act.qmax + shift)
        cached_input, version, cached_key, codes = _LAST_CODES
        if cached_input is not None and cached_input() is x and version == x._version and cached_key == key:
            return codes, key[0], zero
        codes = cpu_int8.quantize_uint8(x, *key)
        _LAST_CODES[:] = [weakref.ref(x), x._version, key, codes]
        return codes, key[0], zero

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return x
        fmt = _Grid(self.act.qmin, self.act.qmax)
        if self.act.static:
            scale, zero = self._qparams()
            if x.dtype == torch.float32:
                return fake_quant_inference(x, scale, zero, fmt)
            return fake_quant(x, scale, zero, fmt)
        rows = dynamic_rows(x, self.act.granularity, self.act.group_size, self.channel_dim)
        signed_fmt = IntFormat(self.act.bits, signed=self.act.qmin < 0)
        scale, zero = qparams_from_range(rows.amin(1), rows.amax(1), signed_fmt, self.act.symmetric)
        return from_dynamic_rows(fake_quant(rows, scale[:, None], zero[:, None], fmt), x, self.channel_dim)

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
        codes, scale, zero = self._input_codes(x)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        y = cpu_int8.int8_linear(codes, scale, zero, self._packed, self.qweight.channel_scales(),
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
        codes, scale, zero = self._input_codes(x)
        if self._packed is None:
            self._packed = {}
        key = self._packed_key()  # oneDNN packs the conv with its input scale: one pack per table entry
        if key not in self._packed:
            self._packed[key] = cpu_int8.prepack_conv2d(self.qweight.int8(), self.qweight.channel_scales(),
                                                        scale, zero, *geo)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        y = cpu_int8.int8_conv2d(codes, scale, zero, self._packed[key], self.qweight.channel_scales(),
                                 self.bias, *geo, out_dtype=out_dtype)
        return y.to(x.dtype)


def _cast(t, like):
    return None if t is None else t.to(like.dtype)


class IntSplitLayer(nn.Module):
    """A frozen layer whose input is a concatenation ``[x1, x2]`` quantized in two parts (shortcut split).

    ``y = part0(x1) + part1(x2)``: each part holds its own low-bit weight (the input-channel slice) and
    input quantization; only ``part0`` has the bias. For a zero-padded conv this equals the conv of the
    concatenation with the split quantizers.
    """

    def __init__(self, parts: tuple[_IntLayer, _IntLayer], split: int, channel_dim: int):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.split, self.channel_dim = int(split), int(channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = split_channels(x, self.split, self.channel_dim)
        return self.parts[0](a) + self.parts[1](b)

    def weight_nbytes(self) -> int:
        return sum(p.weight_nbytes() for p in self.parts)


def fused_int4_supported(inner: nn.Module, branch: OutlierBranch | None) -> bool:
    """Whether :func:`dmquant.kernels.int4_linear` computes this layer in one kernel: a linear layer
    with int4 weights in groups of 64 (symmetric), 4- or 8-bit symmetric activations quantized on the
    fly per token or per group of 64, and a branch without rotation (smoothing and low rank fuse)."""
    from dmquant.kernels.int4 import GROUP_SIZE

    if not isinstance(inner, IntLinear) or (branch is not None and branch.rotation_seed is not None):
        return False
    q, a = inner.qweight, inner.act
    weight_ok = (q.bits == 4 and q.packing == "int4x2" and q.symmetric and q.granularity == "group"
                 and q.group_size == GROUP_SIZE)
    act_ok = (a is not None and not a.static and a.symmetric and a.bits in (4, 8) and a.qmin < 0
              and (a.granularity == "token" or a.group_size == GROUP_SIZE))
    return weight_ok and act_ok


def fused_int4_forward(inner: IntLinear, branch: OutlierBranch | None, x: torch.Tensor, backend: str) -> torch.Tensor:
    """The layer (and its smoothing and low-rank branch) as one call of the fused W4A4/W4A8 GEMM."""
    from dmquant.kernels.gemm import int4_linear

    q, a = inner.qweight, inner.act
    low_rank = branch is not None and branch.rank > 0
    return int4_linear(x, q.qdata, q.scale.reshape(q.shape[0], -1), act_bits=a.bits,
                       act_group=a.group_size if a.granularity == "group" else None,
                       smooth=branch.smooth if branch is not None else None,
                       lora_down=branch.lora_down if low_rank else None,
                       lora_up=branch.lora_up if low_rank else None, bias=inner.bias, backend=backend)


class IntOutlierLayer(nn.Module):
    """A frozen layer behind an outlier branch: ``inner(T(x)) + low_rank(T(x))`` (see
    :mod:`dmquant.nn.outlier`); ``inner`` holds the low-bit residual weight.

    On CUDA, a layer the fused kernel supports (:func:`fused_int4_supported`) runs as one
    :func:`dmquant.kernels.int4_linear` call (Triton; its torch path if Triton fails, with a
    warning). ``fused_backend`` forces it elsewhere (``"torch"``, ``"triton"``) or off (``"off"``).
    """

    def __init__(self, inner: nn.Module, branch: OutlierBranch, channel_dim: int):
        super().__init__()
        self.inner, self.branch, self.channel_dim = inner, branch, int(channel_dim)
        self.fused_backend: str | None = None  # None: the fused kernel on CUDA only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.fused_backend or ("auto" if x.is_cuda else "off")
        if backend != "off" and fused_int4_supported(self.inner, self.branch):
            return fused_int4_forward(self.inner, self.branch, x, backend)
        return apply_branch(self.branch, self.inner, x, self.channel_dim)

    def weight_nbytes(self) -> int:
        return self.inner.weight_nbytes() + self.branch.nbytes()


def freeze_layer(layer: _QuantLayer) -> _IntLayer | IntSplitLayer | IntOutlierLayer:
    """The frozen (integer-storage) twin of a calibrated simulation layer."""
    frozen = _freeze_split(layer) if layer.split is not None else _freeze_plain(layer)
    if layer.outlier is None:
        return frozen
    return IntOutlierLayer(frozen, copy.deepcopy(layer.outlier), layer.channel_dim)


def _freeze_plain(layer: _QuantLayer) -> _IntLayer:
    """Weight and input quantization of ``layer`` as one frozen layer (its outlier branch aside)."""
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
        shape = (act.table,) if act.table else ()
        frozen.input_scale = q.scale.detach().float().reshape(shape).clone()
        frozen.input_zero_point = q.zero_point.detach().float().reshape(shape).clone()
    if act is not None and act.table:
        frozen.input_timesteps = q.timesteps.detach().float().clone()
    if act is not None and act.learned:
        frozen.range_mlp.load_state_dict(q.range_mlp.state_dict())
    return frozen


def _freeze_split(layer: _QuantLayer) -> IntSplitLayer:
    """Freeze each channel part as its own layer (weight slice, its quantizers; bias on the first part)."""
    split = layer.split
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    w_parts = split_channels(layer.weight.detach(), split, 1)
    frozen = []
    for i, w in enumerate(w_parts):
        base = _plain_like(layer, w, layer.bias if i == 0 else None)
        twin = type(layer)(base, layer.weight_quantizer.config, None)
        twin.weight_quantizer = wq.parts[i] if isinstance(wq, SplitWeightQuantizer) else wq  # tensor/channel scales
        if isinstance(aq, SplitActQuantizer):
            twin.input_quantizer = aq.parts[i]
        elif aq is not None:
            twin.input_quantizer = aq
        frozen.append(freeze_layer(twin))
    return IntSplitLayer(tuple(frozen), split, layer.channel_dim)


def _plain_like(layer: _QuantLayer, weight: torch.Tensor, bias) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d with ``layer``'s geometry and the given weight slice."""
    if isinstance(layer, QuantLinear):
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        base = nn.Conv2d(weight.shape[1] * layer.groups, weight.shape[0], layer.kernel_size, layer.stride,
                         layer.padding, layer.dilation, layer.groups, bias=bias is not None, device="meta")
    base.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        base.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return base
