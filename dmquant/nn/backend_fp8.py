"""Backend ``cuda-fp8``: a frozen float8 W8A8 linear layer on the FP8 tensor cores
(:func:`dmquant.kernels.fp8.fp8_linear`, ``torch._scaled_mm`` with row-wise scales).

It takes frozen linear layers (one input part) whose weights are float8 e4m3 codes with one scale per
output channel (or per tensor) and whose input has a float8 quantizer, dynamic per token or static per
tensor (a time table's entry is read as a tensor); in and out features multiples of 16; with its
outlier branch (smoothing, rotation, low-rank) around the GEMM. Chosen automatically for CUDA inputs on
compute capability 8.9 or newer (Ada, Hopper, Blackwell); forced by name (``layer.backend =
"cuda-fp8"``) it runs anywhere, the GEMM then in float32 (:func:`dmquant.kernels.fp8.fp8_linear_reference`),
which is how it is tested on the CPU.

Convolutions with float8 weights are not taken: they run on the ``reference`` backend (the dequantized
weight in the layer's float dtype, bit for bit the simulation), as do float8 layers on older GPUs and
the CPU. There is no prepared state beyond the eligibility mark.
"""

from __future__ import annotations

import functools

import torch

from dmquant.errors import DMQuantError
from dmquant.formats import is_float
from dmquant.kernels import fp8
from dmquant.nn.backend_registry import Backend, register

NAME = "cuda-fp8"


def eligible(layer) -> bool:
    """Whether the layer's stored form is one this backend computes (checked once, at preparation)."""
    if not layer.frozen or layer.kind != "linear" or len(layer.qweights) != 1 or len(layer.input_quantizers) != 1:
        return False
    qw, a = layer.qweights[0], layer.input_quantizers[0]
    if not (qw.float8_per_channel and is_float(a.fmt) and a.granularity in ("token", "tensor")):
        return False
    out_features, in_features = qw.qdata.shape
    return out_features % fp8.ALIGN == 0 and in_features % fp8.ALIGN == 0


@functools.lru_cache(maxsize=None)
def _capable(device: torch.device) -> bool:
    return fp8.capable(device)


def _supports(layer, x) -> bool:
    if x is None:
        return eligible(layer)
    return x.is_cuda and NAME in layer.kernels and layer.input_quantizers[0].mode == "quant" and _capable(x.device)


def _prepare(layer) -> bool:
    return True  # the mark that eligible(layer) held; the codes and scales are used in place


def _run(layer, x: torch.Tensor) -> torch.Tensor:
    if not eligible(layer):
        raise DMQuantError(f"backend {NAME!r} cannot compute this layer (a frozen linear layer with float8 weights "
                           "per channel and float8 inputs per token or tensor only): use backend='auto'")
    qw, a = layer.qweights[0], layer.input_quantizers[0]

    def main(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:  # dtype: see apply_branch
        act_scale = a.current_qparams()[0] if a.static else None
        return fp8.fp8_linear(x, qw.qdata, qw.channel_scales(), act_scale, layer.bias)

    return layer.with_branch(main, x)


register(Backend(NAME, _supports, _run, _prepare))
