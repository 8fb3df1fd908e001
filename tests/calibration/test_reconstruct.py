"""Reconstruction's guidance-aware loss (``reconstruction.guided``): which calls carry both CFG halves, the
loss's numbers, and the scale the calibration run hands it."""

import pytest
import torch

import dmquant
from dmquant.calibration.reconstruct import cfg_paired, reconstruction_error
from dmquant.config import ReconstructionConfig
from dmquant.errors import DMQuantError
from dmquant.models.tiny import build_tiny_dit_pipeline


def test_a_call_is_cfg_paired_when_its_latent_halves_are_equal():
    x = torch.randn(2, 4, 8, 8)
    doubled = torch.cat([x, x])
    assert cfg_paired((doubled, torch.tensor(10)), {})
    assert cfg_paired((), {"hidden_states": doubled, "timestep": torch.tensor([10, 10, 10, 10])})
    assert not cfg_paired((torch.randn(4, 4, 8, 8),), {})  # four different latents
    assert not cfg_paired((torch.randn(3, 4, 8, 8),), {})  # odd batch
    assert not cfg_paired((torch.tensor(1.0),), {}) and not cfg_paired((), {"timestep": 3})


def test_the_guided_error_adds_g_squared_times_the_difference_of_the_halves_errors():
    target = torch.zeros(4, 3)
    same = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]).repeat(2, 1)  # both halves err alike
    plain, guided = reconstruction_error([same], [target], 7.5)
    assert plain.item() == pytest.approx(15 / 6) and guided.item() == pytest.approx(15 / 6)
    opposite = torch.cat([same[:2], -same[:2]])  # the halves err in opposite directions: the difference is 2e
    plain, guided = reconstruction_error([opposite, opposite[:3]], [target, target[:3]], 2.0)
    odd = (opposite[:3] ** 2).mean().item()  # an odd batch counts in the plain error only
    assert plain.item() == pytest.approx(15 / 6 + odd)
    assert guided.item() == pytest.approx(15 / 6 + odd + 4.0 * (4 * 15 / 6))
    assert reconstruction_error([same], [target], None)[1].item() == pytest.approx(15 / 6)


def test_guided_reconstruction_config_is_checked():
    assert ReconstructionConfig(guided=True, guidance_scale=4.0).guidance_scale == 4.0
    with pytest.raises(DMQuantError, match="reconstruction.guided='yes' must be true or false"):
        ReconstructionConfig(guided="yes")
    with pytest.raises(DMQuantError, match="reconstruction.guidance_scale=0 must be positive"):
        ReconstructionConfig(guided=True, guidance_scale=0)


@pytest.mark.parametrize("given", [None, 3.0])
def test_the_calibration_runs_guidance_scale_reaches_the_guided_loss(given):
    pipe = build_tiny_dit_pipeline()
    recipe = {"name": "w4a8-guided", "weights": {"bits": 4}, "activations": {"bits": 8, "granularity": "token"},
              "reconstruction": {"iterations": 2, "num_samples": 4, "learn_act_scales": False, "guided": True,
                                 "guidance_scale": given}}
    dmquant.quantize(pipe, recipe, prompts=[1, 2], num_inference_steps=4, num_timesteps=2, progress=False,
                     guidance_scale=6.0)
    report = pipe.dmquant.calibration["reconstruction"]
    assert report["guided_samples"] == report["samples"] == 2  # both recorded calls carry both CFG halves
    assert report["guidance_scale"] == (given or 6.0)
    pipe = build_tiny_dit_pipeline()
    dmquant.quantize(pipe, recipe, prompts=[1, 2], num_inference_steps=4, num_timesteps=2, progress=False,
                     guidance_scale=1.0)  # no guidance: the pipeline does not double the latents
    assert pipe.dmquant.calibration["reconstruction"]["guided_samples"] == 0
