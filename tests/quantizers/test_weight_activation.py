import contextlib

import pytest
import torch

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.nn.wrap import input_quantizers, weight_quantizers
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.observer import RangeObserver
from dmquant.quantizers.weight import WeightQuantizer


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
    q = weight_quantizers(cfg)()  # the recipe section's handler: numbers in, quantizer out
    assert (q.bits, q.symmetric, q.granularity, q.group_size, q.method) == (
        cfg.bits, cfg.symmetric, cfg.granularity, cfg.group_size, cfg.method)
    q.calibrate(w)
    assert sqnr_db(w, q(w)) >= min_db
    codes = q.codes(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert codes.min() >= q.fmt.qmin and codes.max() <= q.fmt.qmax


def test_group_scales_beat_channel_scales_at_4_bits():
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.rand(1, 256)  # input channels of different scales
    chan, group = WeightQuantizer(4), WeightQuantizer(4, granularity="group", group_size=32)
    chan.calibrate(w)
    group.calibrate(w)
    assert sqnr_db(w, group(w)) > sqnr_db(w, chan(w)) + 2.0
    assert group.scale.shape == (32 * 8,) and chan.scale.shape == (32,)


def test_static_act_quantizer_observes_then_quantizes():
    q = ActQuantizer(8)
    q.set_mode("observe")
    for lo, hi in [(-1.0, 2.0), (-3.0, 0.5)]:
        assert torch.equal(q(torch.tensor([lo, hi])), torch.tensor([lo, hi]))  # pass-through
    q.finalize()
    assert abs(q.scale.item() - 5.0 / 255) < 1e-7  # range [-3, 2]
    q.set_mode("quant")
    x = torch.linspace(-3, 2, 101)
    assert (q(x) - x).abs().max() <= q.scale.item() / 2 + 1e-6


def test_dynamic_per_token_quantizer_needs_no_calibration():
    q = input_quantizers(ActQuantConfig(bits=8, granularity="token"), None, None)(-1)
    assert not q.static and q.calibrated and q.channel_dim == -1
    q.set_mode("quant")
    x = torch.randn(4, 10, 64) * torch.logspace(-2, 2, 10)[None, :, None]  # tokens of very different scales
    out = q(x)
    per_token = [sqnr_db(x[:, i], out[:, i]) for i in range(10)]
    assert min(per_token) > 38.0


def test_unobserved_quantizer_raises():
    q = ActQuantizer(8)
    q.set_mode("quant")
    with pytest.raises(DMQuantError, match="no range"):
        q(torch.ones(3))
    q.set_mode("observe")
    with pytest.raises(DMQuantError, match="saw no data"):
        q.finalize()
    with pytest.raises(DMQuantError, match="unknown quantizer mode 'fake'"):
        q.set_mode("fake")
    with pytest.raises(DMQuantError, match="before calibration"):
        WeightQuantizer(8)(torch.ones(2, 2))


def test_quantizer_state_round_trips_through_state_dict():
    q = WeightQuantizer(4, granularity="group", group_size=16)
    w = torch.randn(8, 64)
    q.calibrate(w)
    fresh = WeightQuantizer(4, granularity="group", group_size=16)
    fresh.calibrate(torch.randn(8, 64) * 5)  # buffers of the right shape (saved models load frozen layers by spec)
    assert not torch.equal(fresh(w), q(w))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), q(w))


def test_activation_quantizer_spec_rebuilds_an_empty_twin_that_loads_the_state():
    q = ActQuantizer(6, symmetric=True, channel_dim=1)
    q.set_mode("observe")
    q(torch.linspace(-3, 2, 50))
    q.finalize()
    q.set_mode("quant")
    twin = ActQuantizer.from_spec(q.spec(), None)
    assert twin.mode == "quant" and twin.scale.is_meta
    twin.load_state_dict(q.state_dict(), assign=True)
    x = torch.randn(4, 7)
    assert torch.equal(twin(x), q(x)) and twin.spec() == q.spec()


def test_freeze_drops_observers_and_keeps_quantizing():
    q = ActQuantizer(8)
    with pytest.raises(DMQuantError, match="no range"):
        q.freeze()
    q.set_mode("observe")
    q(torch.randn(100))
    assert len(q.observers) == 1
    q.finalize()
    q.set_mode("observe")
    q.freeze()
    assert q.mode == "quant" and q.observers == []


def test_learnable_scale_is_a_parameter_inside_the_block_and_a_clamped_buffer_after():
    q = ActQuantizer(8)
    q.set_mode("observe")
    q(torch.linspace(-1, 1, 11))
    q.finalize()
    q.set_mode("quant")
    with q.learnable_scale() as scale:
        assert isinstance(scale, torch.nn.Parameter) and "scale" in dict(q.named_parameters())
        q(torch.linspace(-1, 1, 11).requires_grad_()).sum().backward()
        assert scale.grad is not None
        with torch.no_grad():
            scale.fill_(-1.0)
    assert "scale" in dict(q.named_buffers()) and not isinstance(q.scale, torch.nn.Parameter)
    assert float(q.scale) == pytest.approx(1e-8)


def test_adaround_rounding_learns_between_floor_and_ceil_and_hardens_to_codes():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = WeightQuantizer(4)
    q.calibrate(w)
    nearest = q.codes(w)
    v = q.start_rounding(w)
    assert torch.equal(q.codes(w), nearest)  # V starts at the fractional parts: the same rounding
    assert float(q.rounding_loss(2.0).detach()) >= 0.0
    with torch.no_grad():
        v.copy_(torch.where(torch.rand_like(v) < 0.5, torch.full_like(v, 10.0), torch.full_like(v, -10.0)))
    learned = q.codes(w)
    assert (learned.float() - nearest.float()).abs().max() <= 1  # floor or ceil, never further
    q.harden_rounding(w)
    assert q.rounding is None and torch.equal(q.codes(w), learned)
    assert torch.equal(q(w), (learned.float() * q.scale[:, None]))
    q.calibrate(w)  # recalibrating forgets the learned rounding
    assert q.fixed_codes is None and torch.equal(q.codes(w), nearest)


def test_observer_sample_is_uniform_over_batches():
    obs = RangeObserver(capacity=4000, seed=0)
    for value in range(10):
        obs.update(torch.full((1, 10000), float(value)))
    counts = torch.bincount(obs.sample.reshape(-1).long(), minlength=10).float()
    assert obs.sample.numel() == 4000 and counts.min() > 300 and counts.max() < 500
    assert (obs.lo.item(), obs.hi.item()) == (0.0, 9.0)


def _fit_rounding(w, x, learn_scale: bool) -> WeightQuantizer:
    q = WeightQuantizer(3, scale_dtype="float16")
    q.calibrate(w)
    v = q.start_rounding(w)
    floor = q.rounding_floor.clone()
    with contextlib.ExitStack() as stack:
        params = [v] + ([stack.enter_context(q.learnable_scale())] if learn_scale else [])
        if learn_scale:  # the log-ratio of the learned scales to the starting ones: zeros at the start
            assert "scale_gain" in dict(q.named_parameters()) and not params[1].any()
        opt = torch.optim.Adam(params, lr=1e-2)
        for step in range(400):
            opt.zero_grad()
            loss = ((q(w) - w) @ x.T).pow(2).mean()
            if step >= 100:
                loss = loss + 0.01 * q.rounding_loss(20 - 18 * (step - 100) / 300)
            loss.backward()
            opt.step()
        assert torch.equal(q.rounding_floor, floor)  # the integer part does not follow the scale
    q.harden_rounding(w)
    return q


def test_learned_weight_scales_keep_the_integer_part_and_lower_the_error():
    torch.manual_seed(0)
    w, x = torch.randn(8, 64), torch.randn(256, 64) * torch.linspace(0.2, 3.0, 64)  # uneven input channels
    q = _fit_rounding(w, x, learn_scale=True)
    assert "scale" in dict(q.named_buffers()) and q.scale.dtype == torch.float32
    assert torch.equal(q.scale, q.scale.half().float())  # rounded to the scale dtype the frozen layer stores
    codes = q.codes(w).float()
    assert torch.equal(q(w), codes * q.scale[:, None])  # the hardened codes with the learned scales
    fixed = _fit_rounding(w, x, learn_scale=False)
    err, err_fixed = ((q(w) - w) @ x.T).pow(2).mean(), ((fixed(w) - w) @ x.T).pow(2).mean()
    assert not torch.equal(q.scale, fixed.scale)
    assert err < 0.995 * err_fixed, (float(err), float(err_fixed))
