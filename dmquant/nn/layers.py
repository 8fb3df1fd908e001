"""One quantized layer per op kind (:class:`QuantLinear`, :class:`QuantConv2d`), in two states of
the same object:

* **simulated** (after wrapping): the full-precision ``weight`` (the residual ``R`` when a low-rank
  branch is attached), its :class:`~dmquant.quantizers.weight.WeightQuantizer` (one, or one per part
  of a split input) and the fake-quantized weight they give (``qdq_weight``, refreshed whenever the
  quantizers change);
* **frozen** (``freeze()``): ``qweights``, one :class:`~dmquant.quantizers.qtensor.QuantizedTensor`
  per input part (int8 or packed int4 codes, scales); the float weight and the weight quantizers are
  dropped.

Both states keep the input quantizers (:class:`~dmquant.quantizers.activation.ActQuantizer`: none,
one, or one per part of a skip concatenation ``[h, skip]`` cut at ``split``), the bias and the
optional :class:`~dmquant.nn.outlier.OutlierBranch` (smoothing, rotation, low-rank branch). How a
call is computed is chosen per call from the backend registry (:mod:`dmquant.nn.backends`); the
reference backend computes both states in the same float arithmetic, so a frozen layer gives the
simulation's outputs bit for bit there. ``spec()`` describes a frozen layer in JSON and
:func:`layer_from_spec` rebuilds it empty (on the meta device) for a state dict to fill.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.nn import backends
from dmquant.nn.outlier import OutlierBranch, apply_branch
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.outliers import svd_split
from dmquant.quantizers.qtensor import QuantizedTensor
from dmquant.quantizers.timetable import TimeTable
from dmquant.quantizers.weight import WeightQuantizer

# A frozen layer computing with its dequantized weight on the CPU (eager) does so for this many weights at a time, a
# slice of output channels each: a large weight dequantized in one piece is fresh memory on every call (allocations
# above glibc's mmap threshold, 32 MiB at most, are page-faulted in anew), which made SD1.5's int8 weight-only
# convolutions slower than FP32's (eval/RESULTS.md, "Speed on the CPU", the A/B of 2026-12-01).
DEQUANT_CHUNK = 1 << 22

MakeWeightQuantizer = Callable[[], WeightQuantizer]
MakeInputQuantizer = Callable[[int], ActQuantizer]  # takes the layer's channel dimension


def split_channels(x: torch.Tensor, split: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` cut at index ``split`` along ``dim`` (DMQuantError if the index is not inside)."""
    size = x.shape[dim]
    if not 0 < split < size:
        raise DMQuantError(f"split index {split} is not inside the {size} channels of the tensor")
    return x.narrow(dim, 0, split), x.narrow(dim, split, size - split)


class QuantLayer(nn.Module):
    kind = ""
    channel_dim = -1

    def __init__(self, geometry: dict, weight: nn.Parameter | None, bias: nn.Parameter | None,
                 weight_quantizers: list[WeightQuantizer], input_quantizers: list[ActQuantizer],
                 split: int | None = None):
        super().__init__()
        self.geometry = geometry
        self.weight, self.bias, self.split = weight, bias, split
        self.weight_quantizers = nn.ModuleList(weight_quantizers)
        self.input_quantizers = nn.ModuleList(input_quantizers)
        self.outlier: OutlierBranch | None = None
        self.qweights: nn.ModuleList | None = None
        self.register_buffer("qdq_weight", None, persistent=False)
        self.quantize_weight = True  # False inside dmquant.nn.wrap.full_precision
        self.backend = "auto"  # or a backend name of dmquant.nn.backends, forced
        self.kernel = "auto"  # the Triton kernels' own backend choice: "auto", "torch", "triton"
        self.kernels: dict = {}  # prepared integer kernels of the frozen state, per backend
        self.kernels_device: torch.device | None = None  # where the codes were when the kernels were prepared

    @classmethod
    def wrap(cls, layer: nn.Module, make_weight: MakeWeightQuantizer,
             make_input: MakeInputQuantizer | None) -> QuantLayer:
        """The simulated quantized twin of ``layer`` (it shares the layer's parameters)."""
        inputs = [] if make_input is None else [make_input(cls.channel_dim)]
        return cls(cls.geometry_of(layer), layer.weight, layer.bias, [make_weight()], inputs)

    @staticmethod
    def geometry_of(layer: nn.Module) -> dict:
        raise NotImplementedError

    @property
    def frozen(self) -> bool:
        return self.qweights is not None

    @property
    def qweight(self) -> torch.Tensor | None:
        """The stored weight: the first part's codes (frozen) or the float weight (simulated). PEFT reads this
        name (a quantized layer's weight) to put LoRA adapters on its device (:mod:`dmquant.nn.lora`)."""
        return self.qweights[0].qdata if self.frozen else self.weight

    # -- simulated state ---------------------------------------------------------------------------------
    def split_quantizers(self, split: int, make_weight: MakeWeightQuantizer | None,
                         make_input: MakeInputQuantizer | None) -> None:
        """Give the two parts of the input (channels ``[:split]`` and ``[split:]``) their own weight
        quantizers (``make_weight``) and input quantizers (``make_input``), where given."""
        self.split = int(split)
        if make_weight is not None:
            self.weight_quantizers = nn.ModuleList([make_weight(), make_weight()])
        if make_input is not None and len(self.input_quantizers):
            self.input_quantizers = nn.ModuleList([make_input(self.channel_dim) for _ in range(2)])

    def weight_parts(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The weight as its quantizers see it: whole, or cut at ``split`` along the input channels."""
        return [weight] if len(self.weight_quantizers) == 1 else list(split_channels(weight, self.split, 1))

    def calibrate_weight(self) -> None:
        for q, w in zip(self.weight_quantizers, self.weight_parts(self.weight.detach())):
            q.calibrate(w)
        self.refresh_weight()

    @torch.no_grad()
    def refresh_weight(self) -> None:
        """Recompute the fake-quantized weight after the weight quantizers changed."""
        self.qdq_weight = self._fake_weight().detach()

    def _fake_weight(self) -> torch.Tensor:
        parts = [q(w) for q, w in zip(self.weight_quantizers, self.weight_parts(self.weight))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def attach_outlier_branch(self, branch: OutlierBranch, original: torch.Tensor) -> None:
        """Fold ``branch``'s transform into ``original`` (the layer's FP weight) and keep only the residual
        ``R = W' - L1·L2`` as the layer's weight (a new parameter: ``original`` is untouched). The weight
        quantizers must be calibrated again (``calibrate_weight``)."""
        folded = branch.fold(original)
        if branch.rank:
            matrix = folded.reshape(folded.shape[0], -1)
            l1, l2, _ = svd_split(matrix, branch.rank)
            branch.set_low_rank(l1, l2)
            folded = (matrix - branch.low_rank_weight()).reshape(folded.shape)
        self.weight = nn.Parameter(folded.to(original.dtype), requires_grad=original.requires_grad)
        self.outlier = branch.to(original.device)
        self.qdq_weight = None

    # -- both states -------------------------------------------------------------------------------------
    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the layer computes with: dequantized codes (frozen), or fake-quantized (simulated;
        the full-precision weight inside ``full_precision``)."""
        if self.frozen:
            parts = [q.dequantize(dtype) for q in self.qweights]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if not self.quantize_weight:
            return self.weight
        learning = any(q.rounding is not None for q in self.weight_quantizers)
        if learning or self.qdq_weight is None or (torch.is_grad_enabled() and self.weight.requires_grad):
            return self._fake_weight()
        return self.qdq_weight

    def input_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if self.split is None else list(split_channels(x, self.split, self.channel_dim))

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.input_quantizers):
            return x
        if len(self.input_quantizers) == 1:
            return self.input_quantizers[0](x)
        parts = [q(p) for q, p in zip(self.input_quantizers, self.input_parts(x))]
        return torch.cat(parts, dim=self.channel_dim)

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def main(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The layer on its (already transformed) input, with the quantized input and weight; the product in
        ``dtype`` (``x``'s by default: a float32 ``x`` of a 16-bit layer is quantized in float32, see
        :func:`~dmquant.nn.outlier.apply_branch`)."""
        dtype = dtype or x.dtype
        x = self.quant_input(x).to(dtype)
        step = self._rows_per_chunk(x)
        if step:
            return self._main_by_rows(x, dtype, step)
        return self.op(x, self.effective_weight(dtype), self.bias)

    def _rows_per_chunk(self, x: torch.Tensor) -> int:
        """Output channels per dequantized slice of the weight (0: the whole weight at once): frozen layers with a
        weight of more than ``DEQUANT_CHUNK`` values, eager on the CPU, not grouped."""
        if not self.frozen or x.device.type != "cpu" or torch.compiler.is_compiling():
            return 0
        if getattr(self, "geometry", {}).get("groups", 1) != 1:
            return 0
        out = self.qweights[0].shape[0]
        per_row = sum(math.prod(q.shape[1:]) for q in self.qweights)
        return min(out, DEQUANT_CHUNK // per_row) if out * per_row > DEQUANT_CHUNK else 0

    def _main_by_rows(self, x: torch.Tensor, dtype: torch.dtype, step: int) -> torch.Tensor:
        outs = []
        for start in range(0, self.qweights[0].shape[0], step):
            rows = slice(start, start + step)
            parts = [q.dequantize(dtype, rows) for q in self.qweights]
            weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            outs.append(self.op(x, weight, None if self.bias is None else self.bias[rows]))
        return torch.cat(outs, dim=self.channel_dim)

    def with_branch(self, main: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return apply_branch(self.outlier, main, x, self.channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return backends.run(self, x)

    # -- frozen state ------------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self, prepare: bool = True) -> QuantLayer:
        """Switch to integer storage in place (calibration-only state dropped); returns ``self``.
        ``prepare`` builds the integer kernels' packed weights (not needed for saving)."""
        if self.frozen:
            return self
        qweights = [QuantizedTensor.from_codes(codes, q.scale, q.zero_point, q.bits, q.granularity, q.group_size,
                                               q.symmetric, q.scale_dtype) for codes, q in self._part_codes()]
        for q in self.input_quantizers:
            q.freeze()
        self.qweights = nn.ModuleList(qweights)
        self.weight_quantizers = nn.ModuleList()
        self.qdq_weight = None
        self.weight = None
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        if prepare:
            self.prepare_kernels()
        return self

    def _part_codes(self) -> list[tuple[torch.Tensor, WeightQuantizer]]:
        """Codes per input part (one part, or two at ``split``) with the quantizer that scales them."""
        weight = self.weight.detach()
        if len(self.weight_quantizers) == 2:
            return [(q.codes(w), q) for q, w in zip(self.weight_quantizers, self.weight_parts(weight))]
        q = self.weight_quantizers[0]
        codes = q.codes(weight)
        parts = [codes] if self.split is None else list(split_channels(codes, self.split, 1))
        return [(c, q) for c in parts]

    def frozen_copy(self) -> QuantLayer:
        """A frozen copy (this layer is left as it is); it shares the denoiser's TimeTable (see its ``__deepcopy__``)."""
        return copy.deepcopy(self).freeze(prepare=False)

    def prepare_kernels(self) -> None:
        self.kernels = backends.prepare(self)
        self.kernels_device = self.storage_device()

    def storage_device(self) -> torch.device | None:
        """The device of the frozen layer's codes (None when not frozen)."""
        return self.qweights[0].qdata.device if self.frozen and len(self.qweights) else None

    def kernels_stale(self) -> bool:
        """Whether the prepared kernels were built for codes on another device: the codes were moved without
        ``.to()`` (accelerate's offload hooks set tensors one by one). Backends that need prepared state are
        then passed over (the registry falls back); ``.to()`` itself prepares them again (``_apply``)."""
        return bool(self.kernels) and self.kernels_device != self.storage_device()

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ...: the prepared kernels (plain attributes: packed weights, per-channel
        sums) follow the codes, prepared again for their new device (not in forward, here)."""
        before = self.storage_device()
        out = super()._apply(fn, recurse)
        if self.kernels_device is not None and self.storage_device() != before:
            self.prepare_kernels()
        return out

    def spec(self) -> dict:
        """The JSON description of the frozen layer (with its state dict it rebuilds the layer)."""
        if not self.frozen:
            raise DMQuantError("only a frozen layer has a saved description: call freeze() or frozen_copy()")
        return {"kind": self.kind, "geometry": self.geometry, "bias": self.bias is not None, "split": self.split,
                "weights": [q.spec() for q in self.qweights], "inputs": [q.spec() for q in self.input_quantizers],
                "outlier": None if self.outlier is None else self.outlier.spec()}

    @classmethod
    def from_spec(cls, spec: dict, table: TimeTable | None, device="meta") -> QuantLayer:
        qweights = [QuantizedTensor.from_spec(s, device) for s in spec["weights"]]
        bias = nn.Parameter(torch.empty(qweights[0].shape[0], device=device), requires_grad=False) if spec["bias"] else None
        inputs = [ActQuantizer.from_spec(s, table, device) for s in spec["inputs"]]
        layer = cls(spec["geometry"], None, bias, [], inputs, spec["split"])
        layer.qweights = nn.ModuleList(qweights)
        if spec["outlier"] is not None:
            layer.outlier = OutlierBranch.from_spec(spec["outlier"], device=device)
        return layer

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight (codes, scales, branch): the frozen state's memory."""
        branch = 0 if self.outlier is None else self.outlier.nbytes()
        return sum(q.nbytes() for q in self.qweights or []) + branch

    def extra_repr(self) -> str:
        bits = [q.bits for q in self.qweights] if self.frozen else [q.bits for q in self.weight_quantizers]
        a = str(self.input_quantizers[0].bits) if len(self.input_quantizers) else "16"
        state = "frozen" if self.frozen else "simulated"
        return f"{self.kind} W{bits[0]}A{a}, {state}" + (f", split={self.split}" if self.split is not None else "")


class QuantLinear(QuantLayer):
    kind = "linear"
    channel_dim = -1

    @staticmethod
    def geometry_of(layer: nn.Linear) -> dict:
        return {"in_features": layer.in_features, "out_features": layer.out_features}

    def op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def branch_geometry(self) -> dict | None:
        return None  # an OutlierBranch without geometry is a linear one

    @property
    def can_take_branch(self) -> bool:
        return True


class QuantConv2d(QuantLayer):
    kind = "conv2d"
    channel_dim = 1

    @staticmethod
    def geometry_of(layer: nn.Conv2d) -> dict:
        if isinstance(layer.padding, str):
            raise DMQuantError(f"a conv with padding={layer.padding!r} cannot be quantized yet: exclude it")
        return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "padding": list(layer.padding),
                "dilation": list(layer.dilation), "groups": layer.groups, "padding_mode": layer.padding_mode}

    def conv_args(self) -> tuple:
        g = self.geometry
        padding = g["padding"] if g["padding_mode"] == "zeros" else [0, 0]
        return tuple(g["stride"]), tuple(padding), tuple(g["dilation"]), g["groups"]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if g["padding_mode"] == "zeros":
            return x
        ph, pw = g["padding"]
        return F.pad(x, (pw, pw, ph, ph), mode=g["padding_mode"])

    def op(self, x, weight, bias):
        return F.conv2d(self.pad(x), weight, bias, *self.conv_args())

    def branch_geometry(self) -> dict | None:
        """What an :class:`OutlierBranch` needs to know of the conv."""
        return {k: self.geometry[k] for k in ("kernel_size", "stride", "padding", "dilation")}

    @property
    def can_take_branch(self) -> bool:
        return self.geometry["groups"] == 1 and self.geometry["padding_mode"] == "zeros"


LAYER_KINDS: dict[str, type[QuantLayer]] = {"linear": QuantLinear, "conv2d": QuantConv2d}
FLOAT_TYPES: dict[type, type[QuantLayer]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def layer_from_spec(spec: dict, table: TimeTable | None, device="meta") -> QuantLayer:
    cls = LAYER_KINDS.get(spec.get("kind"))
    if cls is None:
        raise DMQuantError(f"unknown layer kind {spec.get('kind')!r} in the quantized model: upgrade dmquant")
    return cls.from_spec(spec, table, device)
