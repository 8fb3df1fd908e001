import math

import pytest
import torch

import dmquant
from dmquant.correction import (
    NoiseCorrectionStats,
    apply_noise_correction,
    fit_noise_correction,
    remove_noise_correction,
)
from dmquant.correction.ptqd import _Accumulator, _channels_first, _ddim_coefficients, _reduced_std
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_flux_pipeline, build_tiny_sd_pipeline


def latents(pipe, labels, steps, **kw):
    g = torch.Generator().manual_seed(0)
    cond = {"class_labels": labels} if isinstance(labels[0], int) else {"prompt": labels, "height": 16, "width": 16}
    with torch.no_grad():
        return pipe(**cond, num_inference_steps=steps, generator=g, output_type="latent", **kw).images


def with_scheduler(pipe, name):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("scheduler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
def test_identity_statistics_leave_sampling_unchanged(scheduler, eta):
    pipe = with_scheduler(build_tiny_sd_pipeline(), scheduler)
    kw = {} if eta is None else {"eta": eta}
    prompts = ["a red circle", "a blue square"]
    plain = latents(pipe, prompts, 5, **kw)
    pipe.scheduler.set_timesteps(5)
    stats = NoiseCorrectionStats.identity(pipe.scheduler.timesteps, channels=4)
    handle = apply_noise_correction(pipe, stats)
    corrected = latents(pipe, prompts, 5, **kw)
    handle.remove()
    assert torch.equal(plain, corrected)
    assert torch.equal(latents(pipe, prompts, 5, **kw), plain)  # removed cleanly


def test_regression_recovers_slope_bias_and_residual():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(16, 4, 8, 8, generator=g)
    mu = torch.tensor([0.1, -0.2, 0.0, 0.3])
    delta = 0.05 * eps + mu[None, :, None, None] + 0.02 * torch.randn(eps.shape, generator=g)
    acc = _Accumulator(4)
    acc.add(eps[:8], delta[:8])
    acc.add(eps[8:], delta[8:])
    k, mu_hat, var = acc.fit()
    assert abs(k - 0.05) < 0.005
    assert torch.allclose(mu_hat, mu, atol=0.005)
    assert math.isclose(math.sqrt(var), 0.02, rel_tol=0.05)


def test_variance_absorption_follows_the_formula():
    pipe = with_scheduler(build_tiny_dit_pipeline(), "ddim")
    pipe.scheduler.set_timesteps(5)
    t = int(pipe.scheduler.timesteps[1])
    s_t, lam = _ddim_coefficients(pipe.scheduler, t, eta=1.0)
    assert s_t > 0 and lam < 0
    assert _reduced_std(s_t, lam, 0.0) == s_t
    assert math.isclose(_reduced_std(s_t, lam, 0.1), math.sqrt(s_t**2 - (lam * 0.1) ** 2))
    assert _reduced_std(s_t, lam, 1e3) == 0.0  # never below zero
    stats = NoiseCorrectionStats.identity(pipe.scheduler.timesteps, 4)
    stats.var[:] = 0.01
    handle = apply_noise_correction(pipe, stats)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    z = torch.randn(1, 4, 8, 8)
    out = pipe.scheduler.step(eps, t, x, eta=1.0, variance_noise=z.clone()).prev_sample
    handle.remove()
    plain = pipe.scheduler.step(eps, t, x, eta=1.0, variance_noise=z.clone()).prev_sample
    expected = plain + (_reduced_std(s_t, lam, 0.1) - s_t) * z
    assert torch.allclose(out, expected, atol=1e-5)


def test_fitted_correction_reduces_the_prediction_error_on_held_out_inputs(tmp_path):
    from dmquant.calibration.collect import collect_denoiser_inputs
    from dmquant.calibration.records import CalibrationSet
    from dmquant.nn.wrap import full_precision

    pipe = build_tiny_sd_pipeline()
    train = ["a red circle", "a blue square", "green triangle", "white disk", "big yellow star", "small red square"]
    kw = {"height": 16, "width": 16}
    dmquant.quantize(pipe, {"weights": {"bits": 3}, "activations": None}, progress=False)
    stats = fit_noise_correction(pipe, train, num_inference_steps=8, progress=False, **kw)
    assert stats.timesteps.shape == (8,) and stats.mu.shape == (8, 4) and torch.all(stats.var > 0)
    collect_denoiser_inputs(pipe, pipe.unet, ["a white circle", "a green square"], range(8), tmp_path, 8,
                            progress=False, call_kwargs=kw)
    err_plain = err_corrected = 0.0
    with torch.no_grad():
        for args, kwargs in CalibrationSet(tmp_path).iter_calls():
            quantized = pipe.unet(*args, **kwargs)[0]
            with full_precision(pipe.unet):
                reference = pipe.unet(*args, **kwargs)[0]
            i = stats.index(args[1])
            corrected = (quantized - stats.mu[i][None, :, None, None]) / (1 + stats.k[i])
            err_plain += float(((quantized - reference) ** 2).mean())
            err_corrected += float(((corrected - reference) ** 2).mean())
    assert err_corrected < 0.97 * err_plain


def test_mismatched_schedule_is_a_clear_error():
    pipe = build_tiny_dit_pipeline()
    pipe.scheduler.set_timesteps(5)
    apply_noise_correction(pipe, NoiseCorrectionStats.identity(pipe.scheduler.timesteps, 4))
    with pytest.raises(DMQuantError, match="same scheduler and number of steps"):
        latents(pipe, [1], 7)


def test_packed_token_predictions_are_regressed_per_channel():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4, 32, 6, generator=g)  # FLUX layout [B, S, C]: channels last
    mu = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05, -0.1])
    delta = 0.05 * eps + mu + 0.02 * torch.randn(eps.shape, generator=g)
    acc = _Accumulator(6)
    acc.add(_channels_first(eps), _channels_first(delta))
    k, mu_hat, _ = acc.fit()
    assert abs(k - 0.05) < 0.01
    assert torch.allclose(mu_hat, mu, atol=0.01)


def test_flux_correction_acts_on_the_channel_axis_and_generates():
    pipe = build_tiny_flux_pipeline()
    prompts, kw = ["a red circle", "a blue square", "green triangle", "white disk"], {"height": 16, "width": 16}
    dmquant.quantize(pipe, {"weights": {"bits": 4}, "activations": None, "calibration": {"num_inference_steps": 4},
                            "correction": {"num_prompts": 4}}, prompts=prompts, progress=False, **kw)
    stats = pipe._dmquant_noise_correction.stats
    assert stats.mu.shape == (4, 16) and abs(float(stats.timesteps[0]) - 1.0) < 1e-6  # FLUX's t / 1000
    stats.mu[:] = torch.linspace(-1, 1, 16)  # distinct per channel: a wrong axis would show
    stats.k[:] = 0.25
    den, seen = pipe.transformer, {}
    remove_noise_correction(pipe)  # hooks run in order: capture, correction, capture

    def capture(name):
        def hook(module, args, kwargs, output):
            seen.setdefault(name, output[0].clone())  # returns None: the output is left as it is
        return hook

    hooks = [den.register_forward_hook(capture("before"), with_kwargs=True)]
    apply_noise_correction(pipe, stats)
    hooks.append(den.register_forward_hook(capture("after"), with_kwargs=True))
    latents(pipe, ["a red circle"], 4)
    for h in hooks:
        h.remove()
    expected = (seen["before"] - torch.linspace(-1, 1, 16)) / 1.25
    assert seen["before"].shape == (1, 16, 16)
    assert torch.allclose(seen["after"], expected, atol=1e-6)
    assert generate(pipe, prompts[:2], GenerationConfig(num_inference_steps=4, progress=False), distributed=False,
                    **kw).shape == (2, 16, 16, 3)
    with pytest.raises(DMQuantError, match="fitted for 4 steps"):
        generate(pipe, prompts[:1], GenerationConfig(num_inference_steps=5, progress=False), distributed=False, **kw)


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_matching_euler_absorbs_the_residual_only_when_it_injects_noise(stochastic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_tiny_dit_pipeline()  # any denoiser: the step wrapper reads the scheduler only
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic)
    pipe.scheduler.set_timesteps(5)
    t = pipe.scheduler.timesteps[1]
    sigma, sigma_next = float(pipe.scheduler.sigmas[1]), float(pipe.scheduler.sigmas[2])
    stats = NoiseCorrectionStats.identity(pipe.scheduler.timesteps, 4)
    stats.var[:] = 0.04
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)

    def step():
        pipe.scheduler.set_timesteps(5)
        return pipe.scheduler.step(v, t, x, generator=torch.Generator().manual_seed(3)).prev_sample

    plain = step()
    handle = apply_noise_correction(pipe, stats)
    corrected = step()
    handle.remove()
    if not stochastic:  # deterministic Euler: nothing to absorb
        assert torch.equal(corrected, plain)
        return
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    reduced = _reduced_std(sigma_next, -(1 - sigma_next) * sigma, 0.2)
    assert 0 < reduced < sigma_next
    assert torch.allclose(corrected, plain + (reduced - sigma_next) * z, atol=1e-6)
