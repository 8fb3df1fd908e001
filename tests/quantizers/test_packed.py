import pytest
import torch

from dmquant.config import WeightQuantConfig
from dmquant.quantizers.modules import WeightQuantizer
from dmquant.quantizers.packed import QuantizedWeight


@pytest.mark.parametrize(
    "cfg, shape, packing",
    [(WeightQuantConfig(bits=8), (16, 32), "int8"),
     (WeightQuantConfig(bits=4), (16, 8, 3, 3), "int4x2"),
     (WeightQuantConfig(bits=4, granularity="group", group_size=64), (32, 128), "int4x2"),
     (WeightQuantConfig(bits=3, symmetric=False, granularity="group", group_size=16), (8, 64), "int4x2"),
     (WeightQuantConfig(bits=6, granularity="tensor"), (4, 6), "int8")],
)
def test_dequantized_weight_equals_the_simulated_one(cfg, shape, packing):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q = WeightQuantizer(cfg)
    q.calibrate(w)
    qw = QuantizedWeight.from_quantizer(w, q)
    assert qw.packing == packing
    assert torch.equal(qw.int8(), q.integer_codes(w))
    assert torch.allclose(qw.dequantize(), q(w), atol=1e-6)


def test_w4_group64_costs_at_most_4_6_bits_per_weight():
    w = torch.randn(320, 1280)
    q = WeightQuantizer(WeightQuantConfig(bits=4, granularity="group", group_size=64))
    q.calibrate(w)
    qw = QuantizedWeight.from_quantizer(w, q)
    bits = qw.nbytes() * 8 / w.numel()
    assert bits == pytest.approx(4.5)
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == (320, 640)


def test_spec_rebuilds_an_empty_twin_that_loads_the_state():
    w = torch.randn(8, 32)
    q = WeightQuantizer(WeightQuantConfig(bits=4, symmetric=False))
    q.calibrate(w)
    qw = QuantizedWeight.from_quantizer(w, q)
    twin = QuantizedWeight.from_spec(qw.spec(), device="cpu")
    twin.load_state_dict(qw.state_dict())
    assert torch.equal(twin.dequantize(), qw.dequantize())
