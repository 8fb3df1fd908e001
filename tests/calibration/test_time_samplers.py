"""Timestep samplers: the distributions they draw from, and their recipe configs."""

import pytest
import torch

from dmquant.calibration.samplers import (
    AllStepsSampler,
    BetaSampler,
    NormalSampler,
    ProgressiveSampler,
    make_sampler,
    skew_normal,
    steps_from_fractions,
)
from dmquant.config import CalibrationConfig, QuantConfig, TimestepSamplerConfig
from dmquant.errors import DMQuantError


def test_normal_sampler_matches_ptq4dm_moments():
    u = NormalSampler(8, mean=0.4, std=0.1).draw(20000)
    assert abs(float(u.mean()) - 0.4) < 0.01 and abs(float(u.std()) - 0.1) < 0.01


def test_skew_moves_the_mass_towards_noise():
    gen = torch.Generator().manual_seed(0)
    z = skew_normal(20000, 0.0, 1.0, 4.0, gen)
    expected_mean = (2 / torch.pi) ** 0.5 * 4 / 17**0.5  # skew-normal mean with shape 4
    assert abs(float(z.mean()) - expected_mean) < 0.03
    assert float(NormalSampler(8, skew=3.0).draw(5000).mean()) > float(NormalSampler(8).draw(5000).mean())


def test_beta_sampler_moments():
    u = BetaSampler(8, alpha=2.0, beta=5.0).draw(20000)
    assert abs(float(u.mean()) - 2 / 7) < 0.01
    assert abs(float(u.var()) - 10 / (49 * 8)) < 0.003


def test_steps_map_noise_to_the_first_step_and_draws_change_per_batch():
    assert steps_from_fractions(torch.tensor([1.0, 0.0, 0.5]), 25) == [0, 12, 24]
    s = NormalSampler(8)
    assert s.select(25, 0) == s.select(25, 0) and s.select(25, 0) != s.select(25, 1)
    assert all(0 <= i < 25 for b in range(20) for i in BetaSampler(8).select(25, b))
    assert AllStepsSampler().select(5) == [0, 1, 2, 3, 4]


def test_sampler_config_from_recipes():
    c = QuantConfig.from_dict({"calibration": {"sampler": {"kind": "normal", "mean": 0.5, "std": 0.2, "skew": 1.0}}})
    assert c.calibration.sampler == TimestepSamplerConfig("normal", 0.5, 0.2, 1.0)
    assert CalibrationConfig(sampler="all").sampler.kind == "all"
    assert QuantConfig.from_dict(c.to_dict()) == c
    assert isinstance(make_sampler(c.calibration.sampler, 8), NormalSampler)
    progressive = make_sampler("progressive", 3)
    assert isinstance(progressive, ProgressiveSampler) and progressive.rounds == 1 and progressive.select(5) == [0, 2, 4]
    assert [make_sampler(kind, 3).rounds for kind in ("uniform", "all", "normal", "beta")] == [0, 0, 0, 0]
    with pytest.raises(DMQuantError, match="calibration.sampler.kind='gauss'"):
        CalibrationConfig(sampler="gauss")
    with pytest.raises(DMQuantError, match="unknown keys"):
        CalibrationConfig(sampler={"kind": "beta", "a": 1})
    with pytest.raises(DMQuantError, match="mean=1.5"):
        TimestepSamplerConfig("normal", mean=1.5)
