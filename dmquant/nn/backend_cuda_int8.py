"""Backend ``cuda-int8``: a frozen W8A8 layer on the integer tensor cores (:mod:`dmquant.kernels.int8_gemm`).

It takes frozen linear and ``groups == 1`` zero-padded conv layers whose weights are int8 codes with one
symmetric scale per output channel and whose inputs have static 8-bit quantizers (one per input part of a
split skip concatenation; a time table's entry is read as a tensor), and linear layers whose 8-bit inputs
are quantized on the fly per token (each row's own scale, as torchao's int8 dynamic quantization). Chosen automatically for CUDA inputs;
forced by name (``layer.backend = "cuda-int8"``) it runs on the CPU too, which is how it is tested. The
weight codes are used in place; the prepared state is a few float32/int32 numbers per output channel.
Eager calls of a table-free linear layer take four kernels (``quantize_per_tensor``, its codes, the int8
GEMM, one ``addcmul`` epilogue); under ``torch.compile`` the plain tensor expression of
:mod:`dmquant.kernels.int8_gemm` runs instead, which inductor fuses with the neighbouring ops.
"""

from __future__ import annotations

import torch

from dmquant.errors import DMQuantError
from dmquant.kernels import cpu_int8, int8_gemm
from dmquant.nn.backend_registry import Backend, register
from dmquant.quantizers.affine import qparams_from_range

NAME = "cuda-int8"


def _parts(layer) -> list[tuple]:
    """``(weight quantized tensor, its input quantizer)`` per input part."""
    inputs = list(layer.input_quantizers)
    if len(inputs) == 1 and len(layer.qweights) == 2:
        inputs = inputs * 2
    return list(zip(layer.qweights, inputs))


def eligible(layer) -> bool:
    """Whether the layer's stored form is one this backend computes (checked once, at preparation)."""
    if not layer.frozen or not len(layer.input_quantizers) or layer.kind not in ("linear", "conv2d"):
        return False
    if layer.kind == "conv2d" and (layer.geometry["groups"] != 1 or layer.geometry["padding_mode"] != "zeros"):
        return False
    acts = _dynamic_tokens(layer) or all(q.fmt.levels == 256 and q.static for q in layer.input_quantizers)
    weights = all(q.per_channel_symmetric and q.packing == "int8" for q in layer.qweights)
    if not (acts and weights):
        return False
    return all(int8_gemm.gemm_shapes_ok(qw.qdata.shape[1], qw.shape[0]) for qw in layer.qweights)


def _dynamic_tokens(layer) -> bool:
    """A linear layer (one input part) with 8-bit activations quantized on the fly per token."""
    q = layer.input_quantizers[0]
    return (layer.kind == "linear" and len(layer.input_quantizers) == 1 and len(layer.qweights) == 1
            and not q.static and q.granularity == "token" and q.fmt.levels == 256)


def _supports(layer, x) -> bool:
    if x is None:
        return eligible(layer)
    return x.is_cuda and NAME in layer.kernels


def _prepare(layer) -> list[dict]:
    """Per input part: the int32 row sums of the weight codes (the zero-point correction) and, for an input
    quantizer without a time table, its grid as Python numbers with the epilogue folded into two float32
    vectors (``y = acc * combined + offset``), so that an eager call is four kernels."""
    prepared = []
    for i, (qw, q) in enumerate(_parts(layer)):
        colsum = qw.qdata.to(torch.int32).sum(dim=1)
        part = {"colsum": colsum}
        if q.static and q.table is None:
            scale, zero, qmin, qmax, shift = _grid(q)
            combined = scale.float() * qw.channel_scales().float()
            offset = -(zero - shift).float() * colsum.float() * combined
            if i == 0 and layer.bias is not None:
                offset = offset + layer.bias.float()
            part.update(combined=combined, offset=offset, scale=float(scale), zero=int(zero) - shift)
        prepared.append(part)
    return prepared


def _grid(q) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    shift = 0 if q.fmt.signed else 128
    scale, zero = q.current_qparams()
    return scale, zero, q.fmt.qmin, q.fmt.qmax, shift


def _dynamic_linear(x: torch.Tensor, qw, q, prepared: dict, bias, out_dtype) -> torch.Tensor:
    """Per-token 8-bit activations: each row's scale and zero point from its own range, in float32 (the
    simulation's :meth:`ActQuantizer._dynamic` arithmetic, so the codes are the simulation's)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # two reductions: faster on the CPU than one aminmax over dim 1
    scale, zero = qparams_from_range(lo, hi, q.fmt, q.symmetric)
    shift = 0 if q.fmt.signed else 128
    if not x.is_cuda and not torch.compiler.is_compiling():  # eager CPU
        if "packed" in prepared:  # oneDNN's u8 x s8 GEMM, the per-row grid applied after it
            up = 128 if q.fmt.signed else 0
            y = cpu_int8.int8_linear_per_row(rows, scale, zero + up, prepared["packed"], qw.channel_scales(),
                                             prepared["correction"], bias, q.fmt.qmin + up, q.fmt.qmax + up)
        else:  # the fused quantize and the in-place epilogue around torch._int_mm
            y = int8_gemm.per_row_int8_linear_eager(rows, scale, zero - shift, qw.qdata, qw.channel_scales(),
                                                    prepared["colsum"], bias)
        return y.to(out_dtype).reshape(*x.shape[:-1], qw.shape[0])
    codes = int8_gemm.quantize_static(rows, scale[:, None], zero[:, None], q.fmt.qmin, q.fmt.qmax, shift)
    acc = int8_gemm.int_mm(codes, qw.qdata.t())
    y = int8_gemm.rescale(acc, (zero - shift)[:, None], prepared["colsum"], scale[:, None], qw.channel_scales(), bias,
                          out_dtype)
    return y.reshape(*x.shape[:-1], qw.shape[0])


def _linear_part(part: torch.Tensor, qw, q, prepared: dict, bias, out_dtype) -> torch.Tensor:
    if not q.static:
        return _dynamic_linear(part, qw, q, prepared, bias, out_dtype)
    if "combined" in prepared and not torch.compiler.is_compiling():  # eager: the fused torch kernels
        codes = int8_gemm.quantize_fast(part, prepared["scale"], prepared["zero"])
        rows = codes.reshape(-1, codes.shape[-1])
        y = torch.addcmul(prepared["offset"], int8_gemm.int_mm(rows, qw.qdata.t()), prepared["combined"])
        return y.to(out_dtype).reshape(*codes.shape[:-1], qw.shape[0])
    scale, zero, qmin, qmax, shift = _grid(q)
    codes = int8_gemm.quantize_static(part, scale, zero, qmin, qmax, shift)
    return int8_gemm.int8_linear(codes, zero - shift, scale, qw.qdata, qw.channel_scales(), prepared["colsum"],
                                 bias, out_dtype)


def _run(layer, x: torch.Tensor, name: str = NAME) -> torch.Tensor:
    prepared = layer.kernels.get(name)
    if prepared is None:
        if not eligible(layer):
            raise DMQuantError(f"backend {name!r} cannot compute this layer (int8 per-channel weights and static "
                               "8-bit inputs only): use backend='auto'")
        raise DMQuantError("a frozen layer's int8 kernels were not prepared: call prepare_kernels() after loading")

    def main(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:  # dtype: see apply_branch
        y = None
        for i, ((qw, q), part) in enumerate(zip(_parts(layer), layer.input_parts(x))):
            bias = layer.bias if i == 0 else None
            if layer.kind == "linear":
                out = _linear_part(part, qw, q, prepared[i], bias, x.dtype)
            else:
                scale, zero, qmin, qmax, shift = _grid(q)
                g = layer.geometry
                out = int8_gemm.int8_conv2d(part, scale, zero, qmin, qmax, shift, qw.qdata, qw.channel_scales(),
                                            prepared[i]["colsum"], bias, g["kernel_size"], g["stride"],
                                            g["padding"], g["dilation"])
            y = out if y is None else y + out
        return y

    return layer.with_branch(main, x)


register(Backend(NAME, _supports, _run, _prepare))

# ``cpu-int8-token``: the per-token linear layers of ``w8a8`` / ``w4a8`` on the CPU: oneDNN's u8 x s8 GEMM with a
# unit input scale and each row's grid applied after it (:func:`cpu_int8.int8_linear_per_row`; oneDNN's own
# quantized linear takes one input scale per tensor), or, without the x86 engine, ``torch._int_mm``. Eager only:
# under ``torch.compile`` the reference path's fake quantization is what inductor fuses.
CPU_TOKEN = "cpu-int8-token"


def _cpu_token_supports(layer, x) -> bool:
    if x is None:
        return eligible(layer) and _dynamic_tokens(layer) and layer.qweights[0].qdata.device.type == "cpu"
    return x.device.type == "cpu" and CPU_TOKEN in layer.kernels and not torch.compiler.is_compiling()


def _cpu_token_prepare(layer) -> list[dict]:
    """:func:`_prepare`'s row sums, and where the engine is available the weight packed for oneDNN with the row sums
    scaled per output channel (the epilogue's zero-point term)."""
    prepared = _prepare(layer)
    if cpu_int8.onednn_available():
        qw = layer.qweights[0]
        prepared[0]["packed"] = cpu_int8.prepack_linear(qw.qdata)
        prepared[0]["correction"] = qw.channel_scales().float() * prepared[0]["colsum"].float()
    return prepared


register(Backend(CPU_TOKEN, _cpu_token_supports, lambda layer, x: _run(layer, x, CPU_TOKEN), _cpu_token_prepare))
