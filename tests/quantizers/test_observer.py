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


def observed(calls, capacity):
    obs = RangeObserver(capacity=capacity)
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
