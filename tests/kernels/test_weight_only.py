"""Weight-only W4A16 / W8A16: the Triton GEMM that dequantizes weight tiles inside the K loop (run here on CPU
tensors through Triton's interpreter), its torch path, and the ``cuda-w4a16`` backend of a frozen layer (issue 15)."""

import math
import os

import pytest
import torch
from torch import nn

from dmquant.config import WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.kernels.int4 import quantize_int4
from dmquant.kernels.weight_only import dequantize_weight, w4a16_linear, w4a16_linear_reference
from dmquant.nn import backend_weight_only, backends
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import weight_quantizers
from dmquant.quantizers.qtensor import QuantizedTensor

# compiled kernels on a GPU: run with TRITON_INTERPRET=0 (the conftest's default interprets every Triton kernel)
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                          reason="needs a CUDA GPU and TRITON_INTERPRET=0")


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref, err = ref.double(), out.double() - ref.double()
    noise = err.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def problem(m=37, n=48, k=256, group=32, bits=4, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 10  # an outlier input channel
    w = torch.randn(n, k, generator=g) / k ** 0.5
    if bits == 4:
        qdata, scale = quantize_int4(w, group)
    else:
        scale = w.abs().amax(dim=1) / 127
        qdata = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    bias = torch.randn(n, generator=g) / 4
    return x.to(device, dtype), qdata.to(device), scale.reshape(-1).to(device), bias.to(device, dtype)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("swap", [False, True])
def test_triton_kernel_equals_the_reference_in_fp32(group, with_bias, swap):
    from dmquant.kernels import _w4a16_triton

    x, qdata, scale, bias = problem(group=group)
    bias = bias if with_bias else None
    # block_k 64: group 32 takes two dots per K step with their own scales, group 128 one scale per two steps
    out = _w4a16_triton.wo_gemm(x, qdata, scale, group, bias, block_k=64, swap=swap)
    ref = w4a16_linear_reference(x, qdata, scale, group, bias)
    assert out.shape == (37, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sqnr_db(out, ref) >= 100


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_fp16_output_is_the_reference_rounded(group, with_bias):
    x, qdata, scale, bias = problem(m=21, group=group, dtype=torch.float16)
    bias = bias if with_bias else None
    out = w4a16_linear(x.reshape(3, 7, -1), qdata, scale, group, bias, backend="triton")
    ref = w4a16_linear_reference(x, qdata, scale, group, bias)
    assert out.shape == (3, 7, 48) and out.dtype == torch.float16
    assert sqnr_db(out.reshape(21, 48), ref) >= 60
    # the dequantized tile is exactly the fp16 weight: only the accumulation order and the last rounding differ
    assert (out.reshape(21, 48).float() - ref.float()).abs().max().item() <= 2e-3


def test_triton_w8a16_per_channel():
    x, qdata, scale, bias = problem(m=19, n=40, k=96, bits=8, dtype=torch.float16)
    out = w4a16_linear(x, qdata, scale, None, bias, backend="triton")  # K=96: BLOCK_K shrinks to 32
    ref = w4a16_linear_reference(x, qdata, scale, None, bias)
    assert sqnr_db(out, ref) >= 60


def quantized_tensor(bits=4, group=32, shape=(48, 256)) -> QuantizedTensor:
    g = torch.Generator().manual_seed(5)
    lim = 7 if bits == 4 else 127
    codes = torch.randint(-lim, lim + 1, shape, generator=g)
    rows = shape[0] * math.prod(shape[1:]) // (group or math.prod(shape[1:]))
    scale = torch.rand(rows, generator=g) / 50 + 1e-3
    return QuantizedTensor.from_codes(codes, scale, None, bits, "group" if group else "channel", group, True)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, None)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantization_equals_the_quantized_tensor(bits, group, dtype):
    qt = quantized_tensor(bits, group)
    expected = qt.dequantize(dtype)
    for backend in ("torch", "triton"):
        got = dequantize_weight(qt.qdata, qt.scale, group, 256, dtype, backend=backend)
        assert got.dtype == dtype and torch.equal(got, expected), backend


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_torch_path_is_dequantize_then_linear_bit_for_bit(bits, group):
    qt = quantized_tensor(bits, group)
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(48)
    out = w4a16_linear(x, qt.qdata, qt.scale, group, bias)  # CPU tensors: auto is the torch path
    assert torch.equal(out, torch.nn.functional.linear(x, qt.dequantize(x.dtype), bias))


def test_dequantize_then_linear_method():
    x, qdata, scale, bias = problem(m=9, group=32, dtype=torch.float16)
    out = w4a16_linear(x, qdata, scale, 32, bias, backend="triton", method="dequant")  # one-pass kernel + F.linear
    ref = torch.nn.functional.linear(x, dequantize_weight(qdata, scale, 32, 256, x.dtype, backend="torch"), bias)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="method"):
        w4a16_linear(x, qdata, scale, 32, bias, method="cublas")


def test_bad_arguments_are_refused():
    qt = quantized_tensor()
    x = torch.randn(3, 256)
    with pytest.raises(ValueError, match="group size"):
        w4a16_linear(x, qt.qdata, qt.scale, 48)
    with pytest.raises(ValueError, match="qdata"):
        w4a16_linear(torch.randn(3, 128), qt.qdata, qt.scale, 32)
    with pytest.raises(ValueError, match="scale"):
        w4a16_linear(x, qt.qdata, qt.scale[:-1], 32)


# -- the cuda-w4a16 backend ----------------------------------------------------------------------------------
def frozen(module, bits=4, group=32, branch=False):
    torch.manual_seed(0)
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    cfg = WeightQuantConfig(bits=bits, granularity="group" if group else "channel", group_size=group)
    twin = cls.wrap(module, weight_quantizers(cfg), None)  # W4A16: no input quantizers
    if branch:
        extra = {} if cls is QuantLinear else {"geometry": twin.branch_geometry()}
        b = OutlierBranch(module.weight.shape[1], module.weight.shape[0], smooth=True, rank=4, dtype="float32",
                          **extra)
        b.smooth.copy_(torch.rand(module.weight.shape[1]) + 0.5)
        twin.attach_outlier_branch(b, module.weight)
    twin.calibrate_weight()
    layer = twin.frozen_copy()
    layer.prepare_kernels()
    return layer


LAYERS = {
    "linear": (lambda: nn.Linear(128, 40), (2, 13, 128)),
    "conv1x1": (lambda: nn.Conv2d(64, 40, 1), (2, 64, 5, 3)),
    "conv3x3": (lambda: nn.Conv2d(32, 24, 3, padding=1), (1, 32, 6, 5)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("branch", [False, True])
def test_backend_torch_path_is_the_reference_and_the_kernel_is_close(kind, branch):
    make, shape = LAYERS[kind]
    layer = frozen(make(), branch=branch)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    assert backend_weight_only.eligible(layer)
    assert layer.kernels[backend_weight_only.NAME] == ("dequant-conv" if kind == "conv3x3" else "gemm")
    assert backends.choose(layer, x).name == "reference"  # on the CPU: the backend is for CUDA inputs only
    with torch.no_grad():
        ref = layer(x)
        layer.backend, layer.kernel = backend_weight_only.NAME, "torch"
        assert torch.equal(layer(x), ref)
        layer.kernel = "triton"  # the Triton kernels through the interpreter
        out = layer(x)
    assert out.shape == ref.shape and out.is_contiguous()
    assert sqnr_db(out, ref) >= 100  # fp32: the same weight, only the summation order differs


def test_w8a16_linear_layer():
    layer = frozen(nn.Linear(96, 32), bits=8, group=None)
    x = torch.randn(11, 96)
    assert backend_weight_only.eligible(layer)
    with torch.no_grad():
        ref = layer(x)
        layer.backend, layer.kernel = backend_weight_only.NAME, "triton"
        out = layer(x)
    assert sqnr_db(out, ref) >= 60


def test_layers_it_cannot_take():
    assert not backend_weight_only.eligible(frozen(nn.Linear(128, 40), group=16))  # group size
    asym = nn.Linear(64, 8)
    twin = QuantLinear.wrap(asym, weight_quantizers(WeightQuantConfig(bits=4, symmetric=False, granularity="group",
                                                                      group_size=32)), None)
    twin.calibrate_weight()
    layer = twin.frozen_copy()
    assert not backend_weight_only.eligible(layer) and not backend_weight_only.eligible(twin)
    layer.backend = backend_weight_only.NAME
    with pytest.raises(DMQuantError, match="cannot compute this layer"):
        layer(torch.randn(2, 64))


@CUDA
def test_on_cuda_auto_takes_the_fused_kernel():
    layer = frozen(nn.Linear(640, 1280)).cuda().half()
    layer.prepare_kernels()
    x = torch.randn(2, 1024, 640, device="cuda", dtype=torch.float16)
    assert backends.choose(layer, x).name == backend_weight_only.NAME
    with torch.no_grad():
        out = layer(x)
        layer.backend = "reference"
        ref = layer(x)
    assert sqnr_db(out, ref) >= 60


@CUDA
@pytest.mark.parametrize("m,n,k,group", [(154, 320, 768, 32), (2048, 640, 640, 32), (8192, 320, 320, 64),
                                         (512, 1280, 1280, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_at_unet_shapes(m, n, k, group, dtype):
    x, qdata, scale, bias = problem(m, n, k, group, dtype=dtype, device="cuda")
    ref = w4a16_linear_reference(x, qdata, scale, group, bias)
    for method in ("fused", "dequant"):
        out = w4a16_linear(x, qdata, scale, group, bias, method=method)
        assert out.dtype == dtype
        assert sqnr_db(out, ref) >= (45 if dtype == torch.bfloat16 else 60), method  # the output's rounding
