"""Backend ``cuda-int8`` (``torch._int_mm``), forced by name on the CPU: the same integer codes as the
simulation, so the frozen layer equals the reference backend up to float rounding (exact integer products,
fp32 rescale); which layers it takes; the kernel functions against a float64 reference."""

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, TimeConditioningConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.kernels import int8_gemm
from dmquant.nn import backend_cuda_int8, backends
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.nn.wrap import input_quantizers, set_activation_mode, weight_quantizers
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.timetable import TimeTable

W8 = WeightQuantConfig(bits=8)
ASYM, SYM = ActQuantConfig(bits=8), ActQuantConfig(bits=8, symmetric=True)


def frozen_layer(layer, x, wcfg=W8, acfg=ASYM, table=None, split=None):
    cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
    time = None if table is None else TimeConditioningConfig()
    q = cls.wrap(layer, weight_quantizers(wcfg), input_quantizers(acfg, table, time))
    if split is not None:
        q.split_quantizers(split, weight_quantizers(wcfg), input_quantizers(acfg, None, None))
    q.calibrate_weight()
    set_activation_mode(q, "observe")
    with torch.no_grad():
        for key in ([None] if table is None else table.keys.tolist()):
            if key is not None:
                table.set_timestep(key)
            q(x)
    for a in q.input_quantizers:
        a.finalize()
    set_activation_mode(q, "quant")
    return q.freeze()


def run(layer, x, backend):
    layer.backend = backend
    with torch.no_grad():
        return layer(x)


def assert_matches_reference(layer, x):
    ref, out = run(layer, x, "reference"), run(layer, x, "cuda-int8")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert sqnr_db(ref, out) > 70.0, sqnr_db(ref, out)


@pytest.mark.parametrize("acfg", [ASYM, SYM], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("rows", [5, 40])  # fewer than 17 rows are padded for cuBLASLt
def test_linear(acfg, rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 64) * 3 + 1
    layer = frozen_layer(nn.Linear(64, 48), x, acfg=acfg)
    assert backend_cuda_int8.NAME in layer.kernels
    assert_matches_reference(layer, x)
    assert_matches_reference(layer, torch.randn(2, rows, 64))  # leading dimensions kept


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, stride=2),
                                      dict(kernel_size=1), dict(kernel_size=3, padding=2, dilation=2),
                                      dict(kernel_size=(1, 3), padding=(0, 1))], ids=str)
def test_conv(geometry):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 10) + 0.5
    layer = frozen_layer(nn.Conv2d(16, 24, **geometry), x)
    assert_matches_reference(layer, x)


def test_split_skip_concatenation_and_time_table():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 8, 6, 6) * 5, torch.randn(2, 16, 6, 6) * 0.1], dim=1)
    layer = frozen_layer(nn.Conv2d(24, 16, 3, padding=1), x, split=8)
    assert len(layer.qweights) == 2 and len(layer.input_quantizers) == 2
    assert_matches_reference(layer, x)
    table = TimeTable()
    table.set_keys(torch.tensor([999.0, 500.0, 1.0]))
    layer = frozen_layer(nn.Linear(32, 16), torch.randn(12, 32), table=table)
    for i, key in enumerate(table.keys.tolist()):
        table.set_timestep(key)
        assert_matches_reference(layer, torch.randn(12, 32) * (i + 1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_linear_with_per_token_dynamic_activations(symmetric):
    torch.manual_seed(0)
    x = torch.randn(3, 30, 64) * torch.logspace(-1, 1, 30)[None, :, None]  # tokens of very different ranges
    layer = frozen_layer(nn.Linear(64, 48), x, acfg=ActQuantConfig(bits=8, granularity="token", symmetric=symmetric))
    assert backend_cuda_int8.eligible(layer)
    assert_matches_reference(layer, x)
    half = frozen_layer(nn.Linear(64, 48), x, acfg=ActQuantConfig(bits=8, granularity="token", symmetric=symmetric))
    half.to(torch.float16)
    ref, out = run(half, x.half(), "reference"), run(half, x.half(), "cuda-int8")
    assert sqnr_db(ref.float(), out.float()) > 45.0  # same codes (float32 scales); 16-bit rounding only


def test_eligibility():
    torch.manual_seed(0)
    x = torch.randn(20, 64)
    assert backend_cuda_int8.eligible(frozen_layer(nn.Linear(64, 48), x))
    four_bit = frozen_layer(nn.Linear(64, 48), x, wcfg=WeightQuantConfig(bits=4))
    assert not backend_cuda_int8.eligible(four_bit) and backend_cuda_int8.NAME not in four_bit.kernels
    assert not backend_cuda_int8.eligible(frozen_layer(nn.Linear(64, 44), x))  # N not a multiple of 8
    grouped_tokens = frozen_layer(nn.Linear(64, 48), x, acfg=ActQuantConfig(bits=8, granularity="group", group_size=32))
    assert not backend_cuda_int8.eligible(grouped_tokens)
    conv_tokens = frozen_layer(nn.Conv2d(16, 16, 3, padding=1), torch.randn(1, 16, 5, 5),
                               acfg=ActQuantConfig(bits=8, granularity="token"))
    assert not backend_cuda_int8.eligible(conv_tokens)  # a patch mixes pixels of different scales
    grouped = frozen_layer(nn.Conv2d(16, 16, 3, padding=1, groups=2), torch.randn(1, 16, 5, 5))
    assert not backend_cuda_int8.eligible(grouped)
    four_bit.backend = "cuda-int8"
    with pytest.raises(DMQuantError, match="cannot compute this layer"):
        four_bit(x)
    # on the CPU 'auto' never picks it: CUDA inputs only
    layer = frozen_layer(nn.Linear(64, 48), x)
    assert backends.choose(layer, x).name != backend_cuda_int8.NAME


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_inputs(dtype):
    torch.manual_seed(0)
    x = torch.randn(40, 64)
    layer = frozen_layer(nn.Linear(64, 48), x)
    layer.to(dtype)
    ref, out = run(layer, x.to(dtype), "reference"), run(layer, x.to(dtype), "cuda-int8")
    assert out.dtype == dtype and sqnr_db(ref.float(), out.float()) > 35.0  # 16-bit rounding of the reference


def test_kernel_against_float64():
    torch.manual_seed(1)
    x = torch.randn(33, 40) * 2
    w = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    w_scale, bias = torch.rand(24) * 0.01 + 1e-3, torch.randn(24)
    scale, zero = torch.tensor(0.03), torch.tensor(131.0)
    codes = int8_gemm.quantize_static(x, scale, zero, 0, 255, 128)
    colsum = w.to(torch.int32).sum(dim=1)
    out = int8_gemm.int8_linear(codes, zero - 128, scale, w, w_scale, colsum, bias, torch.float32)
    ref = int8_gemm.int8_linear_reference(x, scale, zero, 0, 255, w, w_scale, bias)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-5)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -128 and int(codes.max()) <= 127


@pytest.mark.parametrize("with_bias", [True, False])
def test_eager_per_row_kernel_against_float64(with_bias):
    """The CPU path of per-token layers (one fused quantize, in-place epilogue) against the float64 reference of
    the same per-row grids: equal to float32 rounding (a code may differ by one on an exact tie)."""
    torch.manual_seed(2)
    x = torch.randn(300, 64) * torch.rand(300, 1) * 4  # rows of different ranges
    w = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    w_scale, bias = torch.rand(40) * 0.01 + 1e-3, torch.randn(40) if with_bias else None
    lo, hi = torch.aminmax(x, dim=1)
    scale = (hi - lo.clamp(max=0)).clamp(min=0) / 255
    zero = torch.round(-lo.clamp(max=0) / scale)
    out = int8_gemm.per_row_int8_linear_eager(x, scale, zero - 128, w, w_scale, w.to(torch.int32).sum(dim=1), bias)
    ref = int8_gemm.int8_linear_reference(x, scale[:, None], zero[:, None], 0, 255, w, w_scale, bias)
    assert out.dtype == torch.float32 and sqnr_db(ref.float(), out) > 100.0, sqnr_db(ref.float(), out)


def test_cpu_per_token_layers_take_the_integer_path_automatically():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 64) * torch.logspace(-1, 1, 30)[None, :, None]
    layer = frozen_layer(nn.Linear(64, 48), x, acfg=ActQuantConfig(bits=8, granularity="token"))
    assert backend_cuda_int8.CPU_TOKEN in layer.kernels
    assert backends.choose(layer, x).name == backend_cuda_int8.CPU_TOKEN  # "auto" on a CPU input
    assert "packed" in layer.kernels[backend_cuda_int8.CPU_TOKEN][0]  # oneDNN's GEMM, the per-row grid after it
    ref, out = run(layer, x, "reference"), run(layer, x, "auto")
    assert sqnr_db(ref, out) > 70.0, sqnr_db(ref, out)
    del layer.kernels[backend_cuda_int8.CPU_TOKEN][0]["packed"]  # without the x86 engine: torch._int_mm
    assert sqnr_db(out, run(layer, x, "auto")) > 100.0  # the same codes on either path
    static = frozen_layer(nn.Linear(64, 48), x)  # static inputs: oneDNN's kernel, not this one
    assert backend_cuda_int8.CPU_TOKEN not in static.kernels
    conv = frozen_layer(nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 6, 6),
                        acfg=ActQuantConfig(bits=8, granularity="token"))
    assert backend_cuda_int8.CPU_TOKEN not in conv.kernels  # per-pixel scales are no integer convolution
