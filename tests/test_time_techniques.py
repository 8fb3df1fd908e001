"""The time dimension end to end on tiny random pipelines: time tables and split quantizers through
calibration, freezing and save/load; reconstruction; the timestep hook with CFG batches and DiT."""

import json

import numpy as np
import pytest
import torch

import dmquant
from dmquant.calibration.collect import collect_denoiser_inputs
from dmquant.calibration.records import CalibrationSet
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.models.adapters import UNET, find_denoiser
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_sd_pipeline
from dmquant.nn.wrap import quant_layers
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.weight import WeightQuantizer
from dmquant.serialization import FORMAT_VERSION

SD_KW = {"height": 16, "width": 16}
TIME_SPLIT = {"weights": {"bits": 4, "method": "mse"}, "activations": {"bits": 8},
              "attention": {"bits": 8, "probs_bits": None}, "time": {"mode": "step"}, "split": {},
              "calibration": {"sampler": "all"}}


def images(pipe, prompts, steps=6):
    kw = SD_KW if "prompt" in pipe.__call__.__code__.co_varnames else {}
    config = GenerationConfig(steps, None, 0, batch_size=len(prompts), progress=False)
    return generate(pipe, prompts, config, distributed=False, **kw).astype(np.float64)


def psnr(a, b):
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_adapter_finds_every_skip_concatenation():
    unet = build_tiny_sd_pipeline().unet
    seen = []
    import diffusers.models.unets.unet_2d_blocks as blocks

    real_cat = torch.cat

    def spy(tensors, dim=0, **kw):
        if dim == 1 and len(tensors) == 2:
            seen.append(tensors[0].shape[1])
        return real_cat(tensors, dim=dim, **kw)

    blocks.torch.cat = spy
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 3, 32))
    finally:
        blocks.torch.cat = real_cat
    conv1 = [split for name, split in UNET.concat_points(unet) if name.endswith("conv1")]
    assert conv1 == seen and len(seen) == sum(len(b.resnets) for b in unet.up_blocks)


@pytest.fixture(scope="module")
def time_split_sd(tmp_path_factory):
    pipe = build_tiny_sd_pipeline()
    reference = images(pipe, ["a white disk"])
    dmquant.quantize(pipe, TIME_SPLIT, prompts=["a red circle", "a blue square"], num_inference_steps=6,
                     progress=False, **SD_KW)
    folder = tmp_path_factory.mktemp("time") / "q"
    simulated = images(pipe, ["a white disk"])
    pipe.save_pretrained(folder)
    return pipe, folder, reference, simulated


def test_time_tables_and_split_survive_freeze_and_save_load(time_split_sd):
    pipe, folder, reference, simulated = time_split_sd
    assert psnr(simulated, reference) > 25.0
    assert pipe.dmquant.report.split and pipe.dmquant.calibration["steps"] == list(range(6))
    description = json.loads((folder / "unet" / "dmquant_config.json").read_text())
    assert description["version"] == FORMAT_VERSION == 4
    assert len(description["time_keys"]) == 6  # the one TimeTable's keys, stored once
    entry = description["layers"]["up_blocks.0.resnets.0.conv1"]
    assert entry["split"] is not None and len(entry["inputs"]) == 2 and all(q["table"] for q in entry["inputs"])
    loaded = dmquant.load_quantized_pipeline(folder)
    split = [m for _, m in quant_layers(loaded.unet) if m.split is not None]
    assert split and all(m.frozen and len(m.input_quantizers) == 2 for m in split)
    assert all(q.scale.shape == (6,) for m in split for q in m.input_quantizers)
    assert psnr(images(loaded, ["a white disk"]), simulated) > 35.0  # integer path vs simulation


def test_unseen_schedule_warns_once_and_bad_tables_fail(time_split_sd, tmp_path):
    _, folder, _, _ = time_split_sd
    loaded = dmquant.load_quantized_pipeline(folder)
    with pytest.warns(UserWarning, match="not in the calibrated schedule"):
        images(loaded, ["a white disk"], steps=9)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    path = bad / "unet" / "dmquant_config.json"
    description = json.loads(path.read_text())
    path.write_text(json.dumps({**description, "time_keys": description["time_keys"][:-1]}))
    with pytest.raises(DMQuantError, match="timestep tables.* disagree"):
        dmquant.load_quantized_pipeline(bad)  # 5 keys against the stored 6-entry tables
    path.write_text(json.dumps({**description, "time_keys": None}))
    with pytest.raises(DMQuantError, match="no timestep keys"):
        dmquant.load_quantized_pipeline(bad)


def test_dit_time_tables_with_guidance_batches():
    pipe = build_tiny_dit_pipeline()
    reference = images(pipe, [5])
    recipe = {**TIME_SPLIT, "time": {"mode": "interval", "num_intervals": 2}, "split": None,
              "calibration": {"sampler": {"kind": "beta"}}}
    dmquant.quantize(pipe, recipe, prompts=[1, 2], num_inference_steps=6, num_timesteps=4, progress=False)
    q = pipe.transformer.transformer_blocks[0].ff.net[2].input_quantizers[0]
    assert q.scale.shape == (6,) and len(set(q.scale.tolist())) <= 2
    assert psnr(images(pipe, [5]), reference) > 25.0


def test_progressive_sampler_records_the_quantized_trajectory():
    pipe = build_tiny_sd_pipeline()
    recipe = {**TIME_SPLIT, "time": None, "split": None, "calibration": {"sampler": {"kind": "progressive"}}}
    dmquant.quantize(pipe, recipe, prompts=["a red circle"], num_inference_steps=4, num_timesteps=2,
                     progress=False, **SD_KW)
    assert pipe.dmquant.calibration["progressive_rounds"] == 1


def held_out(pipe, tmp_path):
    _, denoiser, _ = find_denoiser(pipe)
    collect_denoiser_inputs(pipe, denoiser, ["a yellow star"], [1, 3], tmp_path, 5, progress=False,
                            call_kwargs=SD_KW)
    calls = list(CalibrationSet(tmp_path).iter_calls())
    with torch.no_grad():
        return calls, [denoiser(*a, **k)[0] for a, k in calls]


@pytest.mark.parametrize("unit", ["layer", "block"])
def test_reconstruction_lowers_the_error_on_held_out_inputs(unit, tmp_path):
    sqnr = {}
    for name, recon in (("rtn", None), ("learned", {"unit": unit, "iterations": 30, "num_samples": 4,
                                                    "learn_act_scales": unit == "block"})):
        pipe = build_tiny_sd_pipeline()
        calls, refs = held_out(pipe, tmp_path / name)
        recipe = {"weights": {"bits": 3}, "activations": {"bits": 8}, "reconstruction": recon}
        dmquant.quantize(pipe, recipe, prompts=["a red circle", "a blue square"], num_inference_steps=5,
                         num_timesteps=3, progress=False, **SD_KW)
        with torch.no_grad():
            outs = [pipe.unet(*a, **k)[0] for a, k in calls]
        sqnr[name] = np.mean([sqnr_db(r, o) for r, o in zip(refs, outs)])
    assert sqnr["learned"] > sqnr["rtn"] + 0.5


def test_learned_weight_scales_lower_the_error_and_freeze_bit_for_bit(tmp_path):
    sqnr, pipes = {}, {}
    for learn in (False, True):
        pipe = build_tiny_sd_pipeline()
        calls, refs = held_out(pipe, tmp_path / f"h{learn}")
        recon = {"unit": "block", "iterations": 40, "num_samples": 4, "learn_act_scales": False,
                 "learn_weight_scales": learn}
        dmquant.quantize(pipe, {"weights": {"bits": 3, "scale_dtype": "float16"}, "activations": None,
                                "reconstruction": recon},
                         prompts=["a red circle", "a blue square"], num_inference_steps=5, num_timesteps=3,
                         progress=False, **SD_KW)
        with torch.no_grad():
            sqnr[learn] = np.mean([sqnr_db(r, pipe.unet(*a, **k)[0]) for (a, k), r in zip(calls, refs)])
        pipes[learn] = pipe
    assert sqnr[True] > sqnr[False] + 0.15, sqnr
    layer = next(m for _, m in quant_layers(pipes[True].unet))
    q = layer.weight_quantizers[0]
    assert torch.equal(q.scale, q.scale.half().float())  # learned, then rounded to the stored float16
    simulated = images(pipes[True], ["a white disk"])
    pipes[True].save_pretrained(tmp_path / "q")
    assert np.array_equal(images(dmquant.load_quantized_pipeline(tmp_path / "q"), ["a white disk"]), simulated)


def test_learned_weight_scales_leave_fine_grids_alone():
    """Only weights of at most ``weight_scale_max_bits`` bits learn their scales: the 8-bit layers keep the scales
    their calibration gave (exactly), the 3-bit ones move."""
    pipe = build_tiny_sd_pipeline()
    recon = {"unit": "block", "iterations": 30, "num_samples": 4, "learn_act_scales": False,
             "learn_weight_scales": True}
    recipe = {"weights": {"bits": 3}, "activations": None, "reconstruction": recon,
              "layers": {"*attn1*": {"weights": {"bits": 8}}}}
    dmquant.quantize(pipe, recipe, prompts=["a red circle", "a blue square"], num_inference_steps=5,
                     num_timesteps=3, progress=False, **SD_KW)
    moved = {3: 0, 8: 0}
    for _, layer in quant_layers(pipe.unet):
        for q, w in zip(layer.weight_quantizers, layer.weight_parts(layer.weight.detach())):
            start = WeightQuantizer(q.bits, q.symmetric, q.granularity, q.group_size, q.method)
            start.calibrate(w)
            moved[q.bits] += int(not torch.equal(start.scale, q.scale))
    assert moved[8] == 0 and moved[3] > 5, moved


def test_a_diverging_reconstruction_is_refitted_then_falls_back_to_nearest(tmp_path):
    """Weight scales learned at an absurd rate diverge: each unit whose hardened error ends above round-to-nearest's
    is fitted again with its rounding alone (``refits``), which lands at or below nearest rounding. With an absurd
    rounding rate too, the refit diverges as well and the unit is put back to nearest rounding (``fallbacks``), so the
    model is as good as without reconstruction."""
    sqnr, reports = {}, {}
    wild = {"unit": "block", "iterations": 30, "num_samples": 4, "learn_act_scales": False,
            "learn_weight_scales": True, "act_learning_rate": 3.0}
    for name, recon in (("rtn", None), ("wild", wild), ("wilder", {**wild, "learning_rate": 1e4, "reg_weight": 0.0})):
        pipe = build_tiny_sd_pipeline()
        calls, refs = held_out(pipe, tmp_path / name)
        dmquant.quantize(pipe, {"weights": {"bits": 3}, "activations": None, "reconstruction": recon},
                         prompts=["a red circle", "a blue square"], num_inference_steps=5, num_timesteps=3,
                         progress=False, **SD_KW)
        with torch.no_grad():
            sqnr[name] = np.mean([sqnr_db(r, pipe.unet(*a, **k)[0]) for (a, k), r in zip(calls, refs)])
        reports[name] = pipe.dmquant.calibration.get("reconstruction")
    assert len(reports["wild"]["refits"]) >= 1 and not reports["wild"]["fallbacks"], reports["wild"]
    assert sqnr["wild"] >= sqnr["rtn"] + 0.5, sqnr  # the refitted rounding beats round-to-nearest
    assert reports["wilder"]["fallbacks"] and set(reports["wilder"]["fallbacks"]) <= set(reports["wilder"]["refits"])
    assert sqnr["wilder"] >= sqnr["rtn"] - 0.5, sqnr


def test_learned_tables_precomputed_for_another_schedule(tmp_path):
    import warnings

    from safetensors.torch import load_file

    pipe = build_tiny_sd_pipeline()
    recipe = {**TIME_SPLIT, "time": {"mode": "learned", "iterations": 50}}
    dmquant.quantize(pipe, recipe, prompts=["a red circle"], num_inference_steps=4, progress=False, **SD_KW)
    pipe.save_pretrained(tmp_path / "q")  # saved with the 4-step tables and each layer's range MLP
    count = dmquant.precompute_time_tables(pipe, 7)
    assert count > 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulated = images(pipe, ["a white disk"], steps=7)
    assert not [w for w in caught if "calibrated schedule" in str(w.message)]  # every step is in the tables
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    assert dmquant.precompute_time_tables(loaded, 7) > 10  # the frozen layers recompute their tables too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen = images(loaded, ["a white disk"], steps=7)
    assert not [w for w in caught if "calibrated schedule" in str(w.message)]
    assert psnr(frozen, simulated) > 35.0  # the integer path against the simulation, same 7-step tables
    loaded.save_pretrained(tmp_path / "q7")  # the recomputed 7-entry tables are what is saved now
    description = json.loads((tmp_path / "q7" / "unet" / "dmquant_config.json").read_text())
    assert len(description["time_keys"]) == 7
    name = next(n for n, e in description["layers"].items() if e["split"] is None and e["inputs"] and e["inputs"][0]["mlp"])
    state = load_file(str(tmp_path / "q7" / "unet" / "dmquant_weights.safetensors"))
    assert state[f"{name}.input_quantizers.0.scale"].shape == (7,)
    plain = build_tiny_sd_pipeline()
    dmquant.quantize(plain, {**TIME_SPLIT, "split": None}, prompts=["a red circle"], num_inference_steps=4,
                     progress=False, **SD_KW)
    with pytest.raises(DMQuantError, match="no learned"):
        dmquant.precompute_time_tables(plain, 7)
