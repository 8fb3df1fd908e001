"""Time-conditioned tables (lookup by timestep, fallback) and split quantizers (== two quantizers)."""

import warnings

import pytest
import torch

from dmquant.config import ActQuantConfig, QuantConfig, TimeConditioningConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.quantizers.modules import ActQuantizer, SplitActQuantizer, SplitWeightQuantizer, WeightQuantizer
from dmquant.quantizers.timestep import TimestepState, interval_groups, lookup_index, single_timestep

KEYS = torch.tensor([901.0, 601.0, 301.0, 1.0])


def table_quantizer(mode="step", intervals=2):
    state = TimestepState(KEYS)
    q = ActQuantizer(ActQuantConfig(bits=8), time=TimeConditioningConfig(mode=mode, num_intervals=intervals))
    q.time_state = state
    q.set_mode("observe")
    for t, amp in [(901, 8.0), (601, 4.0), (1, 1.0)]:  # 301 is never seen
        state.set_timestep(torch.tensor([t, t]))
        q(torch.linspace(-amp, amp, 101))
    q.finalize()
    q.set_mode("quant")
    return q, state


def test_lookup_and_groups():
    assert lookup_index(KEYS, 601) == (1, True) and lookup_index(KEYS, 620) == (1, False)
    assert interval_groups(6, 3) == [0, 0, 1, 1, 2, 2] and interval_groups(3, 5) == [0, 1, 2]
    with pytest.raises(DMQuantError, match="different timesteps"):
        single_timestep(torch.tensor([1, 2]))


def test_step_table_holds_one_range_per_step_and_fills_unseen_steps():
    q, state = table_quantizer()
    assert q.scale.shape == (4,) and torch.equal(q.timesteps, KEYS)
    amp = q.scale * 255 / 2
    assert torch.allclose(amp, torch.tensor([8.0, 4.0, 4.0, 1.0]), rtol=1e-3)  # 301 borrows its neighbour
    x = torch.linspace(-1, 1, 11)
    state.set_timestep(1)
    fine = q(x)
    state.set_timestep(901)
    coarse = q(x)
    assert (fine - x).abs().max() < (coarse - x).abs().max()


def test_interval_table_shares_entries():
    q, _ = table_quantizer("interval", 2)
    assert q.scale[0] == q.scale[1] and q.scale[2] == q.scale[3] and q.scale[0] > q.scale[3]


def test_learned_table_follows_the_per_step_ranges():
    q, _ = table_quantizer("learned")
    amp = q.scale * 255 / 2
    assert amp[0] > amp[1] > amp[3] and abs(float(amp[0]) - 8.0) < 1.5


def test_unseen_timestep_falls_back_to_the_nearest_with_one_warning():
    q, state = table_quantizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state.set_timestep(950)
        state.set_timestep(20)
    assert len(caught) == 1 and "nearest calibrated step" in str(caught[0].message)
    assert state.index == 3


def test_table_needs_a_timestep_source():
    q = ActQuantizer(ActQuantConfig(bits=8), time=TimeConditioningConfig())
    q.set_mode("observe")
    with pytest.raises(DMQuantError, match="timestep source"):
        q(torch.ones(3))


def test_split_act_quantizer_equals_two_quantizers_on_the_halves():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 6, 4, 4) * 5, torch.randn(2, 10, 4, 4) * 0.1], dim=1)
    cfg = ActQuantConfig(bits=6)
    split = SplitActQuantizer((ActQuantizer(cfg, 1), ActQuantizer(cfg, 1)), 6, channel_dim=1)
    a, b = ActQuantizer(cfg, 1), ActQuantizer(cfg, 1)
    for q in (split, a, b):
        q.set_mode("observe")
    split(x), a(x[:, :6]), b(x[:, 6:])
    for q in (split, a, b):
        q.finalize()
        q.set_mode("quant")
    assert torch.equal(split(x), torch.cat([a(x[:, :6]), b(x[:, 6:])], dim=1))
    whole = ActQuantizer(cfg, 1)
    whole.set_mode("observe"), whole(x), whole.finalize(), whole.set_mode("quant")
    assert (split(x) - x)[:, 6:].abs().max() < (whole(x) - x)[:, 6:].abs().max()


def test_split_weight_quantizer_equals_two_quantizers():
    w = torch.randn(8, 12, 3, 3)
    cfg = WeightQuantConfig(bits=4)
    split, a, b = SplitWeightQuantizer(cfg, 5), WeightQuantizer(cfg), WeightQuantizer(cfg)
    split.calibrate(w), a.calibrate(w[:, :5]), b.calibrate(w[:, 5:])
    assert torch.equal(split(w), torch.cat([a(w[:, :5]), b(w[:, 5:])], dim=1))
    with pytest.raises(DMQuantError, match="split index 12"):
        SplitWeightQuantizer(cfg, 12).calibrate(w)


def test_incompatible_techniques_are_refused():
    with pytest.raises(DMQuantError, match="need static per-tensor activations"):
        QuantConfig.from_dict({"activations": {"granularity": "token"}, "time": {}})
    with pytest.raises(DMQuantError, match="quantizes no activations"):
        QuantConfig.from_dict({"activations": None, "split": {}})
    with pytest.raises(DMQuantError, match="learned"):
        QuantConfig.from_dict({"time": {"mode": "learned"}, "reconstruction": {"learn_act_scales": True}})
    with pytest.raises(DMQuantError, match="time.mode='hourly'"):
        QuantConfig.from_dict({"time": {"mode": "hourly"}})


def test_learned_table_is_recomputed_for_new_timesteps():
    q, _ = table_quantizer("learned")
    q.retable(torch.tensor([951.0, 1.0]))
    assert q.scale.shape == (2,) and torch.equal(q.timesteps, torch.tensor([951.0, 1.0]))
    step, _ = table_quantizer("step")
    with pytest.raises(DMQuantError, match="only time.mode='learned'"):
        step.retable(torch.tensor([1.0]))


def test_shipped_time_recipes():
    from dmquant.config import load_recipe

    assert load_recipe("w8a8-time").time.mode == "step" and load_recipe("w8a8-time").calibration.sampler.kind == "all"
    qd = load_recipe("w4a8-qdiffusion")
    assert qd.split is not None and qd.reconstruction.unit == "block"
    assert load_recipe("w4a8").reconstruction == qd.reconstruction and load_recipe("w4a8-rtn").reconstruction is None
