"""Today's transformer families on tiny random weights: W8A8 accuracy with attention quantized through the
core-attention hook, W4A8 / W4A4 run, save/load, recorded calls, flow-matching timesteps, unknown denoisers."""

from __future__ import annotations

import warnings

import pytest
import torch
from families import FAMILIES, build, calls
from torch import nn

import dmquant
from dmquant.calibration.records import load_calls, save_calls
from dmquant.models.adapters import adapter_for
from dmquant.nn.wrap import attention_modules, quant_layers, quantized_attention, time_table
from dmquant.quantizers.affine import sqnr_db
from dmquant.serialization import load_quantized_denoiser, save_quantized_denoiser

CALIBRATION_SEED, TEST_SEED = 1, 2


def _outputs(model, test_calls):
    with torch.no_grad():
        return [model(*a, **k)[0] for a, k in test_calls]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w8a8_with_quantized_attention(family):
    model, inputs = build(family)
    test_calls = calls(inputs, TEST_SEED, (700, 300))
    reference = _outputs(model, test_calls)
    dmquant.quantize(model, "w8a8-static", calibration_data=calls(inputs, CALIBRATION_SEED), progress=False)
    for ref, out in zip(reference, _outputs(model, test_calls)):
        assert 20.0 <= sqnr_db(ref, out) < 70.0
    attention = quantized_attention(model)
    expected = [n for n, _ in attention_modules(model) if not n.startswith("context_embedder.")]  # Hunyuan's refiner
    assert [n for n, _ in attention] == expected == model.dmquant.report.attention
    for _, attn in attention:
        assert attn.processor.routed > 0 and all(q.calibrated for q in attn.dmq_quant.quantizers())
    default_fp = adapter_for(model).default_exclude
    assert default_fp and not any(name.split(".")[0] in ("proj_out", "x_embedder", "img_in", "proj_in")
                                  for name, _ in quant_layers(model))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_four_bit_recipes_run(family, fast_recipe):
    for recipe in ("w4a8", "w4a4"):
        model, inputs = build(family)
        test_calls = calls(inputs, TEST_SEED, (700,))
        reference = _outputs(model, test_calls)
        dmquant.quantize(model, fast_recipe(recipe), calibration_data=calls(inputs, CALIBRATION_SEED, (900, 300)),
                         progress=False)
        out = _outputs(model, test_calls)[0]
        assert torch.isfinite(out).all() and 0.0 < sqnr_db(reference[0], out) < 70.0, recipe


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_save_load_reproduces_the_frozen_model(family, tmp_path):
    model, inputs = build(family)
    test_calls = calls(inputs, TEST_SEED, (700, 300))
    dmquant.quantize(model, "w8a8-static", calibration_data=calls(inputs, CALIBRATION_SEED), progress=False)
    dmquant.freeze(model)
    frozen = _outputs(model, test_calls)
    save_quantized_denoiser(model, tmp_path, model.dmquant.config)
    loaded = load_quantized_denoiser(tmp_path)
    assert [n for n, _ in quantized_attention(loaded)] == [n for n, _ in quantized_attention(model)]
    for a, b in zip(frozen, _outputs(loaded, test_calls)):
        assert torch.equal(a, b)


def test_flux_calls_with_non_tensor_arguments_replay(tmp_path):
    model, inputs = build("flux")
    (args, kwargs), = calls(inputs, TEST_SEED, (500,))
    kwargs = {**kwargs, "joint_attention_kwargs": {"scale": 1.0}, "controlnet_block_samples": None}
    save_calls([(args, kwargs), ((), {"img_shapes": [(1, 4, 4)], "scale": (8 / 25, 32, 32)})], tmp_path / "s.st")
    (a, k), (_, other) = load_calls(tmp_path / "s.st")
    assert other == {"img_shapes": [(1, 4, 4)], "scale": (8 / 25, 32, 32)}
    assert k["return_dict"] is False and k["joint_attention_kwargs"] == {"scale": 1.0}
    with torch.no_grad():
        assert torch.equal(model(*a, **k)[0], model(*args, **kwargs)[0])


class _FlowPipeline:
    """A FLUX-like pipeline: flow-matching Euler steps, the denoiser called at t / 1000, classifier-free
    guidance as two separate denoiser calls per step (as Wan's and Qwen-Image's pipelines do)."""

    def __init__(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer, self._inputs = build("flux")
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    def __call__(self, prompt, num_inference_steps=4, generator=None, output_type="latent", **kwargs):
        self.scheduler.set_timesteps(num_inference_steps)
        base = self._inputs(generator, 0)
        latents = base["hidden_states"].repeat(len(prompt), 1, 1)
        for t in self.scheduler.timesteps:
            call = {**base, "hidden_states": latents, "timestep": (t / 1000).expand(len(prompt))}
            cond = self.transformer(**{k: v.repeat_interleave(len(prompt), 0) if k in (
                "encoder_hidden_states", "pooled_projections") else v for k, v in call.items()})[0]
            uncond = self.transformer(**{**call, "encoder_hidden_states": torch.zeros(len(prompt), 6, 24),
                                         "pooled_projections": torch.zeros(len(prompt), 20)})[0]
            latents = self.scheduler.step(uncond + 3.0 * (cond - uncond), t, latents).prev_sample
        return latents


def test_flow_matching_keys_are_the_timesteps_the_denoiser_sees():
    pipe = _FlowPipeline()
    dmquant.quantize(pipe, "w8a8-time", prompts=["a", "b"], num_inference_steps=4, progress=False)
    expected = (pipe.scheduler.timesteps.double() / 1000).tolist()
    assert time_table(pipe.transformer).keys.tolist() == pytest.approx(expected)
    assert pipe.dmquant.calibration["steps"] == [0, 1, 2, 3]  # two calls per step counted as one step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every step of a generation finds its calibrated key
        pipe(["c"], num_inference_steps=4, generator=torch.Generator().manual_seed(5))


class _Unknown(nn.Module):
    def __init__(self):
        from diffusers.models.attention_processor import Attention

        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(8, 32), nn.Linear(32, 8)
        self.attn = Attention(query_dim=32, heads=2, dim_head=16)
        self.video = nn.Conv3d(8, 8, 1)

    def forward(self, hidden_states, timestep):
        return self.proj_out(self.attn(self.proj_in(hidden_states)) + timestep)


def test_unknown_denoiser_gets_linear_layers_and_one_warning():
    model = _Unknown().eval()
    data = [((torch.randn(1, 10, 8), torch.tensor([t])), {}) for t in (1.0, 2.0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dmquant.quantize(model, "w8a8-static", calibration_data=data, progress=False)
    messages = [str(w.message) for w in caught if "dmquant" in str(w.message)]
    assert len(messages) == 1 and "_Unknown" in messages[0] and "1 attention modules" in messages[0]
    assert "Conv3d" in messages[0]
    assert {n for n, _ in quant_layers(model)} == {"proj_in", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v",
                                                   "attn.to_out.0"}
    assert not quantized_attention(model)
