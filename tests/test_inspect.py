"""``dmquant inspect`` (issue 18): per-layer SQNR, ranges, causes, the written folder and the command's errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dmquant.cli import main
from dmquant.diagnostics.job import eval_steps, inspect_quantization, split_prompts, write_inspection
from dmquant.diagnostics.measure import CallInfo, Inspector, _static_range, clipped_count, results
from dmquant.diagnostics.report import diagnose
from dmquant.models.tiny import build_tiny_pipeline, build_tiny_sd_pipeline
from dmquant.nn.layers import QuantLinear
from dmquant.nn.wrap import quant_layers
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.weight import WeightQuantizer

PROMPTS = ["a red circle", "a blue square", "green triangle", "a yellow star at the top"]
SETTINGS = dict(num_inference_steps=3, num_timesteps=2, progress=False, height=16, width=16, guidance_scale=5.0)


def _inspect(recipe):
    pipe = build_tiny_sd_pipeline()
    data = inspect_quantization(pipe, recipe, PROMPTS, base_model="tiny-random-sd", **SETTINGS)
    return pipe, data


@pytest.fixture(scope="module")
def w8():
    return _inspect("w8a8-static")


@pytest.fixture(scope="module")
def w4():
    return _inspect("w4a8-rtn")


def test_every_quantized_layer_is_measured(w8):
    pipe, data = w8
    names = [n for n, _ in quant_layers(pipe.unet)]
    assert sorted(data["layers"]) == sorted(names) and len(names) == 79
    assert len(data["attention"]) == 8
    assert data["steps"] == [0, 2] and data["branches"] == ["uncond", "cond"]
    s = data["settings"]
    assert (s["calibration_prompts"], s["eval_prompts"], s["held_out_prompts"], s["cfg"]) == (2, 2, True, "batched")
    assert s["denoiser_calls"] == 2 and s["guidance_scale"] == 5.0
    for layer in data["layers"].values():
        assert set(layer["sqnr_db"]) == {"weights", "activations", "both"}
        assert len(layer["sqnr_db_per_step"]["both"]) == 2
        assert [e["step"] for e in layer["ranges"]["per_step"]] == [0, 2]
        assert {"uncond", "cond", "all"} <= set(layer["ranges"]["per_step"][0])
        assert layer["outliers"]["channel_max_over_median"] >= 1.0
        assert layer["causes"]


def test_sqnr_numbers(w8, w4):
    _, d8 = w8
    _, d4 = w4
    for name, layer in d8["layers"].items():
        assert layer["sqnr_db"]["weights"] > 30.0, name  # int8 per-channel weights alone
        assert layer["sqnr_db"]["both"] < layer["sqnr_db"]["weights"] + 1.0
    for name in d8["layers"]:
        assert d4["layers"][name]["sqnr_db"]["weights"] < d8["layers"][name]["sqnr_db"]["weights"] - 10.0, name
    model = d8["model"]
    assert 15.0 < model["sqnr_db"] < 60.0 and len(model["per_step"]) == 2
    assert set(model["per_branch"]) == {"uncond", "cond"} and "guided_sqnr_db" in model
    assert d4["model"]["sqnr_db"] < model["sqnr_db"]
    for att in d8["attention"].values():
        assert att["sqnr_db"] > 20.0 and len(att["operands"]["q"]["absmax_per_step"]) == 2


def test_skip_concatenations_and_calibrated_ranges(w8):
    _, data = w8
    concat = {n: v["concat"] for n, v in data["layers"].items() if "concat" in v}
    assert "up_blocks.0.resnets.0.conv1" in concat and len(concat) >= 4
    for c in concat.values():
        assert len(c["parts"]) == 2 and all(p["absmax"] > 0 for p in c["parts"]) and not c["split_by_recipe"]
    cal = data["layers"]["down_blocks.0.resnets.0.conv1"]["calibrated"]
    assert 0.0 <= cal["clipped_fraction"] < 0.5 and len(cal["ranges_per_step"]) == 2


def test_weight_only_recipe_has_exact_activations():
    _, data = _inspect("w4a16")
    for layer in data["layers"].values():
        assert layer["sqnr_db"]["activations"] is None
        assert layer["sqnr_db"]["both"] == layer["sqnr_db"]["weights"]
        assert layer["causes"][0].startswith("weights")


def test_class_conditioned_dit_puts_cond_first():
    pipe = build_tiny_pipeline("tiny-random-dit")
    data = inspect_quantization(pipe, "w8a8-static", [1, 2, 3, 4], num_inference_steps=3, num_timesteps=2, progress=False)
    assert data["branches"] == ["cond", "uncond"] and data["settings"]["cfg"] == "batched"
    assert data["settings"]["guidance_scale"] == 4.0 and data["model"]["guided_sqnr_db"] is not None
    assert "concat" not in next(iter(data["layers"].values()))


def test_layer_sqnr_is_the_layer_alone():
    """On a one-layer model the numbers are those computed by hand."""
    torch.manual_seed(0)
    fp = nn.Linear(16, 8)
    layer = QuantLinear.wrap(fp, lambda: WeightQuantizer(4), lambda dim: ActQuantizer(4, channel_dim=dim))
    layer.calibrate_weight()
    x = torch.randn(4, 5, 16)
    x[:2] *= 3.0  # the first CFG half is wider
    q = layer.input_quantizers[0]
    q.set_mode("observe")
    layer(x)
    q.finalize()
    q.set_mode("quant")
    model = nn.Sequential()
    model.add_module("proj", layer)
    inspector = Inspector(model)
    inspector.run((x,), {}, CallInfo(step=0, timestep=10.0, batch=4, halves=("uncond", "cond")), guidance_scale=2.0)
    data = results(inspector)
    y = F.linear(x, fp.weight, fp.bias)

    @torch.no_grad()
    def sqnr(yq):
        return 10 * math.log10(float(y.double().square().sum() / (yq - y).double().square().sum()))

    wq = layer.weight_quantizers[0](fp.weight)
    got = data["layers"]["proj"]["sqnr_db"]
    assert got["weights"] == pytest.approx(sqnr(F.linear(x, wq, fp.bias)), abs=1e-2)
    assert got["activations"] == pytest.approx(sqnr(F.linear(q(x), fp.weight, fp.bias)), abs=1e-2)
    assert got["both"] == pytest.approx(sqnr(F.linear(q(x), wq, fp.bias)), abs=1e-2)
    assert data["model"]["sqnr_db"] == pytest.approx(got["both"], abs=1e-2)  # the model is that layer
    ranges = data["layers"]["proj"]["ranges"]
    assert ranges["cfg_ratio"] > 2.0
    assert ranges["per_step"][0]["uncond"]["absmax"] == pytest.approx(float(x[:2].abs().max()), rel=1e-3)


def test_clipped_counts_values_beyond_half_a_step():
    """A value within half a step past a grid's end rounds to the end code (rounding, not clipping): the clipped
    share counts only values beyond that. Calibrated by min-max on GELU outputs, then fed values placed around
    the half-step bounds of the fitted grid."""
    torch.manual_seed(0)
    fp = nn.Linear(16, 8)
    layer = QuantLinear.wrap(fp, lambda: WeightQuantizer(8), lambda dim: ActQuantizer(8, channel_dim=dim))
    layer.calibrate_weight()
    q = layer.input_quantizers[0]
    q.set_mode("observe")
    layer(F.gelu(3 * torch.randn(64, 16)))
    q.finalize()
    q.set_mode("quant")
    lo, hi, scale = _static_range(q)
    assert hi - lo == pytest.approx(255 * scale, rel=1e-6)
    inside = torch.tensor([lo - 0.45 * scale, hi + 0.45 * scale, lo, hi, 0.0])
    beyond = torch.tensor([lo - 0.55 * scale, hi + 0.55 * scale, hi + 3 * scale])
    assert clipped_count(inside, lo, hi, scale) == 0 and clipped_count(beyond, lo, hi, scale) == 3
    x = torch.cat([inside, beyond, torch.zeros(8)]).reshape(1, 16)  # 3 of 16 values clipped
    error = (q(x) - x).abs()[0]  # the grid: within half a step for the inside values, more for the clipped ones
    assert float(error[:5].max()) <= 0.5 * scale * (1 + 1e-5) and float(error[5:8].min()) > 0.5 * scale
    model = nn.Sequential()
    model.add_module("proj", layer)
    inspector = Inspector(model)
    inspector.run((x,), {}, CallInfo(step=0, timestep=10.0, batch=1, halves=("cond",)), guidance_scale=1.0)
    assert results(inspector)["layers"]["proj"]["calibrated"]["clipped_fraction"] == pytest.approx(3 / 16)


def test_causes():
    base = {"weight_bits": 8, "act_granularity": "tensor", "sqnr_db": {"weights": 48.0, "activations": 25.0, "both": 24.9}}
    assert diagnose({**base, "sqnr_db": {"weights": 20.0, "activations": 45.0, "both": 19.9}})[0].startswith("weights")
    causes = diagnose({**base, "ranges": {"step_variation": 12.0, "cfg_ratio": 1.1},
                       "outliers": {"channel_max_over_median": 40.0}})
    assert causes == ["outlier channels 40x", "activation range varies 12x over steps"]
    assert diagnose({**base, "sqnr_db": {"weights": None, "activations": None, "both": None}}) == ["exact"]


def test_prompt_split_and_steps():
    assert split_prompts(["a", "b", "c", "d", "e"], None, 4) == (["a", "b", "c"], ["d", "e"], True)
    assert split_prompts(["a"], None, 4) == (["a"], ["a"], False)
    assert split_prompts(["a", "b"], ["x", "y", "z"], 2) == (["a", "b"], ["x", "y"], True)
    assert eval_steps(25, 5) == [0, 6, 12, 18, 24] and eval_steps(3, 5) == [0, 1, 2] and eval_steps(4, 1) == [0]


def test_written_folder_lists_the_worst_layers(w8, tmp_path):
    _, data = w8
    out = write_inspection(data, tmp_path / "inspect")
    names = sorted(p.name for p in out.iterdir())
    assert names == [".dmquant-folder.json", "inspect.json", "report.md", "sqnr_layers.png", "step_ranges.png"]
    assert json.loads((out / "inspect.json").read_text())["worst"] == data["worst"]
    report = (out / "report.md").read_text()
    assert len(data["worst"]) == 15
    for name in data["worst"]:
        assert f"`{name}`" in report
    assert data["layers"][data["worst"][0]]["causes"][0] in report
    for png in ("sqnr_layers.png", "step_ranges.png"):
        assert Image.open(out / png).size[0] >= 900


def test_command(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "inspect"
    args = ["inspect", "--model", "tiny-random-sd", "--recipe", "w8a8-static", "--prompts", str(prompts), "--out", str(out),
            "--steps", "2", "--num-timesteps", "2", "--height", "16", "--width", "16", "--quiet"]
    assert main(args) == 0
    assert json.loads((out / "inspect.json").read_text())["recipe"] == "w8a8-static"
    assert main(args) == 2  # exists: --overwrite replaces an inspect folder
    assert main(args + ["--overwrite"]) == 0
    bad = tmp_path / "bad"

    def with_(**changes):
        flags = dict(zip(args[1::2], args[2::2]))
        flags.update({f"--{k}": str(v) for k, v in changes.items()})
        return ["inspect", *[x for kv in flags.items() for x in kv if x != "--quiet"], "--quiet"]

    assert main(with_(recipe="w9a8", out=bad)) == 2  # one line, before any work
    assert main(with_(prompts=tmp_path / "missing.txt", out=bad)) == 2
    assert not bad.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(with_(out=other) + ["--overwrite"]) == 2  # never a folder dmquant did not write
    assert (other / "keep.txt").read_text() == "mine"
