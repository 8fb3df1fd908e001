import pytest

from dmquant.errors import DMQuantError
from dmquant.formats import IntFormat


@pytest.mark.parametrize(
    "bits, signed, narrow, qmin, qmax",
    [(8, True, False, -128, 127), (8, True, True, -127, 127), (8, False, False, 0, 255),
     (4, True, False, -8, 7), (4, True, True, -7, 7), (4, False, False, 0, 15), (2, True, False, -2, 1)],
)
def test_grid_bounds(bits, signed, narrow, qmin, qmax):
    fmt = IntFormat(bits, signed, narrow)
    assert (fmt.qmin, fmt.qmax, fmt.levels) == (qmin, qmax, qmax - qmin + 1)


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 4.0, True])
def test_bits_outside_2_to_8_are_rejected(bits):
    with pytest.raises(DMQuantError, match="from 2 to 8"):
        IntFormat(bits)
