import pytest
import torch

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.modules import ActQuantizer, WeightQuantizer
from dmquant.quantizers.observer import RangeObserver


@pytest.mark.parametrize(
    "cfg, min_db",
    [(WeightQuantConfig(bits=8), 38.0), (WeightQuantConfig(bits=8, granularity="tensor"), 33.0),
     (WeightQuantConfig(bits=4, granularity="group", group_size=32, method="mse"), 19.0),
     (WeightQuantConfig(bits=4, method="mse"), 17.0),
     (WeightQuantConfig(bits=4, method="percentile", percentile=99.0), 14.0),
     (WeightQuantConfig(bits=8, symmetric=False), 38.0)],
)
def test_weight_quantizer_sqnr(cfg, min_db):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1)  # channels of different scales
    q = WeightQuantizer(cfg)
    q.calibrate(w)
    assert sqnr_db(w, q(w)) >= min_db
    codes = q.integer_codes(w)
    assert codes.dtype == torch.int8 and codes.min() >= q.fmt.qmin and codes.max() <= q.fmt.qmax


def test_group_scales_beat_channel_scales_at_4_bits():
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.rand(1, 256)  # input channels of different scales
    chan, group = WeightQuantizer(WeightQuantConfig(bits=4)), WeightQuantizer(
        WeightQuantConfig(bits=4, granularity="group", group_size=32))
    chan.calibrate(w)
    group.calibrate(w)
    assert sqnr_db(w, group(w)) > sqnr_db(w, chan(w)) + 2.0
    assert group.scale.shape == (32 * 8,) and chan.scale.shape == (32,)


def test_static_act_quantizer_observes_then_quantizes():
    q = ActQuantizer(ActQuantConfig(bits=8))
    q.set_mode("observe")
    for lo, hi in [(-1.0, 2.0), (-3.0, 0.5)]:
        assert torch.equal(q(torch.tensor([lo, hi])), torch.tensor([lo, hi]))  # pass-through
    q.finalize()
    assert abs(q.scale.item() - 5.0 / 255) < 1e-7  # range [-3, 2]
    q.set_mode("quant")
    x = torch.linspace(-3, 2, 101)
    assert (q(x) - x).abs().max() <= q.scale.item() / 2 + 1e-6


def test_dynamic_per_token_quantizer_needs_no_calibration():
    q = ActQuantizer(ActQuantConfig(bits=8, granularity="token"), channel_dim=-1)
    q.set_mode("quant")
    x = torch.randn(4, 10, 64) * torch.logspace(-2, 2, 10)[None, :, None]  # tokens of very different scales
    out = q(x)
    per_token = [sqnr_db(x[:, i], out[:, i]) for i in range(10)]
    assert min(per_token) > 38.0


def test_unobserved_quantizer_raises():
    q = ActQuantizer(ActQuantConfig(bits=8))
    q.set_mode("observe")
    with pytest.raises(DMQuantError, match="saw no data"):
        q.finalize()


def test_quantizer_state_round_trips_through_state_dict():
    q = WeightQuantizer(WeightQuantConfig(bits=4, granularity="group", group_size=16))
    w = torch.randn(8, 64)
    q.calibrate(w)
    fresh = WeightQuantizer(WeightQuantConfig(bits=4, granularity="group", group_size=16))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), q(w))


def test_observer_sample_is_uniform_over_batches():
    obs = RangeObserver(capacity=4000, seed=0)
    for value in range(10):
        obs.update(torch.full((1, 10000), float(value)))
    counts = torch.bincount(obs.sample.reshape(-1).long(), minlength=10).float()
    assert obs.sample.numel() == 4000 and counts.min() > 300 and counts.max() < 500
    assert (obs.lo.item(), obs.hi.item()) == (0.0, 9.0)
