"""RangeObserver: exact extremes, the uniform sample, and the exact tails an MSE range is judged on."""

import pytest
import torch

from dmquant.formats import format_named
from dmquant.quantizers.affine import fake_quant, qparams_from_range
from dmquant.quantizers.observer import RangeObserver
from dmquant.quantizers.ranges import mse_range

U8 = format_named("int", 8, signed=False)


def heavy_tailed_calls(n_calls=16, per_call=1 << 16, outliers=40, gain=60.0, seed=0):
    """Gaussian activations with a few values per call ``gain`` times larger (the outlier tokens of a DiT)."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n_calls):
        x = torch.randn(per_call, generator=g)
        x[torch.randint(0, per_call, (outliers,), generator=g)] *= gain
        calls.append(x)
    return calls


def mse_of(lo, hi, data):
    scale, zero = qparams_from_range(lo, hi, U8, False)
    return float((fake_quant(data, scale[:, None], zero[:, None], U8) - data).pow(2).mean())


def observed(calls, capacity, tail=256):
    obs = RangeObserver(capacity=capacity, tail=tail)
    for x in calls:
        obs.update(x[None])
    return obs


def test_strata_are_the_exact_tails_and_the_sampled_bulk_between_them():
    calls = heavy_tailed_calls(n_calls=6)
    everything = torch.cat(calls)
    obs = observed(calls, capacity=4096)
    bulk, weight, tails = obs.strata()
    assert tails.shape == (1, 2 * obs.tail)
    assert torch.equal(tails[0, obs.tail:].sort().values, everything.topk(obs.tail).values.sort().values)
    assert torch.equal(tails[0, :obs.tail].sort().values, (-everything).topk(obs.tail).values.neg().sort().values)
    assert bulk.numel() > 4000 and bool((bulk > tails[0, :obs.tail].max()).all() and (bulk < tails[0, obs.tail:].min()).all())
    assert weight * bulk.numel() + tails.numel() == pytest.approx(everything.numel())


def test_mse_range_on_strata_matches_the_range_on_all_values():
    """8,192 sampled values (a per-step observer of a time table) miss the outliers: the sample alone clips them
    (71% more error on all the data here); with the exact tails the range is the one all the data gives."""
    calls = heavy_tailed_calls()
    everything = torch.cat(calls)[None]
    best = mse_of(*mse_range(everything, U8, False), everything)
    obs = observed(calls, capacity=8192)
    sample_only = mse_of(*mse_range(obs.sample, U8, False, extremes=(obs.lo, obs.hi)), everything)
    bulk, weight, tails = obs.strata()
    stratified = mse_of(*mse_range(bulk, U8, False, extremes=(obs.lo, obs.hi), tails=tails, sample_weight=weight),
                        everything)
    assert sample_only > 1.3 * best
    assert stratified < 1.01 * best


def test_merge_keeps_the_tails_and_a_complete_sample_needs_none():
    a, b = heavy_tailed_calls(n_calls=2, seed=1), heavy_tailed_calls(n_calls=2, seed=2)
    merged = observed(a, 4096)
    merged.merge(observed(b, 4096))
    _, _, tails = merged.strata()
    everything = torch.cat(a + b)
    assert torch.equal(tails[0, merged.tail:].sort().values, everything.topk(merged.tail).values.sort().values)
    small = observed([torch.randn(1000)], 4096)
    bulk, weight, tails = small.strata()
    assert tails is None and weight == 1.0 and bulk.numel() == 1000
    pooled = observed(a, 4096, tail=0)  # the pooled observer's default: its sample alone
    bulk, weight, tails = pooled.strata()
    assert tails is None and weight == 1.0 and torch.equal(bulk, pooled.sample)


def test_per_step_observers_keep_tails_and_the_pooled_one_does_not():
    from dmquant.quantizers.activation import TIME_OBSERVER_TAIL, ActQuantizer
    from dmquant.quantizers.timetable import TimeTable

    pooled, tabled = ActQuantizer(8, method="mse"), ActQuantizer(8, method="mse", table=TimeTable([1.0, 2.0]))
    pooled.set_mode("observe")
    tabled.set_mode("observe")
    assert [o.tail for o in pooled.observers] == [0]
    assert [o.tail for o in tabled.observers] == [TIME_OBSERVER_TAIL] * 2 and TIME_OBSERVER_TAIL > 0
