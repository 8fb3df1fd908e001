"""The CPU integer kernels against their float64 references (exact integers, float epilogue)."""

import pytest
import torch

from dmquant.kernels import cpu_int8 as k


def random_codes(shape, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g)


@pytest.mark.parametrize("m, kdim, n", [(1, 8, 4), (37, 64, 48), (130, 320, 40)])
def test_int8_linear_matches_reference(m, kdim, n):
    x_q = random_codes((m, kdim), 0, 255, 0).to(torch.uint8)
    w_q = random_codes((n, kdim), -127, 127, 1).to(torch.int8)
    w_scale = torch.rand(n, generator=torch.Generator().manual_seed(2)) * 0.01 + 1e-3
    bias = torch.randn(n)
    ref = k.int8_linear_reference(x_q, 0.02, 131, w_q, w_scale, bias)
    out = k.int8_linear(x_q, 0.02, 131, k.prepack_linear(w_q), w_scale, bias)
    assert out.shape == (m, n)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_int8_linear_keeps_leading_dims():
    x_q = random_codes((2, 5, 16), 0, 255, 3).to(torch.uint8)
    w_q = random_codes((8, 16), -127, 127, 4).to(torch.int8)
    w_scale = torch.full((8,), 0.01)
    out = k.int8_linear(x_q, 0.1, 128, k.prepack_linear(w_q), w_scale)
    ref = k.int8_linear_reference(x_q.reshape(10, 16), 0.1, 128, w_q, w_scale).reshape(2, 5, 8)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride, padding, groups", [(1, 1, 1), (2, 1, 1), (1, 0, 1), (1, 1, 2)])
def test_int8_conv2d_matches_reference(stride, padding, groups):
    x_q = random_codes((2, 8, 9, 9), 0, 255, 5).to(torch.uint8)
    w_q = random_codes((16, 8 // groups, 3, 3), -127, 127, 6).to(torch.int8)
    w_scale = torch.rand(16, generator=torch.Generator().manual_seed(7)) * 0.01 + 1e-3
    bias = torch.randn(16)
    geometry = ((stride, stride), (padding, padding), (1, 1), groups)
    packed = k.prepack_conv2d(w_q, w_scale, 0.05, 120, *geometry)
    out = k.int8_conv2d(x_q, 0.05, 120, packed, w_scale, bias, *geometry)
    ref = k.int8_conv2d_reference(x_q, 0.05, 120, w_q, w_scale, bias, *geometry)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_quantize_uint8_rounds_half_to_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0, -20.0, 7.4])
    assert k.quantize_uint8(x, 1.0, 3).tolist() == [3, 5, 5, 3, 255, 0, 10]
    assert k.quantize_uint8(x, 1.0, 3, qmin=0, qmax=15).tolist() == [3, 5, 5, 3, 15, 0, 10]
    assert torch.equal(k.quantize_uint8(x, 0.5, 0).long(), (torch.round(x / 0.5)).clamp(0, 255).long())


def test_engine_is_available_here():
    assert k.onednn_available()  # the x86 engine ships with the CPU builds of torch we install


@pytest.mark.parametrize("dtype,zero", [(torch.quint8, 131), (torch.qint8, -3)])
def test_codes_view_equals_int_repr_without_copy(dtype, zero):
    x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last) * 3
    q = torch.quantize_per_tensor(x, 0.05, zero, dtype)
    codes = k.codes_view(q)
    assert not codes.is_quantized and codes.stride() == q.stride()
    assert codes.data_ptr() == q.data_ptr()  # no copy
    assert torch.equal(codes, q.int_repr())


def _per_row_case(m, kdim, n, seed=3):
    torch.manual_seed(seed)
    x = torch.randn(m, kdim) * torch.rand(m, 1) * 4 + torch.randn(m, 1)  # rows of different ranges and offsets
    w_q = torch.randint(-127, 128, (n, kdim), dtype=torch.int8)
    w_scale, bias = torch.rand(n) * 0.01 + 1e-3, torch.randn(n)
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale)  # the uint8 grid's zero point of each row
    return x, w_q, w_scale, bias, scale, zero


def _per_row_reference(x, scale, zero, w_q, w_scale, bias, qmin=0, qmax=255):
    """Float64 of the simulation's codes: clamp(round(x / s) + z)."""
    codes = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], qmin, qmax).double()
    y = (codes - zero.double()[:, None]) @ w_q.double().t() * (scale.double()[:, None] * w_scale.double())
    return y + bias.double()


@pytest.mark.parametrize("chunk", [k.ROW_CHUNK, 64 * 7])  # one chunk; chunks of 7 rows (the last one partial)
def test_int8_linear_per_row_matches_float64(monkeypatch, chunk):
    monkeypatch.setattr(k, "ROW_CHUNK", chunk)
    x, w_q, w_scale, bias, scale, zero = _per_row_case(300, 64, 40)
    correction = w_scale * w_q.to(torch.int32).sum(dim=1)
    out = k.int8_linear_per_row(x, scale, zero, k.prepack_linear(w_q), w_scale, correction, bias)
    ref = _per_row_reference(x, scale, zero, w_q, w_scale, bias)
    err = (out.double() - ref).pow(2).mean() / ref.pow(2).mean()
    assert out.shape == (300, 40) and out.dtype == torch.float32
    empty = k.int8_linear_per_row(x[:0], scale[:0], zero[:0], k.prepack_linear(w_q), w_scale, correction, bias)
    assert empty.shape == (0, 40)
    assert -10 * torch.log10(err) > 100.0  # float32 rounding of the epilogue only: the same codes


def test_int8_linear_per_row_clamps_to_a_narrower_grid():
    x, w_q, w_scale, bias, scale, zero = _per_row_case(50, 32, 16)
    scale = scale * 0.5  # half the range: codes outside [1, 254] must clamp
    correction = w_scale * w_q.to(torch.int32).sum(dim=1)
    out = k.int8_linear_per_row(x, scale, zero, k.prepack_linear(w_q), w_scale, correction, bias, qmin=1, qmax=254)
    ref = _per_row_reference(x, scale, zero, w_q, w_scale, bias, qmin=1, qmax=254)
    unclamped = _per_row_reference(x, scale, zero, w_q, w_scale, bias)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-4)
    assert (unclamped - ref).abs().max() > 1e-2  # the clamp mattered
