"""Backend ``cuda-w4a16``: a frozen weight-only layer (W4A16, W8A16) computed from its stored integer codes
(:func:`dmquant.kernels.weight_only.w4a16_linear`): stored weights stay 3-4x smaller than FP16.

It takes frozen layers without input quantizers (activations stay 16-bit) whose single weight part is
symmetric and either 4-bit in groups of 32, 64 or 128 input features (packed two per byte) or 8-bit with
one scale per output channel (or per group); an outlier branch (smoothing, rotation, low-rank) runs
around the kernel through ``layer.with_branch`` as in the other backends. Chosen automatically for CUDA
inputs only; forced by name (``layer.backend = "cuda-w4a16"``) it runs on the CPU too, with
``layer.kernel`` choosing the Triton kernel or the torch path (tests).

* linear: :func:`~dmquant.kernels.weight_only.w4a16_linear` (``method="auto"``): the GEMM with in-kernel
  dequantization where it measured faster, else the one-pass Triton dequantization into a temporary
  16-bit weight and cuBLAS (on an H200 the fused Triton GEMM is 1.3-3.4x cuBLAS FP16 at most SD1.5 shapes,
  the one-pass dequantization + cuBLAS 1.04-1.16x at M >= 2048; see ``fused_is_faster``);
* 1x1 conv (stride 1, no padding, ``groups == 1``): the same call over pixels (channels last);
* any other conv (3x3...): an implicit-GEMM conv with in-kernel dequantization is not written; the weight
  is dequantized by a one-pass Triton kernel (codes read once, the 16-bit weight written once) into a
  temporary that cuDNN's conv reads and that is freed after the call. Stored weights stay 4-bit; the
  transient is one layer's 16-bit weight (at most ~30 MB in SD1.5), and the pass costs about what reading
  a 16-bit weight once costs, far less than the torch path's unpack (several full-size passes).

On the torch path (``layer.kernel == "torch"``) the weight is dequantized exactly as
:meth:`QuantizedTensor.dequantize` does and the layer's own op runs: bit for bit the reference backend.
The only prepared state is the plan (no tensors), so a frozen layer keeps its 3-4x smaller weights.
"""

from __future__ import annotations

import torch

from dmquant.errors import DMQuantError
from dmquant.kernels.weight_only import GROUP_SIZES, dequantize_weight, triton_shapes_ok, w4a16_linear
from dmquant.nn.backend_registry import Backend, register

NAME = "cuda-w4a16"


def _group(q) -> int | None:
    """The group size the kernels read (``None``: one scale per output channel)."""
    return q.group_size if q.granularity == "group" else None


def eligible(layer) -> bool:
    """Whether the layer's stored form is one this backend computes (checked once, at preparation)."""
    if not layer.frozen or len(layer.input_quantizers) or layer.kind not in ("linear", "conv2d"):
        return False
    if layer.split is not None or len(layer.qweights) != 1:
        return False
    q = layer.qweights[0]
    if not q.symmetric or q.zero_point is not None:
        return False
    if q.bits <= 4 and q.packing == "int4x2":
        return q.granularity == "group" and q.group_size in GROUP_SIZES
    if q.bits == 8 and q.packing == "int8":
        return q.granularity == "channel" or (q.granularity == "group" and q.group_size in GROUP_SIZES)
    return False


def plan(layer) -> str:
    """``"gemm"`` (linear, 1x1 conv as a GEMM) or ``"dequant-conv"`` (other convs)."""
    if layer.kind == "linear":
        return "gemm"
    g = layer.geometry
    pointwise = (list(g["kernel_size"]) == [1, 1] and list(g["stride"]) == [1, 1] and list(g["padding"]) == [0, 0]
                 and g["groups"] == 1)
    return "gemm" if pointwise else "dequant-conv"


def _supports(layer, x) -> bool:
    if x is None:
        return eligible(layer)
    return x.is_cuda and NAME in layer.kernels


def _prepare(layer) -> str:
    return plan(layer)


def _run(layer, x: torch.Tensor) -> torch.Tensor:
    how = layer.kernels.get(NAME)
    if how is None:
        if not eligible(layer):
            raise DMQuantError(f"backend {NAME!r} cannot compute this layer (frozen, no input quantizers, one "
                               "symmetric 4-bit weight in groups of 32/64/128 or 8-bit per channel): use "
                               "backend='auto'")
        how = plan(layer)  # not prepared (e.g. a frozen copy): the plan is cheap to make
    q = layer.qweights[0]
    group = _group(q)
    k = q.qdata.shape[1] * (2 if q.packing == "int4x2" else 1)

    def main(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:  # dtype: see apply_branch
        if layer.kind == "linear":  # the torch path: F.linear on the weight as QuantizedTensor.dequantize has it
            return w4a16_linear(x, q.qdata, q.scale, group, layer.bias, backend=layer.kernel)
        if layer.kernel == "torch" or not triton_shapes_ok(k, group):
            return layer.op(x, q.dequantize(x.dtype), layer.bias)  # the reference's arithmetic
        if how == "gemm":  # 1x1 conv: pixels x channels
            rows = x.permute(0, 2, 3, 1)
            y = w4a16_linear(rows, q.qdata, q.scale, group, layer.bias, backend=layer.kernel)
            return y.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x))
        weight = dequantize_weight(q.qdata, q.scale, group, k, x.dtype, backend=layer.kernel)
        return layer.op(x, weight.reshape(q.shape), layer.bias)

    return layer.with_branch(main, x)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Keep a channels-last input's layout (the GEMM's output is already in it); else plain NCHW."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


register(Backend(NAME, _supports, _run, _prepare))
