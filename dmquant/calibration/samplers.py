"""Timestep samplers: which denoising steps of a sampling run feed calibration."""

from __future__ import annotations

from dataclasses import dataclass

from dmquant.errors import DMQuantError


@dataclass(frozen=True)
class UniformSampler:
    """``num_timesteps`` steps evenly spaced over the sampling run, first and last included (Q-Diffusion)."""

    num_timesteps: int

    def select(self, num_inference_steps: int) -> list[int]:
        if num_inference_steps < 1:
            raise DMQuantError("num_inference_steps must be at least 1")
        k = min(self.num_timesteps, num_inference_steps)
        if k == 1:
            return [num_inference_steps - 1]
        return sorted({round(i * (num_inference_steps - 1) / (k - 1)) for i in range(k)})


def make_sampler(name: str, num_timesteps: int):
    if name == "uniform":
        return UniformSampler(num_timesteps)
    raise DMQuantError(f"unknown timestep sampler {name!r}: use 'uniform'")
