"""Float16 weight scales (``scale_dtype="float16"``): the quantizer rounds its scales to float16 before
computing codes, the frozen tensor stores them in 2 bytes, and the frozen layer computes the simulation
bit for bit on the reference backend; descriptions without the field load as float32."""

import json

import pytest
import torch
from torch import nn

from dmquant.calibration.observe import observe_activations
from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.nn import backends
from dmquant.nn.layers import QuantConv2d, QuantLinear, layer_from_spec
from dmquant.nn.wrap import input_quantizers, weight_quantizers
from dmquant.quantizers.affine import qparams_from_range, round_scale, sqnr_db
from dmquant.quantizers.qtensor import QuantizedTensor, weight_storage_bytes
from dmquant.quantizers.weight import WeightQuantizer

CASES = [dict(bits=4, method="mse"), dict(bits=3, symmetric=False, granularity="group", group_size=32),
         dict(bits=8, granularity="tensor"), dict(bits=4, granularity="group", group_size=64, method="mse"),
         dict(bits=8, number_format="fp8_e4m3")]


def frozen_tensor(w, q):
    return QuantizedTensor.from_codes(q.codes(w), q.scale, q.zero_point, q.bits, q.granularity, q.group_size,
                                      q.symmetric, q.scale_dtype)


@pytest.mark.parametrize("kwargs", CASES)
def test_float16_scales_are_float16_values_and_the_stored_tensor_dequantizes_bit_for_bit(kwargs):
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    q = WeightQuantizer(**kwargs, scale_dtype="float16")
    q.calibrate(w)
    assert q.scale.dtype == torch.float32 and torch.equal(q.scale.half().float(), q.scale)
    qt = frozen_tensor(w, q)
    assert qt.scale.dtype == torch.float16 and qt.spec()["scale_dtype"] == "float16"
    assert (qt.zero_point is None) or qt.zero_point.dtype == torch.float16
    assert torch.equal(qt.dequantize(), q(w))  # the simulation's own scales: bit for bit
    # the codes come from the rounded scales (not float32 ones rounded afterwards)
    ref = WeightQuantizer(**kwargs)
    ref.calibrate(w)
    assert not torch.equal(ref.scale, q.scale)


def test_float16_scale_rounding_keeps_the_asymmetric_zero_point_consistent():
    lo, hi = torch.tensor([-0.0123, -1.0, 0.0]), torch.tensor([0.5, 0.001, 1e-9])
    fmt = WeightQuantizer(4, symmetric=False).fmt
    scale, zero = qparams_from_range(lo, hi, fmt, symmetric=False, scale_dtype=torch.float16)
    assert torch.equal(scale, scale.half().float()) and bool((scale > 0).all())
    assert torch.equal(zero, (fmt.qmin - torch.round(torch.minimum(lo, torch.zeros(3)) / scale)).clamp(fmt.qmin,
                                                                                                      fmt.qmax))


def test_round_scale_never_gives_zero_or_infinity():
    s = round_scale(torch.tensor([1e-12, 3e-6, 1e6, 0.1]), torch.float16)
    assert s[0] == 2.0 ** -24 and s[2] == 65504.0 and s[3] == torch.tensor(0.1).half().float()
    assert s[1] > 0 and torch.equal(s, s.half().float())
    x = torch.tensor([0.1, 0.2])
    assert round_scale(x, None) is x and round_scale(x, torch.float32) is x


def test_a_row_of_tiny_weights_keeps_finite_positive_scales():
    w = torch.randn(4, 64)
    w[1] *= 1e-9
    q = WeightQuantizer(4, scale_dtype="float16")
    q.calibrate(w)
    qt = frozen_tensor(w, q)
    assert bool((qt.scale > 0).all()) and bool(torch.isfinite(qt.dequantize()).all())
    assert torch.equal(qt.dequantize(), q(w))


@pytest.mark.parametrize("shape, kwargs, scale_rows", [
    ((64, 128), dict(bits=4, granularity="group", group_size=64), 128),
    ((64, 128), dict(bits=3), 64),
    ((16, 8, 3, 3), dict(bits=6, symmetric=False, granularity="group", group_size=24), 48),
    ((10, 30), dict(bits=8, granularity="tensor"), 1),
])
def test_stored_bytes_are_the_costed_bytes_with_two_byte_scales(shape, kwargs, scale_rows):
    w = torch.randn(shape)
    found = {}
    for dtype in ("float32", "float16"):
        q = WeightQuantizer(**kwargs, scale_dtype=dtype)
        q.calibrate(w)
        qt = frozen_tensor(w, q)
        costed = weight_storage_bytes(shape, q.bits, q.granularity, q.group_size, q.symmetric, dtype)
        assert qt.nbytes() == costed
        found[dtype] = costed
    per_row = 1 if kwargs.get("symmetric", True) else 2  # a zero point per row beside the scale
    assert found["float32"] - found["float16"] == 2 * scale_rows * per_row


def test_spec_without_scale_dtype_loads_float32_and_float16_spec_builds_float16_buffers():
    w = torch.randn(8, 64)
    for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16)):
        q = WeightQuantizer(4, symmetric=False, scale_dtype=dtype)
        q.calibrate(w)
        qt = frozen_tensor(w, q)
        spec = qt.spec()
        if dtype == "float32":
            del spec["scale_dtype"]  # a description written before the field existed
        twin = QuantizedTensor.from_spec(spec)
        assert twin.scale.dtype == torch_dtype and twin.zero_point.dtype == torch_dtype and twin.scale.is_meta
        twin.load_state_dict(qt.state_dict(), assign=True)
        assert torch.equal(twin.dequantize(), q(w))
    with pytest.raises(DMQuantError, match="scale dtype 'bfloat16'"):
        QuantizedTensor.from_spec({**spec, "scale_dtype": "bfloat16"})
    with pytest.raises(DMQuantError, match="weights.scale_dtype"):
        WeightQuantConfig(bits=4, scale_dtype="float64")


def test_float16_scales_stay_float16_through_module_to_dtype():
    w = torch.randn(8, 64) * 0.01
    q = WeightQuantizer(4, scale_dtype="float16")
    q.calibrate(w)
    qt = frozen_tensor(w, q)
    stored = qt.scale.clone()
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        qt.to(dtype)
        assert qt.scale.dtype == torch.float16 and torch.equal(qt.scale, stored)
    assert qt.channel_scales().dtype == torch.float32 and torch.equal(qt.channel_scales(), stored.float())
    q32 = WeightQuantizer(4)
    q32.calibrate(w)
    assert frozen_tensor(w, q32).to(torch.bfloat16).scale.dtype == torch.bfloat16  # float32 scales: as before


def _calibrated(layer, wcfg, x):
    cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
    q = cls.wrap(layer, weight_quantizers(wcfg), input_quantizers(ActQuantConfig(bits=8, method="mse"), None, None))
    if isinstance(layer, nn.Conv2d):
        q.split_quantizers(8, weight_quantizers(wcfg), None)
    q.calibrate_weight()
    observe_activations(q, [((x,), {})], progress=False)
    return q


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("wcfg", [WeightQuantConfig(bits=4, method="mse", scale_dtype="float16"),
                                  WeightQuantConfig(bits=3, granularity="group", group_size=8, symmetric=False,
                                                    scale_dtype="float16")])
def test_frozen_layer_with_float16_scales_equals_the_simulation_and_rebuilds_from_its_spec(kind, wcfg):
    torch.manual_seed(1)
    layer = nn.Linear(64, 24) if kind == "linear" else nn.Conv2d(24, 16, 3, padding=1)  # conv: split at 8
    x = torch.randn(3, 10, 64) if kind == "linear" else torch.randn(2, 24, 6, 6)
    sim = _calibrated(layer, wcfg, x)
    sim.backend = "reference"
    with torch.no_grad():
        expected = sim(x)
    frozen = sim.frozen_copy()
    frozen.prepare_kernels()
    frozen.backend = "reference"
    assert {q.scale.dtype for q in frozen.qweights} == {torch.float16}
    with torch.no_grad():
        assert torch.equal(frozen(x), expected)
    spec = json.loads(json.dumps(frozen.spec()))
    assert {s["scale_dtype"] for s in spec["weights"]} == {"float16"}
    rebuilt = layer_from_spec(spec, None)
    rebuilt.load_state_dict(frozen.state_dict(), assign=True)
    rebuilt.prepare_kernels()
    for backend in ("reference", "auto"):  # auto: the oneDNN int8 path where it applies, float32 scales
        rebuilt.backend = frozen.backend = backend
        with torch.no_grad():
            assert torch.equal(rebuilt(x), frozen(x))
    if wcfg.symmetric:  # per-channel symmetric W4 takes oneDNN's int8 kernels (scales read as float32)
        assert backends.choose(rebuilt, x).name == "onednn-int8"
        with torch.no_grad():
            assert sqnr_db(expected, rebuilt(x)) > 60.0
