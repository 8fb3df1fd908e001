"""Automatic mixed precision on a tiny random SD pipeline: the budget is met, the plan is a recipe that
reruns to the same layers, a mixed model saves and loads bit for bit, stored bytes are the budgeted ones."""

import dataclasses

import numpy as np
import pytest
import torch

import dmquant
from dmquant.calibration.mixed import draw_plan, plan_markdown, storage_bytes
from dmquant.config import QuantConfig
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
