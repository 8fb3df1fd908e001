import pytest
import torch

from dmquant.errors import DMQuantError
from dmquant.quantizers.qtensor import QuantizedTensor
from dmquant.quantizers.weight import WeightQuantizer


def quantized(w, q):
    return QuantizedTensor.from_codes(q.codes(w), q.scale, q.zero_point, q.bits, q.granularity, q.group_size,
                                      q.symmetric)


CASES = [(dict(bits=8), (16, 32), "int8"),
         (dict(bits=4), (16, 8, 3, 3), "int4x2"),
         (dict(bits=4, granularity="group", group_size=64), (32, 128), "int4x2"),
         (dict(bits=3, symmetric=False, granularity="group", group_size=16), (8, 64), "bitpack"),
         (dict(bits=6, granularity="tensor"), (4, 6), "bitpack"),
         (dict(bits=2), (8, 3, 3, 3), "bitpack"),  # 27 codes a row: padded to 32, 8 bytes
         (dict(bits=8), (4, 6), "int8"),
         (dict(bits=4), (4, 3, 1, 1), "int8")]  # an odd row length cannot pack two codes per byte


@pytest.mark.parametrize("kwargs, shape, packing", CASES)
def test_dequantized_weight_equals_the_simulated_one(kwargs, shape, packing):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q = WeightQuantizer(**kwargs)
    q.calibrate(w)
    qw = quantized(w, q)
    assert qw.packing == packing and qw.shape == shape
    assert torch.equal(qw.int8(), q.codes(w))
    assert torch.equal(qw.dequantize(), q(w))  # the same float arithmetic: bit for bit
    assert (qw.zero_point is None) == q.symmetric


def test_w4_group64_costs_at_most_4_6_bits_per_weight():
    w = torch.randn(320, 1280)
    q = WeightQuantizer(4, granularity="group", group_size=64)
    q.calibrate(w)
    qw = quantized(w, q)
    bits = qw.nbytes() * 8 / w.numel()
    assert bits == pytest.approx(4.5)
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == (320, 640)
    assert not qw.per_channel_symmetric


def test_spec_rebuilds_an_empty_twin_that_loads_the_state():
    w = torch.randn(8, 32)
    q = WeightQuantizer(4, symmetric=False)
    q.calibrate(w)
    qw = quantized(w, q)
    twin = QuantizedTensor.from_spec(qw.spec(), device="cpu")
    twin.load_state_dict(qw.state_dict())
    assert torch.equal(twin.dequantize(), qw.dequantize())
    meta = QuantizedTensor.from_spec(qw.spec())
    assert meta.qdata.is_meta and meta.qdata.shape == qw.qdata.shape and meta.scale.shape == qw.scale.shape
    meta.load_state_dict(qw.state_dict(), assign=True)
    assert torch.equal(meta.dequantize(), qw.dequantize())


def test_per_channel_scales_and_damaged_specs():
    w = torch.randn(6, 10)
    per_tensor = WeightQuantizer(8, granularity="tensor")
    per_tensor.calibrate(w)
    qw = quantized(w, per_tensor)
    assert qw.per_channel_symmetric and qw.channel_scales().shape == (6,)
    assert torch.equal(qw.channel_scales(), per_tensor.scale.expand(6))
    spec = qw.spec()
    with pytest.raises(DMQuantError, match="unknown weight packing 'fp8'"):
        QuantizedTensor.from_spec({**spec, "packing": "fp8"})
    del spec["bits"]
    with pytest.raises(DMQuantError, match="lacks \\['bits'\\]"):
        QuantizedTensor.from_spec(spec)


@pytest.mark.parametrize("kwargs, shape, packing", CASES + [(dict(bits=8, symmetric=False), (9, 20), "int8")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_rows_equal_the_rows_of_the_whole(kwargs, shape, packing, dtype):
    """A slice of output channels dequantized alone is bit for bit that slice of the whole weight, and the whole is the
    two-step arithmetic (codes read as ``dtype``, the zero point subtracted, times the scale)."""
    torch.manual_seed(1)
    w = torch.randn(shape)
    q = WeightQuantizer(**kwargs)
    q.calibrate(w)
    qw = quantized(w, q)
    whole = qw.dequantize(dtype)
    row_len = {"tensor": w.numel(), "channel": w[0].numel(), "group": q.group_size}[q.granularity]
    values = q.codes(w).reshape(-1, row_len).to(dtype)
    if not q.symmetric:
        values = values - q.zero_point.reshape(-1).to(dtype)[:, None]
    assert whole.dtype == dtype and torch.equal(whole, (values * q.scale.reshape(-1).to(dtype)[:, None]).reshape(shape))
    for rows in (slice(0, 3), slice(3, shape[0] - 1), slice(shape[0] - 1, shape[0] + 5)):
        assert torch.equal(qw.dequantize(dtype, rows), whole[rows])
