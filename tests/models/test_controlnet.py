"""ControlNet pipelines (SD, SDXL, FLUX) on tiny random weights: the denoiser quantized with the conditioning
images passed through calibration, and the ControlNet quantized too, calibrated on the calls the pipeline made
to it in the same runs; frozen, saved and loaded back (dmquant's loader and diffusers' own).

Accuracy is the SQNR of the denoiser's output at every step, each step started from the FP run's latents (the
quantized-denoiser output against FP; :mod:`dmquant.metrics.stepwise`), on held-out prompts, conditioning
images and seed; and of the final latents of a free run. The full round trip uses w8a8-time (per-step activation
ranges; with w8a8-static's one range for all steps the tiny random SD UNet reaches 28.6 dB, under the 30 dB asked
for); the shipped w8a8 (nothing calibrated) is checked for accuracy too (eval/controlnet_sqnr.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

import dmquant
from dmquant.calibration.records import CalibrationSet
from dmquant.diffusers_io import batch_call_arguments, conditioning_image_argument
from dmquant.errors import DMQuantError
from dmquant.metrics.stepwise import denoiser_outputs, stepwise_sqnr
from dmquant.models.tiny import build_tiny_pipeline
from dmquant.models.tiny_control import (
    TINY_CONTROL_NAMES,
    build_tiny_controlnet_pipeline,
    conditioning_images,
)
from dmquant.nn.wrap import activation_quantizers, full_precision, quant_layers, time_table
from dmquant.quantizers.affine import sqnr_db

CALIBRATION = ["a yellow star", "big purple circle at the left", "green square at the bottom", "small white disk"]
HELD_OUT = ["a red circle", "blue square at the top"]
STEPS, SIZE, SEED = 4, {"height": 16, "width": 16}, 123
RESIDUALS = {"tiny-random-sd-controlnet": "down_block_additional_residuals",
             "tiny-random-sdxl-controlnet": "down_block_additional_residuals",
             "tiny-random-flux-controlnet": "controlnet_block_samples"}


def _held_out_call(pipe) -> dict:
    arg = conditioning_image_argument(pipe)
    return {"prompt": HELD_OUT, arg: conditioning_images(len(HELD_OUT), seed=100), "num_inference_steps": STEPS, **SIZE}


@pytest.mark.parametrize("name", TINY_CONTROL_NAMES)
def test_quantized_denoiser_and_controlnet(name, tmp_path):
    pipe = build_tiny_controlnet_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    arg, call = conditioning_image_argument(pipe), _held_out_call(pipe)
    ref_outputs, ref_latents = denoiser_outputs(pipe, call, seed=SEED)
    images = conditioning_images(len(CALIBRATION), seed=7)
    dmquant.quantize(pipe, "w8a8-time", CALIBRATION, **{arg: images}, num_inference_steps=STEPS, batch_size=2,
                     progress=False, controlnet=True, calib_dir=tmp_path / "calib", **SIZE)
    _check_recorded_calls(name, tmp_path / "calib", images)
    assert pipe.controlnet.dmquant.report.quantized and pipe.controlnet.dmquant.config.name == "w8a8-time"

    with full_precision(pipe.controlnet):  # the quantized denoiser alone
        denoiser_db = stepwise_sqnr(pipe, call, ref_outputs, ref_latents, SEED)
    both_db = stepwise_sqnr(pipe, call, ref_outputs, ref_latents, SEED)
    latents_db = sqnr_db(ref_latents[-1], denoiser_outputs(pipe, call, seed=SEED)[1][-1])
    # measured: SD 31.0 / 30.6 / 27.9 dB, SDXL 32.6 / 32.3 / 31.7, FLUX 57.9 / 55.7 / 63.4
    assert 30.0 <= denoiser_db < 70.0, denoiser_db
    assert 25.0 <= both_db < 70.0 and both_db != denoiser_db, (both_db, denoiser_db)  # the ControlNet counts
    assert latents_db >= 25.0, latents_db

    dmquant.freeze(pipe)
    assert pipe.controlnet.dmquant.frozen and all(layer.frozen for _, layer in quant_layers(pipe.controlnet))
    frozen = denoiser_outputs(pipe, call, seed=SEED)[1][-1]
    pipe.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    native = DiffusionPipeline.from_pretrained(tmp_path / "q")  # diffusers' own loader, through dmquant's quantizer
    for other in (loaded, native):
        other.set_progress_bar_config(disable=True)
        assert len(quant_layers(other.controlnet)) == len(quant_layers(pipe.controlnet))
        assert torch.equal(denoiser_outputs(other, call, seed=SEED)[1][-1], frozen)
    assert loaded.controlnet.dmquant.frozen and loaded.controlnet.dmquant.adapter == pipe.controlnet.dmquant.adapter


@pytest.mark.parametrize("name", TINY_CONTROL_NAMES)
def test_default_w8a8_on_the_denoiser_and_the_controlnet(name):
    """The shipped ``w8a8`` (per-token inputs of linear layers, weight-only convolutions: nothing calibrated)
    on both models: measured SD 43.8 / 43.6 dB, SDXL 43.1 / 42.8, FLUX 63.7 / 62.0 (eval/controlnet_sqnr.py)."""
    pipe = build_tiny_controlnet_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    arg, call = conditioning_image_argument(pipe), _held_out_call(pipe)
    ref_outputs, ref_latents = denoiser_outputs(pipe, call, seed=SEED)
    dmquant.quantize(pipe, "w8a8", CALIBRATION, **{arg: conditioning_images(len(CALIBRATION), seed=7)},
                     num_inference_steps=STEPS, batch_size=2, progress=False, controlnet=True, **SIZE)
    with full_precision(pipe.controlnet):
        denoiser_db = stepwise_sqnr(pipe, call, ref_outputs, ref_latents, SEED)
    both_db = stepwise_sqnr(pipe, call, ref_outputs, ref_latents, SEED)
    assert 30.0 <= denoiser_db < 70.0 and 25.0 <= both_db < 70.0 and both_db != denoiser_db, (denoiser_db, both_db)


def _check_recorded_calls(name: str, folder, images: torch.Tensor) -> None:
    """The denoiser's calls carry the ControlNet's residuals; the ControlNet's calls, recorded at the same steps,
    each batch's own conditioning images (SD / SDXL take them as pixels; FLUX's go through the VAE first)."""
    denoiser_calls = list(CalibrationSet(folder).iter_calls())
    controlnet_calls = list(CalibrationSet(folder / "controlnet").iter_calls())
    assert len(denoiser_calls) == len(controlnet_calls) == 2 * STEPS  # two batches of two prompts, every step
    assert all(k.get(RESIDUALS[name]) is not None for _, k in denoiser_calls)
    if "flux" not in name:
        for batch, (_, kwargs) in enumerate(controlnet_calls[::STEPS]):
            cond = kwargs["controlnet_cond"]  # [uncond; cond] halves of classifier-free guidance
            assert torch.allclose(cond[-2:], images[2 * batch: 2 * batch + 2], atol=1e-6)


def test_batch_call_arguments_split_one_image_per_prompt():
    pipe = build_tiny_controlnet_pipeline("tiny-random-sd-controlnet")
    images = conditioning_images(5, seed=1)
    as_list = [images[i] for i in range(5)]
    assert torch.equal(batch_call_arguments(pipe, {"image": images}, 2, 2, 5)["image"], images[2:4])
    assert batch_call_arguments(pipe, {"image": as_list}, 4, 2, 5)["image"] == as_list[4:6]
    single = images[:1]
    assert batch_call_arguments(pipe, {"image": single, "guidance_scale": 3.0}, 2, 2, 5) == {
        "image": single, "guidance_scale": 3.0}  # one image goes to every batch
    assert torch.equal(batch_call_arguments(pipe, {"image": images}, 0, 2, 4)["image"], images[:2])  # max_prompts
    with pytest.raises(DMQuantError, match="3 images for 5 prompts"):
        batch_call_arguments(pipe, {"image": images[:3]}, 0, 2, 5)


def test_controlnet_errors():
    plain = build_tiny_pipeline("tiny-random-sd")
    with pytest.raises(DMQuantError, match="has no ControlNet"):
        dmquant.quantize(plain, "w8a8-static", CALIBRATION, controlnet=True, progress=False)
    pipe = build_tiny_controlnet_pipeline("tiny-random-sd-controlnet")
    with pytest.raises(DMQuantError, match="instead of calibration_data"):
        dmquant.quantize(pipe, "w8a8-static", calibration_data=[((), {})], controlnet=True, progress=False)
    with pytest.raises(DMQuantError, match="only a denoiser can use"):
        dmquant.quantize(pipe, "w8a8-static", CALIBRATION, controlnet="w4a8-ptqd", progress=False)
    assert not quant_layers(pipe.unet) and not quant_layers(pipe.controlnet)  # refused before any change


def test_tiny_controlnet_pipelines_are_deterministic():
    a = build_tiny_controlnet_pipeline("tiny-random-flux-controlnet", seed=3)
    b = build_tiny_controlnet_pipeline("tiny-random-flux-controlnet", seed=3)
    c = build_tiny_controlnet_pipeline("tiny-random-flux-controlnet", seed=4)
    for key, value in a.controlnet.state_dict().items():
        assert torch.equal(value, b.controlnet.state_dict()[key]), key
    assert not torch.equal(a.controlnet.controlnet_blocks[0].weight, c.controlnet.controlnet_blocks[0].weight)
    assert a.controlnet.controlnet_blocks[0].weight.abs().sum() > 0  # the zero-initialised outputs are random


def test_learned_time_tables_of_the_controlnet_follow_a_new_schedule():
    pipe = build_tiny_controlnet_pipeline("tiny-random-sd-controlnet")
    recipe = {"weights": {"bits": 8}, "activations": {"bits": 8}, "attention": None,
              "time": {"mode": "learned", "iterations": 20}, "calibration": {"sampler": "all"}}
    dmquant.quantize(pipe, recipe, CALIBRATION[:2], image=conditioning_images(1, seed=7), num_inference_steps=3,
                     progress=False, controlnet=True, **SIZE)
    assert len(time_table(pipe.controlnet).keys) == len(time_table(pipe.unet).keys) == 3
    learned = [q for m in (pipe.unet, pipe.controlnet) for q in activation_quantizers(m) if q.learned]
    assert dmquant.precompute_time_tables(pipe, 7) == len(learned)
    assert len(time_table(pipe.controlnet).keys) == len(time_table(pipe.unet).keys) == 7
    assert torch.equal(time_table(pipe.controlnet).keys, time_table(pipe.unet).keys)  # SD passes both the same t


def test_without_controlnet_argument_only_the_denoiser_is_quantized(tmp_path):
    pipe = build_tiny_controlnet_pipeline("tiny-random-flux-controlnet")
    dmquant.quantize(pipe, "w8a8-static", CALIBRATION[:2], control_image=conditioning_images(2, seed=7), num_inference_steps=2,
                     progress=False, calib_dir=tmp_path, **SIZE)
    assert quant_layers(pipe.transformer) and not quant_layers(pipe.controlnet)
    assert not hasattr(pipe.controlnet, "dmquant") and not (tmp_path / "controlnet").exists()
    calls = list(CalibrationSet(tmp_path).iter_calls())
    assert len(calls) == 2 and all(len(k["controlnet_block_samples"]) == 1 for _, k in calls)  # residuals recorded
    pipe.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q" / "controlnet" / "dmquant_config.json").exists()
    assert (tmp_path / "q" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()  # saved as diffusers does
