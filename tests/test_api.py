"""The acceptance of the core engine: quantized tiny random-weight SD and DiT denoisers against FP."""

import copy
import types

import pytest
import torch

import dmquant
from dmquant.calibration.collect import collect_denoiser_inputs
from dmquant.calibration.records import CalibrationSet
from dmquant.errors import DMQuantError
from dmquant.models.adapters import find_denoiser
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_sd_pipeline
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.quantizers.affine import sqnr_db

SD_KW = {"height": 16, "width": 16}
CASES = {
    "sd": (build_tiny_sd_pipeline, ["a red circle", "a blue square", "green triangle", "white disk"],
           ["a yellow star", "small green circle"], SD_KW),
    "dit": (build_tiny_dit_pipeline, [1, 2, 3, 4], [7, 8], {}),
}


def held_out_calls(pipe, prompts, call_kwargs, tmp_path):
    """Denoiser inputs of the FP pipeline on prompts not used for calibration, at two steps."""
    _, denoiser, _ = find_denoiser(pipe)
    collect_denoiser_inputs(pipe, denoiser, prompts, [3, 6], tmp_path, 10, progress=False, call_kwargs=call_kwargs)
    return list(CalibrationSet(tmp_path).iter_calls())


def sqnr_after_quantize(kind, recipe, tmp_path):
    build, calib, held_out, kw = CASES[kind]
    pipe = build()
    _, denoiser, _ = find_denoiser(pipe)
    calls = held_out_calls(pipe, held_out, kw, tmp_path)
    with torch.no_grad():
        refs = [denoiser(*a, **k)[0] for a, k in calls]
    dmquant.quantize(pipe, recipe, prompts=calib, num_inference_steps=10, num_timesteps=5, progress=False, **kw)
    with torch.no_grad():
        outs = [denoiser(*a, **k)[0] for a, k in calls]
    return pipe, min(sqnr_db(r, o) for r, o in zip(refs, outs))


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_w8a8_sqnr_at_least_30db(kind, tmp_path):
    pipe, sqnr = sqnr_after_quantize(kind, "w8a8-static", tmp_path)
    assert sqnr >= 30.0
    _, denoiser, _ = find_denoiser(pipe)
    layers = [m for m in denoiser.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    assert layers and all(len(m.input_quantizers) == 1 and m.input_quantizers[0].mode == "quant" for m in layers)
    assert pipe.dmquant.report.attention  # the attention matmuls are quantized too


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_default_w8a8_is_per_token_on_linear_inputs_and_weight_only_on_convolutions(kind, tmp_path):
    pipe, sqnr = sqnr_after_quantize(kind, "w8a8", tmp_path)
    static_pipe, static_sqnr = sqnr_after_quantize(kind, "w8a8-static", tmp_path)
    assert sqnr >= static_sqnr + 3.0, (sqnr, static_sqnr)
    _, denoiser, _ = find_denoiser(pipe)
    linears = [m for m in denoiser.modules() if isinstance(m, QuantLinear)]
    convs = [m for m in denoiser.modules() if isinstance(m, QuantConv2d)]
    assert linears and all(m.input_quantizers[0].granularity == "token" and not m.input_quantizers[0].symmetric
                           for m in linears)
    assert (convs or kind == "dit") and all(not m.input_quantizers and m.weight_quantizers[0].bits == 8 for m in convs)
    assert not pipe.dmquant.report.attention


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_w4a16_sqnr_at_least_20db(kind, tmp_path):
    _, sqnr = sqnr_after_quantize(kind, "w4a16", tmp_path)
    assert sqnr >= 20.0


def test_w4a8_is_worse_than_w8a8_but_usable(tmp_path):
    _, s8 = sqnr_after_quantize("sd", "w8a8-static", tmp_path / "a")
    _, s4 = sqnr_after_quantize("sd", "w4a8-rtn", tmp_path / "b")  # w4a8 adds reconstruction (slower)
    assert 15.0 < s4 < s8


def test_default_excludes_keep_first_last_and_time_embedding():
    pipe = build_tiny_sd_pipeline()
    dmquant.quantize(pipe, "w4a16")
    excluded = set(pipe.dmquant.report.excluded)
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} == excluded
    dit = build_tiny_dit_pipeline()
    dmquant.quantize(dit, "w4a16")
    assert "pos_embed.proj" in dit.dmquant.report.excluded and "proj_out_2" in dit.dmquant.report.excluded
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1" in dit.dmquant.report.excluded


def test_include_exclude_patterns_override():
    pipe = build_tiny_sd_pipeline()
    recipe = {"weights": {"bits": 8}, "activations": None, "include": ["*attn*"], "exclude": ["*to_out*"]}
    dmquant.quantize(pipe, recipe)
    names = pipe.dmquant.report.quantized
    assert names and all("attn" in n and "to_out" not in n for n in names)


def test_w4a16_needs_no_prompts_and_weights_are_on_the_4bit_grid():
    pipe = build_tiny_sd_pipeline()
    dmquant.quantize(pipe, "w4a16")
    layer = pipe.unet.down_blocks[0].resnets[0].conv1
    w = layer.effective_weight(torch.float32)
    rows = w.reshape(-1, 32) / layer.weight_quantizers[0].scale[:, None]
    assert torch.allclose(rows, rows.round(), atol=1e-4) and rows.abs().max() <= 7


def test_max_prompts_cuts_the_calibration_prompts_with_a_warning():
    pipe = build_tiny_sd_pipeline()
    with pytest.warns(UserWarning, match="first 2 of 4 prompts"):
        dmquant.quantize(pipe, "w8a8-static", prompts=CASES["sd"][1], max_prompts=2, num_inference_steps=2, num_timesteps=1,
                         progress=False, **SD_KW)
    assert pipe.dmquant.calibration["prompts"] == 2 and pipe.dmquant.config.calibration.max_prompts == 2


def test_bad_inputs():
    with pytest.raises(DMQuantError, match="no calibration prompts"):
        dmquant.quantize(build_tiny_sd_pipeline(), "w8a8-static", prompts=[])
    with pytest.raises(DMQuantError, match="integer class ids"):
        dmquant.quantize(build_tiny_dit_pipeline(), "w8a8-static", prompts=["a cat"])
    with pytest.raises(DMQuantError, match="no 'unet' or 'transformer'"):
        dmquant.quantize(types.SimpleNamespace(vae=torch.nn.Linear(2, 2)), "w4a16")
    with pytest.raises(DMQuantError, match="group_size=48 does not divide the input dimension"):
        dmquant.quantize(build_tiny_sd_pipeline(), {"weights": {"bits": 4, "granularity": "group", "group_size": 48},
                                                    "activations": None})
    pipe = build_tiny_sd_pipeline()
    dmquant.quantize(pipe, "w4a16")
    with pytest.raises(DMQuantError, match="quantized already"):
        dmquant.quantize(pipe, "w4a16")


@pytest.mark.filterwarnings("ignore:dmquant has no adapter")
def test_w8a8_smooth_beats_w8a8_where_inputs_have_outlier_channels():
    """Per-token inputs keep one range per token, so channels 30x the others cost every token precision;
    ``w8a8-smooth``'s calibrated factors move them into the weights (frozen: the same numbers)."""
    g = torch.Generator().manual_seed(0)

    def inputs(n):
        x = torch.randn(n, 16, 64, generator=g)
        x[..., [3, 17, 40]] *= 30
        return x

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    with torch.no_grad():  # weights from the test's own generator: the same model whatever ran before
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 8)
    calib, test = [((inputs(4),), {}) for _ in range(4)], inputs(8)
    with torch.no_grad():
        ref = model(test)
    sqnr = {}
    for recipe in ("w8a8", "w8a8-smooth"):
        quantized = dmquant.quantize(copy.deepcopy(model), recipe, calibration_data=calib, progress=False)
        with torch.no_grad():
            simulated = quantized(test)
            dmquant.freeze(quantized)
            frozen = quantized(test)
        assert sqnr_db(simulated, frozen) > 60.0  # integer GEMMs: a near-tie code may round the other way
        sqnr[recipe] = sqnr_db(ref, frozen)
    assert sqnr["w8a8-smooth"] >= sqnr["w8a8"] + 3.0, sqnr
