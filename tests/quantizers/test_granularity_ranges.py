import pytest
import torch

from dmquant.errors import DMQuantError
from dmquant.formats import IntFormat
from dmquant.quantizers.granularity import from_rows, to_rows
from dmquant.quantizers.ranges import estimate_range, mse_range, percentile_range


@pytest.mark.parametrize(
    "granularity, group, shape, rows",
    [("tensor", None, (6, 4, 3, 3), (1, 216)), ("channel", None, (6, 4, 3, 3), (6, 36)),
     ("group", 12, (6, 4, 3, 3), (18, 12)), ("token", None, (2, 5, 7), (10, 7))],
)
def test_rows_round_trip(granularity, group, shape, rows):
    x = torch.randn(shape)
    r = to_rows(x, granularity, group)
    assert tuple(r.shape) == rows
    assert torch.equal(from_rows(r, x, granularity), x)


def test_token_rows_of_conv_activations_span_channels():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    r = to_rows(x, "token", channel_dim=1)
    assert r.shape == (8, 3) and r[0].tolist() == [0.0, 4.0, 8.0]
    assert torch.equal(from_rows(r, x, "token", channel_dim=1), x)


def test_group_rows_follow_the_input_dimension():
    w = torch.arange(16, dtype=torch.float32).reshape(2, 8)
    assert to_rows(w, "group", 4).tolist()[1] == [4.0, 5.0, 6.0, 7.0]


def test_group_size_must_divide_input_dim():
    with pytest.raises(DMQuantError, match="does not divide the input dimension 36"):
        to_rows(torch.randn(6, 4, 3, 3), "group", 8)


def test_percentile_uses_order_statistics():
    row = torch.arange(1, 1001, dtype=torch.float32)[None]  # 1..1000
    lo, hi = percentile_range(row, 99.0)
    assert (lo.item(), hi.item()) == (11.0, 990.0)
    lo, hi = percentile_range(row, 100.0)
    assert (lo.item(), hi.item()) == (1.0, 1000.0)


def test_mse_clips_outliers_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.randn(2, 20000)
    x[0, 0] = 60.0  # one outlier in the first row
    fmt = IntFormat(4, signed=True)
    lo, hi = mse_range(x, fmt, symmetric=True)
    assert hi[0] < 30.0  # clipped the outlier
    from dmquant.quantizers.affine import fake_quant, qparams_from_range

    def err(lo_, hi_):
        s, z = qparams_from_range(lo_, hi_, fmt, True)
        return (fake_quant(x, s[:, None], z[:, None], fmt) - x).pow(2).sum(1)

    assert torch.all(err(lo, hi) <= err(x.amin(1), x.amax(1)))
    assert err(lo, hi)[0] < 0.5 * err(x.amin(1), x.amax(1))[0]


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile"])
def test_every_method_gives_a_range_inside_the_data(method):
    x = torch.randn(3, 5000)
    lo, hi = estimate_range(x, method, IntFormat(8), True, 99.9)
    assert torch.all(lo >= x.amin(1) - 1e-6) and torch.all(hi <= x.amax(1) + 1e-6) and torch.all(lo < hi)


def test_unknown_method_is_rejected():
    with pytest.raises(DMQuantError, match="unknown range method"):
        estimate_range(torch.randn(1, 10), "kl", IntFormat(8), True)
