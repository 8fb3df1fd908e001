"""Recipes with smoothing, rotation, the low-rank branch and noise correction, end to end (issue 5)."""

import numpy as np
import pytest
import torch

import dmquant
from dmquant.config import QuantConfig, load_recipe
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_sd_pipeline
from dmquant.nn.wrap import full_precision, quant_layers

KW = {"height": 16, "width": 16}
CALIB = ["a red circle", "a blue square", "green triangle", "white disk"]
W4A4 = {"weights": {"bits": 4, "granularity": "group", "group_size": 16},
        "activations": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 16},
        "calibration": {"num_inference_steps": 6, "num_timesteps": 3}}


def make_images(pipe, prompts, steps, seed, **kw):
    config = GenerationConfig(steps, None, seed, batch_size=len(prompts), progress=False)
    return generate(pipe, prompts, config, distributed=False, **kw)


def images(pipe, steps=6):
    return make_images(pipe, ["a white disk"], steps, 0, **KW).astype(np.float64)


def quantized(recipe, build=build_tiny_sd_pipeline, **extra):
    pipe = build()
    dmquant.quantize(pipe, {**W4A4, **recipe}, prompts=CALIB, progress=False, **KW, **extra)
    return pipe


def test_full_precision_mode_of_a_branched_denoiser_is_the_original_model():
    reference = build_tiny_sd_pipeline()
    pipe = quantized({"smoothing": {"alpha": 0.5}, "rotation": {"seed": 1}, "low_rank": {"rank": 4}, "split": {}})
    report = pipe.dmquant.outliers
    assert report["layers"] == len(quant_layers(pipe.unet)) == report["smoothed"] == report["low_rank"]
    assert 0 < report["rotated"] < report["layers"]  # layers reading split skip concatenations are not rotated
    sample, t = torch.randn(1, 4, 2, 2), torch.tensor(500)
    text = torch.randn(1, reference.text_encoder.config.max_position_embeddings,
                       reference.unet.config.cross_attention_dim)
    with torch.no_grad(), full_precision(pipe.unet):
        out = pipe.unet(sample, t, encoder_hidden_states=text)[0]
    ref = reference.unet(sample, t, encoder_hidden_states=text)[0]
    assert torch.allclose(out, ref.detach(), atol=1e-4)


def test_ranks_are_capped_on_small_layers_and_reported():
    pipe = quantized({"low_rank": {"rank": 64, "max_fraction": 0.25}})
    report = pipe.dmquant.outliers
    for _, layer in quant_layers(pipe.unet):
        w = layer.weight
        assert layer.outlier.rank == min(64, int(0.25 * min(w.shape[0], w[0].numel())))
    assert report["rank_capped"] == report["layers"]  # every layer of the tiny UNet is narrower than 256
    assert report["branch_bytes"] == sum(layer.outlier.nbytes() for _, layer in quant_layers(pipe.unet))


def test_searched_alpha_comes_from_the_grid_for_every_layer():
    grid = [0.25, 0.5, 0.75]
    pipe = quantized({"smoothing": {"alpha": None, "search_grid": grid}, "low_rank": {"rank": 2}})
    alphas = pipe.dmquant.outliers["alpha"]
    assert set(alphas) == {n for n, _ in quant_layers(pipe.unet)} and set(alphas.values()) <= set(grid)


@pytest.mark.parametrize("build", [build_tiny_sd_pipeline, build_tiny_dit_pipeline])
def test_saved_branches_reload_to_the_same_images(build, tmp_path):
    prompts = CALIB if build is build_tiny_sd_pipeline else [1, 2, 3]
    pipe = build()
    kw = KW if build is build_tiny_sd_pipeline else {}
    dmquant.quantize(pipe, {**W4A4, "smoothing": {"alpha": 0.5}, "low_rank": {"rank": 4}}, prompts=prompts,
                     progress=False, **kw)
    gen = (lambda p: make_images(p, ["a white disk"], 6, 0, **KW)) if kw else (
        lambda p: make_images(p, [5], 6, 0))
    simulated = gen(pipe)
    pipe.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    _, denoiser, _ = dmquant.models.adapters.find_denoiser(loaded)
    branched = [m for _, m in quant_layers(denoiser) if m.outlier is not None]
    assert len(branched) == pipe.dmquant.outliers["layers"] and all(m.frozen for m in branched)
    assert np.array_equal(gen(loaded), simulated)


def test_correction_recipe_fits_saves_and_reloads(tmp_path):
    pipe = quantized({"activations": None, "weights": {"bits": 3},
                      "correction": {"method": "ptqd", "num_prompts": 4}})
    stats = pipe.dmquant.correction
    assert stats.timesteps.shape == (6,) and torch.all(stats.var > 0)
    assert pipe.dmquant.calibration["correction"]["prompts"] == 4
    corrected = images(pipe)
    pipe.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    assert torch.equal(loaded.dmquant.correction.k, stats.k)
    assert np.array_equal(images(loaded), corrected)
    with pytest.raises(DMQuantError, match="same scheduler and number of steps"):
        images(loaded, steps=9)


def test_bias_correction_keeps_only_the_mean_error():
    pipe = quantized({"activations": None, "weights": {"bits": 3},
                      "correction": {"method": "bias", "num_prompts": 4}})
    stats = pipe.dmquant.correction
    assert torch.equal(stats.k, torch.zeros(6)) and torch.equal(stats.var, torch.zeros(6))
    assert torch.equal(stats.mu, stats.mean_error) and float(stats.mu.abs().sum()) > 0


def test_outlier_recipes_check_their_settings():
    with pytest.raises(DMQuantError, match="quantizes no activations"):
        QuantConfig.from_dict({"activations": None, "smoothing": {}})
    with pytest.raises(DMQuantError, match="low_rank.rank"):
        QuantConfig.from_dict({"low_rank": {"rank": -1}})
    with pytest.raises(DMQuantError, match="correction.method"):
        QuantConfig.from_dict({"correction": {"method": "magic"}})
    with pytest.raises(DMQuantError, match="smoothing alpha"):
        QuantConfig.from_dict({"smoothing": {"alpha": 1.5}})
    with pytest.raises(DMQuantError, match="activations.group_size"):
        QuantConfig.from_dict({"activations": {"granularity": "group"}})
    with pytest.raises(DMQuantError, match="group_size=24 does not divide"):
        quantized({"activations": {"bits": 4, "granularity": "group", "group_size": 24}})
    with pytest.raises(DMQuantError, match="pass prompts instead of calibration_data"):
        dmquant.quantize(build_tiny_sd_pipeline(), {"correction": {}}, calibration_data=[], progress=False)


def test_shipped_outlier_recipes_load():
    svd = load_recipe("w4a4-svd")
    assert svd.smoothing is not None and svd.low_rank.rank == 32 and svd.tag == "W4A4"
    assert load_recipe("w4a8-ptqd").correction.method == "ptqd"
    assert load_recipe("w4a4").tag == "W4A4"
    g64 = load_recipe("w4a4-g64")
    assert g64.weights.group_size == g64.activations.group_size == 64  # the fused kernel's layout
