import pytest
import torch

from dmquant.kernels import dequantize_int4, pack_int4, quantize_int4, unpack_int4


def test_pack_unpack_round_trip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    assert torch.equal(unpack_int4(packed), q)


def test_pack_layout_low_nibble_is_even_index():
    packed = pack_int4(torch.tensor([[1, -2, 7, -8]], dtype=torch.int8))
    assert packed.tolist() == [[0xE1, 0x87]]


def test_pack_rejects_out_of_range_and_odd_length():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]]))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_quantize_int4_shapes_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(24, 192)
    w[3, 70] = 40.0  # an outlier only widens its own group
    packed, scales = quantize_int4(w)
    assert packed.shape == (24, 96) and scales.shape == (24, 3) and scales.dtype == torch.float32
    q = unpack_int4(packed)
    assert q.abs().max().item() <= 7
    err = (dequantize_int4(packed, scales) - w).abs().reshape(24, 3, 64)
    assert torch.all(err <= scales[..., None] / 2 + 1e-6)
    assert scales[3, 1] > 5 * scales[3, 0]


def test_quantize_int4_zero_group_and_bad_shape():
    packed, scales = quantize_int4(torch.zeros(2, 64))
    assert torch.equal(dequantize_int4(packed, scales), torch.zeros(2, 64))
    with pytest.raises(ValueError):
        quantize_int4(torch.zeros(2, 96))
