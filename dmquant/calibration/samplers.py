"""Timestep samplers: which denoising steps of a sampling run feed calibration.

Steps are indices ``0 .. n-1`` of a run of ``n`` steps (step 0 is the noisiest). Samplers that draw
from a distribution work in diffusion time ``u = t / T`` (1 = pure noise, 0 = clean), mapped to the
step ``round((1 - u) (n - 1))``, and draw afresh for every prompt batch (``batch`` seeds the draw),
so over many batches the recorded steps follow the distribution. One interface: ``select(n, batch)``, and
``rounds``: how many times the calibration run records again along the quantized model (PCR; 0 for most).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmquant.config import TimestepSamplerConfig
from dmquant.errors import DMQuantError


def _check_steps(num_inference_steps: int) -> None:
    if num_inference_steps < 1:
        raise DMQuantError("num_inference_steps must be at least 1")


def steps_from_fractions(u: torch.Tensor, num_inference_steps: int) -> list[int]:
    """Distinct step indices nearest to diffusion times ``u`` in [0, 1] (1 = the first, noisiest step)."""
    steps = torch.round((1.0 - u.clamp(0.0, 1.0)) * (num_inference_steps - 1)).long()
    return sorted(set(steps.tolist()))


def skew_normal(n: int, mean: float, std: float, skew: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of a skew-normal with location ``mean``, scale ``std`` and shape ``skew`` (0: normal)."""
    delta = skew / math.sqrt(1.0 + skew * skew)
    u0, u1 = torch.randn(2, n, generator=generator, dtype=torch.float64)
    z = delta * u0.abs() + math.sqrt(1.0 - delta * delta) * u1
    return mean + std * z


@dataclass(frozen=True)
class UniformSampler:
    """``num_timesteps`` steps evenly spaced over the sampling run, first and last included (Q-Diffusion)."""

    num_timesteps: int
    rounds = 0

    def select(self, num_inference_steps: int, batch: int = 0) -> list[int]:
        _check_steps(num_inference_steps)
        k = min(self.num_timesteps, num_inference_steps)
        if k == 1:
            return [num_inference_steps - 1]
        return sorted({round(i * (num_inference_steps - 1) / (k - 1)) for i in range(k)})


@dataclass(frozen=True)
class AllStepsSampler:
    """Every step of the run (TFMQ-DM's finite set of timesteps)."""

    rounds = 0

    def select(self, num_inference_steps: int, batch: int = 0) -> list[int]:
        _check_steps(num_inference_steps)
        return list(range(num_inference_steps))


def _generator(seed: int, batch: int) -> torch.Generator:
    """The generator of one prompt batch's draws (a new draw per batch, reproducible from ``seed``)."""
    return torch.Generator().manual_seed(seed * 100_003 + batch)


@dataclass(frozen=True)
class _DrawnSampler:
    """A sampler that draws ``num_timesteps`` diffusion times per prompt batch (``sample`` from the
    batch's seeded generator) and maps them to the run's steps."""

    num_timesteps: int
    seed: int = 0
    rounds = 0

    def draw(self, n: int, batch: int = 0) -> torch.Tensor:
        return self.sample(n, _generator(self.seed, batch))

    def select(self, num_inference_steps: int, batch: int = 0) -> list[int]:
        _check_steps(num_inference_steps)
        return steps_from_fractions(self.draw(self.num_timesteps, batch), num_inference_steps)


@dataclass(frozen=True)
class NormalSampler(_DrawnSampler):
    """``u ~ SkewNormal(mean, std, skew)`` clipped to [0, 1] (PTQ4DM: Normal(0.4, 0.4)), ``num_timesteps`` draws."""

    mean: float = 0.4
    std: float = 0.4
    skew: float = 0.0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return skew_normal(n, self.mean, self.std, self.skew, generator).clamp(0.0, 1.0)


@dataclass(frozen=True)
class BetaSampler(_DrawnSampler):
    """``u ~ Beta(alpha, beta)`` (BitsFusion), ``num_timesteps`` draws per prompt batch."""

    alpha: float = 2.0
    beta: float = 2.0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # torch.distributions takes no generator: Beta(a, b) = Ga / (Ga + Gb) from seeded gamma draws
        a, b = _gamma(self.alpha, n, generator), _gamma(self.beta, n, generator)
        return a / (a + b)


def _gamma(shape: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Gamma(shape, 1) draws from a seeded generator (Marsaglia-Tsang; shape < 1 boosted by U^(1/shape))."""
    boost = shape < 1.0
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(0, dtype=torch.float64)
    while out.numel() < n:
        x = torch.randn(2 * n, generator=generator, dtype=torch.float64)
        u = torch.rand(2 * n, generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out = torch.cat([out, (d * v)[ok]])
    out = out[:n]
    if boost:
        out = out * torch.rand(n, generator=generator, dtype=torch.float64) ** (1.0 / shape)
    return out


@dataclass(frozen=True)
class ProgressiveSampler(UniformSampler):
    """Uniform steps, then ``rounds`` more recordings along the quantized model's own trajectory, each
    followed by a new estimate of the ranges (PCR). The calibration run asks every sampler for ``rounds``."""

    rounds: int = 1


def make_sampler(config: TimestepSamplerConfig | str, num_timesteps: int, seed: int = 0):
    """The sampler a recipe names."""
    config = TimestepSamplerConfig(kind=config) if isinstance(config, str) else config
    if config.kind == "uniform":
        return UniformSampler(num_timesteps)
    if config.kind == "progressive":
        return ProgressiveSampler(num_timesteps, config.rounds)
    if config.kind == "all":
        return AllStepsSampler()
    if config.kind == "normal":
        return NormalSampler(num_timesteps, seed, mean=config.mean, std=config.std, skew=config.skew)
    if config.kind == "beta":
        return BetaSampler(num_timesteps, seed, alpha=config.alpha, beta=config.beta)
    raise DMQuantError(f"unknown timestep sampler {config.kind!r}")
