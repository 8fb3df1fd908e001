"""The float8 GEMM (``dmquant.kernels.fp8``) and the ``cuda-fp8`` backend: on the CPU its float32 path against
the simulated layer; on a GPU with float8 tensor cores, ``torch._scaled_mm`` against the same."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.kernels import fp8
from dmquant.nn import backends
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.affine import float8_codes, sqnr_db
from dmquant.quantizers.weight import WeightQuantizer

FP8_GPU = torch.cuda.is_available() and fp8.capable(torch.device("cuda"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the two paths sum in different orders and round the output once each: float32 agrees to ~1e-7,
# float16 to its last bit (~3e-4), bfloat16 to its last bit (~4e-3)
MIN_SQNR = {torch.float32: 100.0, torch.float16: 60.0, torch.bfloat16: 45.0}
# Hopper's float8 MMA accumulates in fewer bits than float32: measured 77.5-78.3 dB on an H200
MIN_SQNR_GPU = {torch.float32: 70.0, torch.float16: 55.0, torch.bfloat16: 40.0}


def frozen_linear(granularity="token", shape=(64, 48), dtype=torch.float32, device="cpu", bias=True):
    torch.manual_seed(0)
    float_layer = nn.Linear(*shape, bias=bias).to(device, dtype)
    layer = QuantLinear.wrap(float_layer, lambda: WeightQuantizer(8, True, "channel", number_format="fp8_e4m3"),
                             lambda cd: ActQuantizer(8, symmetric=True, granularity=granularity, channel_dim=cd,
                                                     number_format="fp8_e4m3")).to(device)
    layer.calibrate_weight()
    x = (torch.randn(3, 5, shape[0], device=device) * torch.logspace(-2, 1, 5, device=device)[:, None]).to(dtype)
    a = layer.input_quantizers[0]
    if a.static:
        a.set_mode("observe")
        layer(x)
        a.finalize()
    a.set_mode("quant")
    with torch.no_grad():
        simulated = layer(x)
    return layer.frozen_copy(), x, simulated


def simulated_product(x, w_codes, w_scale, act_scale, bias):
    """The simulation written out: fake-quantized input times the dequantized weight, in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    scale = rows.float().abs().amax(dim=1, keepdim=True) / 448 if act_scale is None else act_scale.float()
    xq = (float8_codes(rows, scale, fp8.FP8).float() * scale).to(x.dtype)
    w = w_codes.to(x.dtype) * w_scale.to(x.dtype)[:, None]
    return F.linear(xq, w, None if bias is None else bias.to(x.dtype)).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_reference_gemm_against_the_simulation(dtype, static):
    torch.manual_seed(1)
    x = (torch.randn(4, 7, 64) * 3).to(dtype)
    w = torch.randn(32, 64)
    w_scale = w.abs().amax(dim=1) / 448
    w_codes = float8_codes(w, w_scale[:, None], fp8.FP8)
    act_scale = x.float().abs().amax() / 448 if static else None
    bias = torch.randn(32).to(dtype)
    codes, scale = fp8.quantize_rows(x.reshape(-1, 64), act_scale)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (28, 1) and scale.dtype == torch.float32
    if not static:
        assert torch.equal(scale, x.reshape(-1, 64).float().abs().amax(dim=1, keepdim=True) / 448)
    out = fp8.fp8_linear(x, w_codes, w_scale, act_scale, bias)  # the CPU: the float32 reference
    expected = simulated_product(x, w_codes, w_scale, act_scale, bias)
    assert out.dtype == dtype and out.shape == (4, 7, 32)
    assert sqnr_db(expected.float(), out.float()) >= MIN_SQNR[dtype]


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_backend_forced_on_the_cpu_matches_the_reference_backend(granularity):
    layer, x, simulated = frozen_linear(granularity)
    layer.prepare_kernels()
    assert set(layer.kernels) == {"cuda-fp8"}
    assert backends.choose(layer, x).name == "reference"  # a CPU input: the reference computes it
    with torch.no_grad():
        assert torch.equal(layer(x), simulated)
        layer.backend = "cuda-fp8"
        out = layer(x)
    assert sqnr_db(simulated, out) >= 100.0


def test_what_the_backend_takes():
    layer, _, _ = frozen_linear()
    assert "cuda-fp8" in backends.names()
    # of the backends with a prepared state only cuda-fp8 takes it: no integer backend reads float8 codes
    assert set(backends.prepare(layer)) == {"cuda-fp8"} and not backends.fused_int4_supported(layer)
    odd, _, _ = frozen_linear(shape=(40, 48))  # in_features not a multiple of 16
    group = frozen_linear()[0]
    group.input_quantizers[0].granularity = "group"  # per group of channels: not a row-wise scale
    torch.manual_seed(0)
    conv = QuantConv2d.wrap(nn.Conv2d(16, 32, 1), lambda: WeightQuantizer(8, number_format="fp8_e4m3"),
                            lambda cd: ActQuantizer(8, symmetric=True, granularity="token", channel_dim=cd,
                                                    number_format="fp8_e4m3"))
    conv.calibrate_weight()
    for other in (odd, group, conv.frozen_copy()):
        assert backends.prepare(other) == {}
    odd.backend = "cuda-fp8"
    with pytest.raises(DMQuantError, match="cannot compute this layer"):
        odd(torch.randn(2, 40))


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with float8 tensor cores (compute capability 8.9+)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_on_the_gpu(dtype, granularity, bias):
    layer, x, simulated = frozen_linear(granularity, shape=(128, 96), dtype=dtype, device="cuda", bias=bias)
    layer.prepare_kernels()
    assert backends.choose(layer, x).name == "cuda-fp8"
    with torch.no_grad():
        out = layer(x)
        layer.backend = "reference"
        reference = layer(x)
    assert torch.equal(reference, simulated)
    assert out.dtype == dtype and sqnr_db(simulated.float(), out.float()) >= MIN_SQNR_GPU[dtype]
    qw, a = layer.qweights[0], layer.input_quantizers[0]
    act_scale = a.current_qparams()[0] if a.static else None
    cpu = fp8.fp8_linear_reference(x.cpu(), qw.qdata.cpu(), qw.channel_scales().cpu(),
                                   None if act_scale is None else act_scale.cpu(),
                                   None if layer.bias is None else layer.bias.cpu())
    assert sqnr_db(cpu.float(), out.cpu().float()) >= MIN_SQNR_GPU[dtype]
