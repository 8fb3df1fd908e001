"""Automatic mixed precision on a tiny random SD pipeline: the budget is met, the plan is a recipe that
reruns to the same layers, a mixed model saves and loads bit for bit, stored bytes are the budgeted ones."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dmquant
import dmquant.models.adapters
from dmquant.calibration.mixed import (
    Candidate,
    LayerSensitivity,
    budget_bytes,
    call_weights,
    candidate_base,
    candidate_layers,
    candidates,
    draw_plan,
    fake_quantized_weight,
    fits,
    measure_sensitivity,
    plan_config,
    plan_markdown,
    storage_bytes,
)
from dmquant.calibration.proxy import record_input_moments, weight_proxy
from dmquant.config import QuantConfig, WeightQuantConfig, load_recipe
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.models.tiny import build_tiny_sd_pipeline
from dmquant.nn.wrap import quant_layers

KW = {"height": 16, "width": 16}
PROMPTS = ["a red circle", "a blue square", "green triangle"]
RECIPE = {"name": "auto-test", "weights": {"bits": 4},
          "activations": {"bits": 8, "method": "minmax"}, "split": {},
          "calibration": {"num_timesteps": 2, "num_inference_steps": 4, "batch_size": 4},
          "mixed_precision": {"candidate_bits": [2, 4, 8], "num_samples": 2}}


def images(pipe):
    config = GenerationConfig(4, None, 0, batch_size=2, progress=False)
    return generate(pipe, ["a white disk", "a red square"], config, distributed=False, **KW)


@pytest.fixture(scope="module")
def planned():
    pipe = build_tiny_sd_pipeline()
    dmquant.quantize(pipe, RECIPE, prompts=PROMPTS, target_bits=4.5, progress=False, **KW)
    return pipe


def test_the_plan_meets_the_budget_and_mixes_bit_widths(planned):
    report = planned.dmquant.calibration["mixed_precision"]
    assert report["plan_bytes"] <= report["budget_bytes"]
    assert report["average_bits"] == pytest.approx(4.5, rel=0.02)  # the budget, within 2%
    assert len(report["histogram"]) >= 2 and set(report["bits"].values()) <= {2, 4, 8}
    layers = dict(quant_layers(planned.unet))
    assert set(report["bits"]) == set(layers)
    for name, layer in layers.items():  # the wrapped layers carry the plan's bits (both parts of a split)
        assert {q.bits for q in layer.weight_quantizers} == {report["bits"][name]}
    # the whole plan is predicted better than uniform W4 (which takes less) and worse than uniform W8
    sqnr = {u["bits"]: u["predicted_sqnr_db"] for u in report["uniform"]}
    assert sqnr[4] < report["predicted_sqnr_db"] < sqnr[8]
    assert planned.dmquant.config.mixed_precision is None and planned.dmquant.config.tag == "WmixedA8"


def test_stored_bytes_are_the_budgeted_bytes(planned):
    report = planned.dmquant.calibration["mixed_precision"]
    total = 0
    for name, layer in quant_layers(planned.unet):
        frozen = layer.frozen_copy()
        weight = planned.unet.get_submodule(name).weight
        c = dataclasses.replace(planned.dmquant.config.weights, bits=report["bits"][name])
        assert frozen.weight_nbytes() == storage_bytes(tuple(weight.shape), c, layer.split)
        total += frozen.weight_nbytes()
    assert total == report["plan_bytes"]


def test_the_plan_is_a_recipe_that_reruns_to_the_same_layers(planned):
    recipe = QuantConfig.from_dict(planned.dmquant.config.to_dict())
    assert recipe == planned.dmquant.config and recipe.mixed_precision is None
    pipe = build_tiny_sd_pipeline()
    dmquant.quantize(pipe, recipe, prompts=PROMPTS, progress=False, **KW)
    bits = planned.dmquant.calibration["mixed_precision"]["bits"]
    assert {n: layer.weight_quantizers[0].bits for n, layer in quant_layers(pipe.unet)} == bits
    assert "mixed_precision" not in pipe.dmquant.calibration


def test_a_mixed_model_saves_and_loads_bit_for_bit(planned, tmp_path):
    planned.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    packings = {q.packing for _, layer in quant_layers(loaded.unet) for q in layer.qweights}
    assert {"bitpack", "int4x2"} <= packings
    frozen = build_tiny_sd_pipeline()
    dmquant.quantize(frozen, planned.dmquant.config, prompts=PROMPTS, progress=False, **KW)
    dmquant.freeze(frozen)
    assert np.array_equal(images(loaded), images(frozen))
    for (name, a), (_, b) in zip(quant_layers(loaded.unet), quant_layers(frozen.unet)):
        for qa, qb in zip(a.qweights, b.qweights):
            assert qa.bits == qb.bits and torch.equal(qa.qdata, qb.qdata), name
    # a folder written before weight specs named their scale dtype loads as float32, unchanged
    path = tmp_path / "q" / "unet" / "dmquant_config.json"
    description = json.loads(path.read_text())
    for spec in description["layers"].values():
        for w in spec["weights"]:
            assert w.pop("scale_dtype") == "float32"
    path.write_text(json.dumps(description))
    older = dmquant.load_quantized_pipeline(tmp_path / "q")
    assert {q.scale.dtype for _, layer in quant_layers(older.unet) for q in layer.qweights} == {torch.float32}
    assert np.array_equal(images(older), images(loaded))


def test_plan_report_draws_and_summarises(planned):
    report = planned.dmquant.calibration["mixed_precision"]
    image = draw_plan(report)
    assert image.size == (900, 340) and len(image.getcolors(maxcolors=10**6)) > 3
    text = "\n".join(plan_markdown(report))
    assert "## Mixed precision" in text and "mixed_precision.png" in text and text.count("| `") == len(report["bits"])


@pytest.mark.parametrize("budget, message", [
    (dict(target_bits=2.0), "below the smallest plan"),
    (dict(max_weight_bytes=1000), "max_weight_bytes=1000 is below the smallest plan"),
])
def test_budgets_below_the_smallest_plan_fail_before_measuring(budget, message):
    pipe = build_tiny_sd_pipeline()
    with pytest.raises(DMQuantError, match=message):
        dmquant.quantize(pipe, RECIPE, prompts=PROMPTS, progress=False, **budget, **KW)


def test_a_budget_needs_a_mixed_precision_recipe():
    with pytest.raises(DMQuantError, match="use the recipe 'auto'"):
        dmquant.quantize(build_tiny_sd_pipeline(), "w8a8", prompts=PROMPTS, target_bits=4.5, progress=False, **KW)


# -- group candidates: (bits, one scale per group of input weights) beside (bits, per channel) --------------
GROUPED = {**RECIPE, "name": "auto-groups",
           "mixed_precision": {"candidate_bits": [2, 4, 8], "group_sizes": [16, 64], "group_bits": [2, 3],
                               "num_samples": 2, "scale_dtype": "float16"}}


def test_group_candidates_fit_only_where_the_groups_divide_each_part():
    mp = QuantConfig.from_dict(GROUPED).mixed_precision
    base = QuantConfig.from_dict(GROUPED).weights
    labels = [c.label for c in candidates(mp, base)]
    assert labels == ["2", "4", "8", "2g16", "3g16", "2g64", "3g64"]
    assert fits(Candidate(3, 64), (32, 128), None, base) and not fits(Candidate(3, 64), (32, 96), None, base)
    assert fits(Candidate(3, 16), (32, 96, 3, 3), 64, base)  # rows of 64·9 and 32·9 weights
    assert not fits(Candidate(3, 64), (32, 96, 1, 1), 64, base)  # the 32-channel part: no whole group
    assert not fits(Candidate(3, 64), (32, 64), None, base)  # one group per row: the per-channel format
    group_base = dataclasses.replace(base, granularity="group", group_size=16)
    assert [c.label for c in candidates(mp, group_base)] == ["2", "4", "8", "2g64", "3g64"]
    assert Candidate(4).override(base) is None and Candidate(3).override(base) == {"bits": 3}
    assert Candidate(3, 64).override(base) == {"bits": 3, "granularity": "group", "group_size": 64}
    # zero points: every format of an asymmetric bit-width also with one zero point per scale
    asym = dataclasses.replace(mp, asymmetric_bits=(2,))
    assert [c.label for c in candidates(asym, base)] == labels + ["2a", "2ag16", "2ag64"]
    assert Candidate(2, 64, True).override(base) == {"bits": 2, "granularity": "group", "group_size": 64,
                                                     "symmetric": False}
    assert Candidate(2, None, True).override(base) == {"bits": 2, "symmetric": False}
    half = dataclasses.replace(base, scale_dtype="float16")  # (32, 128): 1024 bytes of 2-bit codes, 64 groups
    assert storage_bytes((32, 128), Candidate(2, 64).weights(half), None) == 1024 + 64 * 2
    assert storage_bytes((32, 128), Candidate(2, 64, True).weights(half), None) == 1024 + 64 * (2 + 2)
    assert not candidates(asym, dataclasses.replace(base, symmetric=False))[-1].asymmetric  # already asymmetric


@pytest.fixture(scope="module")
def grouped():
    pipe = build_tiny_sd_pipeline()
    dmquant.quantize(pipe, GROUPED, prompts=PROMPTS, target_bits=3.5, progress=False, **KW)
    return pipe


def test_a_plan_with_group_candidates_meets_the_budget_in_stored_bytes(grouped):
    report = grouped.dmquant.calibration["mixed_precision"]
    assert report["plan_bytes"] <= report["budget_bytes"]
    assert report["average_bits"] == pytest.approx(3.5, rel=0.02)  # group scales included
    layers = dict(quant_layers(grouped.unet))
    total = 0
    for name, layer in layers.items():
        options = report["sensitivity"][name]
        weight = grouped.unet.get_submodule(name).weight
        rows = [weight[0].numel()] if layer.split is None else [
            layer.split * math.prod(weight.shape[2:]), (weight.shape[1] - layer.split) * math.prod(weight.shape[2:])]
        assert ("3g64" in options) == all(r % 64 == 0 and r > 64 for r in rows), name
        assert "3g16" in options  # every row of the tiny UNet holds a multiple of 16 weights (and more)
        f = report["formats"][name]
        c = grouped.dmquant.config.layer_sections(name)[0]
        assert [(q.bits, q.granularity, q.group_size) for q in layer.weight_quantizers] == \
            [(c.bits, c.granularity, c.group_size)] * len(layer.weight_quantizers)
        assert (c.granularity == "group") == ("g" in f) and str(c.bits) == f.partition("g")[0]
        frozen = layer.frozen_copy()
        assert frozen.weight_nbytes() == options[f][0] == storage_bytes(tuple(weight.shape), c, layer.split)
        total += frozen.weight_nbytes()
    assert total == report["plan_bytes"]
    assert any("g" in f for f in report["formats"].values())  # at 3.5 bits the groups of 16 are worth taking
    assert grouped.dmquant.config.weights.scale_dtype == "float16"  # the plan stores what it was costed with
    assert {q.scale_dtype for _, layer in layers.items() for q in layer.weight_quantizers} == {"float16"}
    assert {u["format"] for u in report["uniform"]} >= {"2", "4", "8", "2g16", "3g16"}


def test_float16_candidates_cost_two_byte_scales_and_the_default_budget_is_the_recipes_own_bytes():
    config = QuantConfig.from_dict(GROUPED)
    pipe = build_tiny_sd_pipeline()
    layers = candidate_layers(pipe.unet, config, dmquant.models.adapters.adapter_for(pipe.unet))
    shapes = {la.name: tuple(pipe.unet.get_submodule(la.name).weight.shape) for la in layers}
    base = candidate_base(config)
    assert base.scale_dtype == "float16" and config.weights.scale_dtype == "float32"
    # no target: the budget is uniform W4 with the recipe's float32 scales, one per output channel and part
    budget = budget_bytes(dataclasses.replace(config.mixed_precision, target_bits=None), config, layers, 0, shapes)
    assert budget == sum(storage_bytes(shapes[la.name], config.weights, la.split) for la in layers)
    for la in layers:
        parts = 1 if la.split is None else 2
        out = shapes[la.name][0]
        w4_16, w4_32 = (storage_bytes(shapes[la.name], c, la.split) for c in (base, config.weights))
        assert w4_32 - w4_16 == 2 * out * parts, la.name
        if "3g16" in la.formats:  # one float16 scale per 16 weights: 3 + 1 bits a weight
            cost = storage_bytes(shapes[la.name], Candidate(3, 16).weights(base), la.split)
            assert 8 * cost == 4 * math.prod(shapes[la.name]), la.name
    assert sum(storage_bytes(shapes[la.name], base, la.split) for la in layers) < budget


def test_a_model_of_per_channel_and_grouped_layers_saves_and_loads_bit_for_bit(tmp_path):
    base = QuantConfig.from_dict({**{k: v for k, v in GROUPED.items() if k != "mixed_precision"},
                                  "weights": {"bits": 4, "scale_dtype": "float16"}})
    pipe = build_tiny_sd_pipeline()
    adapter = dmquant.models.adapters.adapter_for(pipe.unet)
    mp = dataclasses.replace(QuantConfig.from_dict(GROUPED).mixed_precision, asymmetric_bits=(3,))
    layers = candidate_layers(pipe.unet, dataclasses.replace(base, mixed_precision=mp), adapter)
    cycle = [Candidate(3, 64), Candidate(3, 16), Candidate(4), Candidate(2, 16), Candidate(8), Candidate(3, 16, True)]
    formats = {}
    for i, layer in enumerate(layers):
        formats[layer.name] = next(c for c in cycle[i % 6:] + cycle if c.label in layer.formats)
    shapes = {layer.name: tuple(pipe.unet.get_submodule(layer.name).weight.shape) for layer in layers}
    recipe = plan_config(base, formats)
    assert {c.group_size for c in formats.values()} == {None, 16, 64} and any(c.asymmetric for c in formats.values())
    dmquant.quantize(pipe, recipe, prompts=PROMPTS, progress=False, **KW)
    dmquant.freeze(pipe)
    pipe.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    seen = set()
    for (name, a), (_, b) in zip(quant_layers(loaded.unet), quant_layers(pipe.unet)):
        c = formats[name].weights(base.weights)
        assert a.weight_nbytes() == storage_bytes(shapes[name], c, b.split), name
        for qa, qb in zip(a.qweights, b.qweights):
            assert (qa.bits, qa.granularity, qa.group_size, qa.symmetric) == (c.bits, c.granularity, c.group_size,
                                                                              c.symmetric), name
            assert torch.equal(qa.qdata, qb.qdata) and torch.equal(qa.scale, qb.scale), name
            assert qa.scale.dtype == torch.float16, name
            seen.add((qa.granularity, qa.packing))
    assert {("group", "bitpack"), ("channel", "int4x2"), ("channel", "int8")} <= seen
    assert np.array_equal(images(loaded), images(pipe))


# -- the weighting of the calls in a layer's sensitivity ------------------------------------------------------
def test_call_weights_of_each_weighting():
    powers, t = [1.0, 3.0], [999.0, 249.75]
    assert call_weights("uniform", powers, t) == [0.25, 0.25]
    assert call_weights("relative", powers, t) == [0.5, pytest.approx(1 / 6)]
    early, late = call_weights("early", powers, t), call_weights("late", powers, t)
    assert early == pytest.approx([2 / (1.25 * 4), 0.5 / (1.25 * 4)])  # t / t_max = 1, 0.25; averaging 1
    assert late == pytest.approx([0.0, 2 / 4])  # 1 - t / t_max = 0, 0.75
    for w in (early, late):
        assert sum(w) == pytest.approx(2 / sum(powers))  # as uniform's in total


@pytest.mark.parametrize("weighting", ["uniform", "relative", "late"])
def test_sensitivity_is_the_weighted_sum_of_each_calls_output_error(weighting):
    torch.manual_seed(0)
    denoiser = torch.nn.Sequential(torch.nn.Linear(16, 8))
    calls = [((torch.randn(5, 16),), {}), ((3 * torch.randn(5, 16),), {})]
    config = QuantConfig.from_dict({**RECIPE, "mixed_precision": {"candidate_bits": [2, 4], "weighting": weighting}})
    layer = LayerSensitivity("0", 128, None, formats={"2": Candidate(2), "4": Candidate(4)})
    powers = measure_sensitivity(denoiser, [layer], config, calls, progress=False, timesteps=[800.0, 200.0])
    w = denoiser[0].weight.data
    for label, bits in (("2", 2), ("4", 4)):
        q = fake_quantized_weight(w, dataclasses.replace(config.weights, bits=bits), None)
        with torch.no_grad():
            errs = [float((F.linear(x, q, denoiser[0].bias) - denoiser(x)).pow(2).mean()) for (x,), _ in calls]
        assert layer.call_errors[label] == pytest.approx(errs, rel=1e-6)
        weights = call_weights(weighting, powers, [800.0, 200.0])
        assert layer.options[label] == (storage_bytes((8, 16), dataclasses.replace(config.weights, bits=bits), None),
                                        pytest.approx(sum(a * b for a, b in zip(weights, errs)), rel=1e-6))
    assert layer.options["2"][1] > layer.options["4"][1] > 0
    assert torch.equal(denoiser[0].weight.data, w)  # the layer's weight is put back


class _TwoInputs(torch.nn.Module):
    """A denoiser whose output is ``a(sample) + b(condition)``: with CFG-paired calls (equal halves of ``sample``,
    different conditions) ``a``'s error is the same in both halves, ``b``'s differs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

    def forward(self, sample, condition):
        return self.a(sample) + self.b(condition)


def test_guided_sensitivity_adds_the_amplified_difference_of_the_cfg_halves():
    torch.manual_seed(0)
    denoiser = _TwoInputs()
    x = torch.randn(3, 16)
    calls = [((torch.cat([x, x]), torch.randn(6, 16)), {})]  # CFG-paired: the latents' halves are equal
    errors = {}
    for guided in (False, True):
        config = QuantConfig.from_dict({**RECIPE, "mixed_precision": {"candidate_bits": [2], "guided": guided}})
        layers = [LayerSensitivity(n, 128, None, formats={"2": Candidate(2)}) for n in ("a", "b")]
        measure_sensitivity(denoiser, layers, config, calls, progress=False, guidance_scale=7.5)
        errors[guided] = {la.name: la.call_errors["2"][0] for la in layers}
    assert errors[True]["a"] == pytest.approx(errors[False]["a"], rel=1e-6)  # equal halves: nothing to amplify
    q = fake_quantized_weight(denoiser.b.weight.data, dataclasses.replace(QuantConfig.from_dict(RECIPE).weights,
                                                                           bits=2), None)
    with torch.no_grad():
        e = F.linear(calls[0][0][1], q, denoiser.b.bias) - denoiser.b(calls[0][0][1])
    assert errors[False]["b"] == pytest.approx(float(e.pow(2).mean()), rel=1e-5)
    assert errors[True]["b"] == pytest.approx(float(e.pow(2).mean() + 7.5 ** 2 * (e[:3] - e[3:]).pow(2).mean()),
                                              rel=1e-5)
    assert errors[True]["b"] > 10 * errors[False]["b"]


# -- anchored measurement: one format per layer measured, the others scaled by the weight-space proxy --------
def test_weight_proxy_is_the_output_mean_square_of_uncorrelated_inputs():
    torch.manual_seed(0)
    layer, conv = torch.nn.Linear(32, 16), torch.nn.Conv2d(6, 4, 3, padding=1)
    sigma = torch.linspace(0.1, 3.0, 32)
    x, y = torch.randn(20000, 32) * sigma, torch.randn(3, 6, 10, 10)
    with record_input_moments(torch.nn.ModuleDict({"l": layer, "c": conv}), ["l", "c"]) as moments:
        layer(x)
        conv(y)
        conv(2 * y)
    assert torch.allclose(moments["c"], 2.5 * y.pow(2).mean(dim=(0, 2, 3)))  # (1 + 4) / 2 calls
    w = layer.weight.data
    approx = fake_quantized_weight(w, WeightQuantConfig(bits=3), None)
    measured = float(F.linear(x, w - approx).pow(2).mean())
    assert weight_proxy(w, approx, moments["l"]) / 16 == pytest.approx(measured, rel=0.03)


def test_anchored_and_sampled_measurements_run_fewer_calls_and_scale_the_other_formats():
    torch.manual_seed(0)
    denoiser = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    calls = [((torch.randn(5, 16),), {}), ((2 * torch.randn(5, 16),), {})]
    runs = []
    denoiser.register_forward_pre_hook(lambda m, a: runs.append(1))
    formats = {"2": Candidate(2), "4": Candidate(4), "8": Candidate(8), "3g16": Candidate(3, 16)}
    found = {}
    expected_runs = {"all": 2 * (1 + 2 * 4), "anchored": 2 * (1 + 2 * 1), "sampled": 2 + 2 * (2 + 3 * 1)}
    for measure in ("all", "anchored", "sampled"):
        config = QuantConfig.from_dict({**RECIPE, "mixed_precision": {"candidate_bits": [2, 4, 8], "measure": measure,
                                                                      "sampled_calls": 1}})
        layers = [LayerSensitivity(n, 0, None, formats=dict(formats)) for n in ("0", "2")]
        runs.clear()
        measure_sensitivity(denoiser, layers, config, calls, progress=False)
        assert len(runs) == expected_runs[measure]  # the reference calls, then the layers' formats
        found[measure] = layers
    exact, anchored = found["all"], found["anchored"]
    for e, s in zip(exact, found["sampled"]):  # sampled on the first call: the anchor's errors times that ratio
        assert s.call_errors["4"] == e.call_errors["4"]
        for label in ("2", "8", "3g16"):
            ratio = e.call_errors[label][0] / e.call_errors["4"][0]
            assert s.call_errors[label] == pytest.approx([x * ratio for x in e.call_errors["4"]], rel=1e-9)
    for e, a in zip(exact, anchored):
        assert a.call_errors["4"] == e.call_errors["4"]  # the anchor: the recipe's own format, measured
        w = denoiser.get_submodule(e.name).weight.data
        for label in ("2", "8", "3g16"):
            ratio = a.options[label][1] / a.options["4"][1]
            assert a.options[label][0] == e.options[label][0]  # the same bytes
            assert ratio == pytest.approx(a.call_errors[label][0] / a.call_errors["4"][0])
        assert a.options["2"][1] > a.options["4"][1] > a.options["8"][1]
        # the proxy ranks the layer's formats as the measurement does
        assert sorted(formats, key=lambda f: a.options[f][1]) == sorted(formats, key=lambda f: e.options[f][1])
        assert torch.equal(denoiser.get_submodule(e.name).weight.data, w)


def test_a_plan_keeps_the_recipes_own_layer_patterns():
    """The shipped w4a8 keeps convolution inputs unquantized (``conv:*: weight_only``): a planned convolution
    keeps that with its new weight format, and layers left in the recipe's format still match the pattern."""
    base = load_recipe("w4a8")
    recipe = plan_config(base, {"down.conv": Candidate(3), "down.proj": Candidate(8), "up.conv": Candidate(4)},
                         {"down.conv": "conv", "down.proj": "linear", "up.conv": "conv"})
    assert list(recipe.layers) == ["down.conv", "down.proj", "conv:*"]
    assert recipe.layers["down.conv"].weight_only and recipe.layers["down.conv"].weights == {"bits": 3}
    assert not recipe.layers["down.proj"].weight_only and recipe.layers["down.proj"].weights == {"bits": 8}
    assert recipe.layer_sections("down.conv", "conv")[1] is None  # weight-only: no input quantizer
    assert recipe.layer_sections("up.conv", "conv") == (recipe.weights, None)
    assert recipe.layer_sections("down.proj", "linear")[1] == base.activations
