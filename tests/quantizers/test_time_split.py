"""The TimeTable (keys, lookup policies, float timesteps), time-conditioned range tables, and split
quantizers of a layer (== two quantizers on the two parts of the skip concatenation)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, QuantConfig, TimeConditioningConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.nn.layers import QuantConv2d
from dmquant.nn.wrap import input_quantizers, weight_quantizers
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.timetable import TimeTable, interval_groups, single_timestep
from dmquant.quantizers.weight import WeightQuantizer

KEYS = torch.tensor([901.0, 601.0, 301.0, 1.0])


def table_quantizer(mode="step", intervals=2):
    table = TimeTable(KEYS)
    q = input_quantizers(ActQuantConfig(bits=8), table, TimeConditioningConfig(mode=mode, num_intervals=intervals))(-1)
    assert q.table is table
    q.set_mode("observe")
    for t, amp in [(901, 8.0), (601, 4.0), (1, 1.0)]:  # 301 is never seen
        table.set_timestep(torch.tensor([t, t]))
        q(torch.linspace(-amp, amp, 101))
    q.finalize()
    q.set_mode("quant")
    return q, table


def test_lookup_and_groups():
    table = TimeTable(KEYS)
    assert table.lookup(601) == 1 and table.lookup(torch.tensor([1.0, 1.0])) == 3
    with pytest.warns(UserWarning, match="nearest calibrated step"):
        assert table.lookup(620) == 1
    assert interval_groups(6, 3) == [0, 0, 1, 1, 2, 2] and interval_groups(3, 5) == [0, 1, 2]
    with pytest.raises(DMQuantError, match="different timesteps"):
        single_timestep(torch.tensor([1, 2]))
    with pytest.raises(DMQuantError, match="empty timestep"):
        single_timestep(torch.tensor([]))
    with pytest.raises(DMQuantError, match="unknown time-table policy 'closest'"):
        TimeTable(KEYS, policy="closest")
    with pytest.raises(DMQuantError, match="table of the time-conditioned quantizers is empty"):
        TimeTable().lookup(1)


def test_float_keys_of_flow_matching_schedules_match_within_the_tolerance():
    # a flow-matching scheduler's timesteps: sigmas in [0, 1] (or sigma * 1000), not integers
    sigmas = torch.linspace(1.0, 0.0, 9)[:-1]  # 1.0, 0.875, ..., 0.125
    table = TimeTable(sigmas.tolist(), policy="exact")
    assert table.keys.dtype == torch.float64 and table.tolerance == pytest.approx(0.0625)
    for i, s in enumerate(sigmas):
        assert table.lookup(s.to(torch.float32)) == i  # a float32 timestep tensor of the key
        assert table.lookup(float(s) + 0.05) == i  # within half the smallest gap
    with pytest.raises(DMQuantError, match="do not contain timestep 1.1"):
        table.lookup(1.1)
    shifted = TimeTable([1.0, 0.9, 0.5, 0.2], policy="exact")  # a shifted schedule: uneven gaps
    assert shifted.tolerance == pytest.approx(0.05) and shifted.lookup(0.52) == 2
    with pytest.raises(DMQuantError, match="do not contain timestep 0.7"):
        shifted.lookup(0.7)
    scaled = TimeTable((torch.linspace(1.0, 0.0, 29)[:-1] * 1000).tolist(), policy="exact")
    assert scaled.tolerance == 0.5  # integer-like spacing: at most half a step
    assert scaled.lookup(torch.tensor(964.2857, dtype=torch.float32)) == 1
    with pytest.raises(DMQuantError, match="generate with the same scheduler"):
        scaled.lookup(964.9)
    table.set_keys([3.0, 1.0])
    assert table.tolerance == 0.5 and len(table) == 2
    with pytest.raises(DMQuantError, match="outside a denoiser call"):
        table.index()  # new keys forget the current step


def test_exact_policy_refuses_and_nearest_policy_warns_once():
    exact = TimeTable(KEYS, policy="exact", what="noise-correction statistics")
    with pytest.raises(DMQuantError, match="noise-correction statistics were fitted for the timesteps 901, 601"):
        exact.set_timestep(620)
    nearest = TimeTable(KEYS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nearest.set_timestep(950)
        nearest.set_timestep(20)
        nearest.set_timestep(1)
    assert len(caught) == 1 and "nearest calibrated step" in str(caught[0].message)
    assert nearest.index() == 3 and nearest.timestep == 1.0


def test_table_is_installed_as_a_pre_hook_that_reads_each_call():
    class Denoiser(nn.Module):
        def forward(self, x, timestep):
            return x

    model = Denoiser()
    table = TimeTable(KEYS)
    assert table.install(model, lambda args, kwargs: kwargs["timestep"]) is table
    model(torch.ones(1), timestep=torch.tensor([301.0]))
    assert table.index() == 2 and table.timestep == 301.0
    model(torch.ones(1), timestep=601)
    assert table.index() == 1


def test_step_table_holds_one_range_per_step_and_fills_unseen_steps():
    q, table = table_quantizer()
    assert q.scale.shape == (4,) and torch.equal(table.keys, KEYS.double())
    amp = q.scale * 255 / 2
    assert torch.allclose(amp, torch.tensor([8.0, 4.0, 4.0, 1.0]), rtol=1e-3)  # 301 borrows its neighbour
    x = torch.linspace(-1, 1, 11)
    table.set_timestep(1)
    fine = q(x)
    table.set_timestep(901)
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
    q, table = table_quantizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table.set_timestep(950)
        table.set_timestep(20)
    assert len(caught) == 1 and "nearest calibrated step" in str(caught[0].message)
    assert table.index() == 3
    assert torch.equal(q.current_qparams()[0], q.scale[3])


def test_table_needs_keys_and_a_timestep():
    q = ActQuantizer(8, table=TimeTable())
    with pytest.raises(DMQuantError, match="cannot observe before its table has keys"):
        q.set_mode("observe")
    q = ActQuantizer(8, table=TimeTable(KEYS))
    q.set_mode("observe")
    assert len(q.observers) == 4
    with pytest.raises(DMQuantError, match="outside a denoiser call"):
        q(torch.ones(3))
    with pytest.raises(DMQuantError, match="unknown time mode 'hourly'"):
        ActQuantizer(8, table=TimeTable(KEYS), table_mode="hourly")
    dynamic = ActQuantizer(8, granularity="token", table=TimeTable(KEYS))
    assert dynamic.table is None  # a dynamic quantizer has no range to tabulate


def split_conv(split, make_weight, make_input):
    torch.manual_seed(0)
    q = QuantConv2d.wrap(nn.Conv2d(16, 8, 3, padding=1), weight_quantizers(WeightQuantConfig(bits=4)), make_input)
    q.split_quantizers(split, make_weight, make_input)
    return q


def test_split_input_quantizers_equal_two_quantizers_on_the_halves():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 6, 4, 4) * 5, torch.randn(2, 10, 4, 4) * 0.1], dim=1)
    make = input_quantizers(ActQuantConfig(bits=6), None, None)
    layer = split_conv(6, None, make)
    a, b = make(1), make(1)
    quantizers = [*layer.input_quantizers, a, b]
    assert len(layer.input_quantizers) == 2 and all(q.channel_dim == 1 for q in quantizers)
    for q in quantizers:
        q.set_mode("observe")
    layer.quant_input(x), a(x[:, :6]), b(x[:, 6:])
    for q in quantizers:
        q.finalize()
        q.set_mode("quant")
    assert torch.equal(layer.quant_input(x), torch.cat([a(x[:, :6]), b(x[:, 6:])], dim=1))
    whole = make(1)
    whole.set_mode("observe"), whole(x), whole.finalize(), whole.set_mode("quant")
    assert (layer.quant_input(x) - x)[:, 6:].abs().max() < (whole(x) - x)[:, 6:].abs().max()


def test_split_weight_quantizers_equal_two_quantizers():
    layer = split_conv(5, weight_quantizers(WeightQuantConfig(bits=4)), None)
    w = layer.weight.detach()
    layer.calibrate_weight()
    a, b = WeightQuantizer(4), WeightQuantizer(4)
    a.calibrate(w[:, :5]), b.calibrate(w[:, 5:])
    assert len(layer.input_quantizers) == 0  # no input quantizers to split
    assert torch.equal(layer.qdq_weight, torch.cat([a(w[:, :5]), b(w[:, 5:])], dim=1))
    assert torch.equal(layer.effective_weight(torch.float32), layer.qdq_weight)
    with pytest.raises(DMQuantError, match="split index 16"):
        split_conv(16, weight_quantizers(WeightQuantConfig(bits=4)), None).calibrate_weight()


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
    q, table = table_quantizer("learned")
    new_keys = torch.tensor([951.0, 1.0])
    q.retable(new_keys)
    table.set_keys(new_keys)
    assert q.scale.shape == (2,) and torch.equal(table.keys, new_keys.double())
    table.set_timestep(951)
    assert torch.equal(q.current_qparams()[0], q.scale[0])
    step, _ = table_quantizer("step")
    with pytest.raises(DMQuantError, match="only time.mode='learned'"):
        step.retable(torch.tensor([1.0]))


def test_shipped_time_recipes():
    from dmquant.config import load_recipe

    assert load_recipe("w8a8-time").time.mode == "step" and load_recipe("w8a8-time").calibration.sampler.kind == "all"
    qd = load_recipe("w4a8-qdiffusion")
    assert qd.split is not None and qd.reconstruction.unit == "block"
    w4a8 = load_recipe("w4a8")  # learned rounding on weights only: its activations are per token (no scale)
    assert w4a8.reconstruction.unit == "block" and not w4a8.reconstruction.learn_act_scales
    assert w4a8.activations.granularity == "token" and load_recipe("w4a8-rtn").reconstruction is None



def test_a_deep_copy_shares_the_time_table():
    """A copied quantizer (or layer, or denoiser) reads the one table that the denoiser's pre-hook writes:
    the hook's closure is not copied, so a copied table would never see the current step."""
    table = TimeTable([900.0, 500.0, 100.0])
    model = nn.Identity()
    table.install(model, lambda args, kwargs: args[1])
    quantizer = ActQuantizer(8, table=table)
    clone = copy.deepcopy(quantizer)
    assert clone.table is table
    model.register_forward_pre_hook(lambda m, args: args[:1])  # Identity takes one input
    model(torch.zeros(1), 500.0)
    assert clone.table.index() == 1
