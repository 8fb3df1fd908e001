"""The backends of a quantized layer (the registry is :mod:`dmquant.nn.backend_registry`); importing this
module registers all of them, the CUDA ones from their own modules:

* ``cuda-int8`` (:mod:`dmquant.nn.backend_cuda_int8`): static int8 activations times per-channel int8
  weights on the tensor cores (``torch._int_mm``), linear and conv; ``cpu-int8-token`` (same module):
  linear layers with per-token int8 inputs on the CPU (oneDNN's GEMM, each row's grid after it);

* ``fused-int4`` (CUDA): a frozen linear layer with int4 weights in groups of 64 and 4/8-bit dynamic
  symmetric activations, with its smoothing and low-rank branch, as one
  :func:`dmquant.kernels.int4_linear` call (Triton; its torch path elsewhere when forced);
* ``onednn-int8`` (CPU): a frozen layer with static activations, or activations quantized on the fly with
  one range per sample (``granularity: sample``: one call per sample, its scale and zero point given at run
  time), and per-channel symmetric weights as int8 x uint8 -> int32 on oneDNN
  (:mod:`dmquant.kernels.cpu_int8`), one GEMM/conv per input part;
* ``reference``: the quantized input times the dequantized (frozen) or fake-quantized (simulated)
  weight in the layer's float dtype; it supports everything.

Backends with a ``prepare`` step (packed weights) are prepared once, when a layer is frozen or loaded.
"""

from __future__ import annotations

import torch

from dmquant.errors import DMQuantError
from dmquant.formats import is_float
from dmquant.kernels import cpu_int8
from dmquant.kernels.gemm import int4_linear
from dmquant.kernels.int4 import GROUP_SIZE
from dmquant.nn import (
    backend_cuda_int8,  # noqa: F401  (registers cuda-int8)
    backend_fp8,  # noqa: F401  (registers cuda-fp8)
    backend_weight_only,  # noqa: F401  (registers cuda-w4a16)
)
from dmquant.nn.backend_registry import Backend, choose, names, prepare, register, run
from dmquant.quantizers.affine import qparams_from_range

__all__ = ["Backend", "choose", "names", "prepare", "register", "run", "fused_int4_supported"]


# -- reference -------------------------------------------------------------------------------------------
def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    return layer.with_branch(layer.main, x)


# -- oneDNN int8 (CPU) -----------------------------------------------------------------------------------
def _onednn_supports(layer, x) -> bool:
    """Per call: a CPU input and the kernels prepared (the layer checks below ran once, at preparation),
    outside ``torch.compile`` (the packed weights are opaque oneDNN objects and the input grid is read as
    Python numbers: a compiled model takes the reference backend, whose dequantized weights inductor fuses)."""
    if x is not None:
        return x.device.type == "cpu" and "onednn-int8" in layer.kernels and not torch.compiler.is_compiling()
    if not layer.frozen or not len(layer.input_quantizers):
        return False
    if getattr(layer, "geometry", {}).get("padding_mode", "zeros") != "zeros":
        return False
    acts = all((q.static or _per_sample(q)) and q.fmt.levels <= 256 for q in layer.input_quantizers)
    weights = all(q.per_channel_symmetric and q.qdata.device.type == "cpu" for q in layer.qweights)
    return acts and weights and cpu_int8.onednn_available()


def _per_sample(q) -> bool:
    """An input quantized on the fly with one integer range per sample."""
    return not q.static and q.granularity == "sample" and not is_float(q.fmt)


def _per_part(layer) -> list[tuple]:
    """``(weight quantized tensor, its input quantizer)`` per input part."""
    inputs = list(layer.input_quantizers)
    if len(inputs) == 1 and len(layer.qweights) == 2:
        inputs = inputs * 2
    return list(zip(layer.qweights, inputs))


def _input_grid(q) -> tuple[float, int, int, int]:
    """``(scale, zero point, qmin, qmax)`` of the input's current range on the uint8 grid."""
    shift = 128 if q.fmt.signed else 0
    scale, zero = q.current_qparams()
    return float(scale), int(zero.item()) + shift, q.fmt.qmin + shift, q.fmt.qmax + shift


def _onednn_prepare(layer) -> list:
    """Per input part: the packed linear weight, or the conv's packed weight per table entry (oneDNN
    packs a conv with its input scale)."""
    packed = []
    for qw, q in _per_part(layer):
        if layer.kind == "linear":
            packed.append(cpu_int8.prepack_linear(qw.int8()))
            continue
        if _per_sample(q):  # packed once with a nominal grid: the call gives each sample's own
            packed.append([cpu_int8.prepack_conv2d(qw.int8(), qw.channel_scales(), 1.0, 128, *layer.conv_args())])
            continue
        entries = len(q.table) if q.table is not None else 1
        scales = q.scale.reshape(-1) if q.table is not None else q.scale.reshape(1)
        zeros = q.zero_point.reshape(-1) if q.table is not None else q.zero_point.reshape(1)
        shift = 128 if q.fmt.signed else 0
        packed.append([cpu_int8.prepack_conv2d(qw.int8(), qw.channel_scales(), float(scales[i]),
                                               int(zeros[i].item()) + shift, *layer.conv_args())
                       for i in range(entries)])
    return packed


def _onednn_run(layer, x: torch.Tensor) -> torch.Tensor:
    packed = layer.kernels.get("onednn-int8")
    if packed is None:
        raise DMQuantError("a frozen layer's int8 kernels were not prepared: call prepare_kernels() after loading")
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32

    def main(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:  # dtype: see apply_branch
        y = None
        for i, ((qw, q), part) in enumerate(zip(_per_part(layer), layer.input_parts(x))):
            kernel = packed[i] if layer.kind == "linear" else packed[i][q.table.index() if q.table is not None else 0]
            bias = layer.bias if i == 0 else None
            if _per_sample(q):
                out = torch.cat([_onednn_call(layer, qw, kernel, part[b:b + 1], grid, bias, out_dtype)
                                 for b, grid in enumerate(_sample_grids(q, part))])
            else:
                out = _onednn_call(layer, qw, kernel, part, _input_grid(q), bias, out_dtype)
            y = out if y is None else y + out
        return y.to(x.dtype)

    return layer.with_branch(main, x)


def _sample_grids(q, x: torch.Tensor) -> list[tuple[float, int, int, int]]:
    """Per sample of ``x``: its range's ``(scale, zero point, qmin, qmax)`` on the uint8 grid, computed in
    float32 exactly as the quantizer's simulation computes them."""
    lo, hi = x.detach().float().reshape(x.shape[0], -1).aminmax(dim=1)
    scales, zeros = qparams_from_range(lo, hi, q.fmt, q.symmetric)
    shift = 128 if q.fmt.signed else 0
    return [(float(s), int(z) + shift, q.fmt.qmin + shift, q.fmt.qmax + shift)
            for s, z in zip(scales.tolist(), zeros.tolist())]


def _onednn_call(layer, qw, kernel, x: torch.Tensor, grid: tuple, bias, out_dtype) -> torch.Tensor:
    """One oneDNN GEMM / conv of the input part ``x`` quantized on ``grid``."""
    scale, zero, qmin, qmax = grid
    codes = cpu_int8.quantize_uint8(x, scale, zero, qmin, qmax)
    if layer.kind == "linear":
        return cpu_int8.int8_linear(codes, scale, zero, kernel, qw.channel_scales(), bias, out_dtype)
    return cpu_int8.int8_conv2d(codes, scale, zero, kernel, qw.channel_scales(), bias, *layer.conv_args(),
                                out_dtype=out_dtype)


# -- fused int4 GEMM (Triton on CUDA) --------------------------------------------------------------------
def fused_int4_supported(layer) -> bool:
    """Whether :func:`dmquant.kernels.int4_linear` computes this layer in one kernel: a frozen linear
    layer (no split) with int4 weights in groups of 64 (symmetric), 4- or 8-bit symmetric activations
    quantized on the fly per token or per group of 64, and a branch without rotation."""
    if not layer.frozen or layer.kind != "linear" or len(layer.qweights) != 1 or len(layer.input_quantizers) != 1:
        return False
    if layer.outlier is not None and layer.outlier.rotation_seed is not None:
        return False
    q, a = layer.qweights[0], layer.input_quantizers[0]
    weight_ok = (q.bits == 4 and q.packing == "int4x2" and q.symmetric and q.granularity == "group"
                 and q.group_size == GROUP_SIZE)
    act_ok = (not a.static and a.symmetric and a.fmt.signed and a.bits in (4, 8)
              and (a.granularity == "token" or a.group_size == GROUP_SIZE))
    return weight_ok and act_ok


def _fused_supports(layer, x) -> bool:
    return (x is None or x.is_cuda) and fused_int4_supported(layer)


def _fused_run(layer, x: torch.Tensor) -> torch.Tensor:
    if not fused_int4_supported(layer):
        raise DMQuantError("backend 'fused-int4' cannot compute this layer (see fused_int4_supported)")
    q, a, branch = layer.qweights[0], layer.input_quantizers[0], layer.outlier
    low_rank = branch is not None and branch.rank > 0
    return int4_linear(x, q.qdata, q.scale.reshape(q.shape[0], -1), act_bits=a.bits,
                       act_group=a.group_size if a.granularity == "group" else None,
                       smooth=branch.smooth if branch is not None else None,
                       lora_down=branch.lora_down if low_rank else None,
                       lora_up=branch.lora_up if low_rank else None, bias=layer.bias, backend=layer.kernel)


register(Backend("reference", lambda layer, x: True, _reference))
register(Backend("onednn-int8", _onednn_supports, _onednn_run, _onednn_prepare))
register(Backend("fused-int4", _fused_supports, _fused_run), before="onednn-int8")
