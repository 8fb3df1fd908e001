import pytest
import torch

from dmquant.kernels.bitpack import PACKED_BITS, pack_bits, packed_row_bytes, unpack_bits


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("row_len", [1, 8, 27, 64])
def test_pack_unpack_round_trip_at_b_bits_per_code(bits, row_len):
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (5, row_len), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(row_len, bits))
    assert packed.shape[1] == -(-row_len // 8) * bits  # b bits per code, rows padded to 8 codes
    assert torch.equal(unpack_bits(packed, bits, row_len), q)


def test_out_of_range_codes_and_unknown_widths_are_refused():
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        pack_bits(torch.tensor([[4]], dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="bit packing"):
        pack_bits(torch.zeros(1, 8, dtype=torch.int8), 4)
