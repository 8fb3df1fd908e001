import math

import torch

from dmquant.formats import IntFormat
from dmquant.quantizers.affine import dequantize, fake_quant, qparams_from_range, quantize, sqnr_db


def test_hand_computed_asymmetric_uint8():
    fmt = IntFormat(8, signed=False)
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), fmt, symmetric=False)
    assert math.isclose(scale.item(), 4.0 / 255, rel_tol=1e-6)
    assert zero.item() == 64.0  # 0 - round(-1 / (4/255)) = round(63.75)
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0, 10.0, -5.0])
    q = quantize(x, scale, zero, fmt)
    assert q.tolist() == [0.0, 64.0, 128.0, 255.0, 255.0, 0.0]
    assert dequantize(q, scale, zero)[1].item() == 0.0  # zero is exact


def test_hand_computed_symmetric_int4():
    fmt = IntFormat(4, signed=True, narrow=True)
    scale, zero = qparams_from_range(torch.tensor(-0.5), torch.tensor(1.4), fmt, symmetric=True)
    assert math.isclose(scale.item(), 0.2, rel_tol=1e-6) and zero.item() == 0.0
    x = torch.tensor([1.4, 0.31, -0.29, -2.0, 0.0])
    assert quantize(x, scale, zero, fmt).tolist() == [7.0, 2.0, -1.0, -7.0, 0.0]
    assert torch.allclose(fake_quant(x, scale, zero, fmt), torch.tensor([1.4, 0.4, -0.2, -1.4, 0.0]))


def test_error_inside_range_is_at_most_half_a_step():
    torch.manual_seed(0)
    for bits in range(2, 9):
        for symmetric in (True, False):
            fmt = IntFormat(bits, signed=symmetric)
            x = torch.randn(4096) * 3
            scale, zero = qparams_from_range(x.min(), x.max(), fmt, symmetric)
            err = (fake_quant(x, scale, zero, fmt) - x).abs().max().item()
            assert err <= scale.item() / 2 + 1e-6, (bits, symmetric)
            codes = quantize(x, scale, zero, fmt)
            assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
            assert torch.equal(codes, codes.round())


def test_sqnr_grows_about_6db_per_bit():
    torch.manual_seed(0)
    x = torch.rand(1 << 16) * 2 - 1  # uniform data: the textbook 6.02 dB/bit
    values = []
    for bits in (4, 6, 8):
        fmt = IntFormat(bits, signed=False)
        s, z = qparams_from_range(x.min(), x.max(), fmt, False)
        values.append(sqnr_db(x, fake_quant(x, s, z, fmt)))
    assert 11.0 < values[1] - values[0] < 13.0 and 11.0 < values[2] - values[1] < 13.0
    assert 47.0 < values[2] < 50.0


def test_fake_quant_is_idempotent():
    fmt = IntFormat(6, signed=True)
    x = torch.randn(1000)
    s, z = qparams_from_range(x.min(), x.max(), fmt, True)
    once = fake_quant(x, s, z, fmt)
    assert torch.allclose(fake_quant(once, s, z, fmt), once, atol=1e-6)


def test_straight_through_gradients():
    fmt = IntFormat(4, signed=True)
    x = torch.tensor([0.1, 0.26, 5.0, -9.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    fake_quant(x, scale, torch.tensor(0.0), fmt).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # identity inside the range, zero where clipped
    # LSQ-style scale gradient: sum of (round(x/s) - x/s) inside, qmin/qmax where clipped
    expected = (0 - 0.2) + (1 - 0.52) + 7 + (-8)
    assert math.isclose(scale.grad.item(), expected, rel_tol=1e-5)


def test_sqnr_of_identical_tensors_is_infinite():
    x = torch.randn(10)
    assert sqnr_db(x, x) == float("inf")
    assert math.isclose(sqnr_db(torch.ones(4), torch.full((4,), 1.1)), 20.0, rel_tol=1e-6)
