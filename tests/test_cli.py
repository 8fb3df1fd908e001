"""``dmquant`` end to end on a local pipeline folder, and its answers to bad input (exit 2, nothing written)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dmquant.cli import main
from dmquant.models.tiny import build_tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# calibration prompts\na red circle\n\na blue square\ngreen triangle\n")
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def test_calibrate_writes_run_folder_and_generate_uses_it(sd_folder, prompts, tmp_path):
    out = tmp_path / "run"
    code = run_cli("calibrate", "--model", sd_folder, "--recipe", "w8a8-static", "--prompts", prompts, "--out", out,
                   "--steps", 6, "--num-timesteps", 3, "--height", 16, "--width", 16, "--quiet")
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".dmquant-folder.json", "model_index.json", "recipe.yaml", "run.json", "scheduler", "summary.md",
                     "text_encoder", "tokenizer", "unet", "vae"]
    assert sorted(p.name for p in (out / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors.index.json", "dmquant_config.json",
        "dmquant_weights.safetensors"]
    run = json.loads((out / "run.json").read_text())
    assert run["tag"] == "W8A8" and run["calibration"]["prompts"] == 3 and run["calibration"]["steps"] == [0, 2, 5]
    assert run["quantized_layers"] == 79 and run["attention_modules"] == 8
    common = ["--prompt", "a red circle", "--steps", 4, "--height", 16, "--width", 16]
    assert run_cli("generate", "--model", out, "--out", tmp_path / "q.png", *common) == 0
    assert run_cli("generate", "--model", sd_folder, "--out", tmp_path / "fp.png", *common) == 0
    q = np.asarray(Image.open(tmp_path / "q.png"), dtype=np.float64)
    fp = np.asarray(Image.open(tmp_path / "fp.png"), dtype=np.float64)
    assert q.shape == fp.shape == (16, 16, 3)
    psnr = 10 * np.log10(255.0**2 / max(np.mean((q - fp) ** 2), 1e-12))
    assert psnr > 25.0  # the quantized run folder was really loaded, and it is close to FP


@pytest.mark.parametrize(
    "args, message",
    [(["--recipe", "w3a3"], "unknown recipe 'w3a3'"),
     (["--recipe", "BITS9"], "weights.bits=9"),
     (["--recipe", "GROUP48"], "group_size=48 does not divide"),
     (["--prompts", "EMPTY"], "has no prompts"),
     (["--prompts", "MISSING"], "prompt file not found"),
     (["--model", "someone/not-a-cached-model"], "huggingface-cli download"),
     (["--model", "NOT_A_PIPELINE"], "not a diffusers pipeline folder"),
     (["--recipe", "auto", "--target-bits", "1"], "target_bits=1.0 must lie in [2, 16]"),
     (["--target-bits", "4.5"], "use the recipe 'auto' (--recipe auto)"),
     (["--recipe", "auto", "--target-bits", "4", "--max-weight-memory", "2GB"], "not both"),
     (["--recipe", "auto", "--max-weight-memory", "2XB"], "'2XB' is not a size"),
     (["--recipe", "auto", "--max-weight-memory", "1KB"], "max_weight_bytes=1000 is below the smallest plan")],
)
def test_bad_input_exits_2_with_one_clear_line(args, message, sd_folder, prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "bits9.yaml").write_text("weights: {bits: 9}\n")
    (tmp_path / "group48.yaml").write_text("weights: {bits: 4, granularity: group, group_size: 48}\nactivations: null\n")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    (tmp_path / "not_a_pipeline").mkdir()
    subst = {"BITS9": tmp_path / "bits9.yaml", "GROUP48": tmp_path / "group48.yaml", "EMPTY": tmp_path / "empty.txt",
             "MISSING": tmp_path / "missing.txt", "NOT_A_PIPELINE": tmp_path / "not_a_pipeline"}
    argv = {"--model": sd_folder, "--recipe": "w8a8-static", "--prompts": prompts}
    for key, value in zip(args[::2], args[1::2]):
        argv[key] = subst.get(value, value)
    out = tmp_path / "out"
    flat = [x for kv in argv.items() for x in kv]
    code = run_cli("calibrate", *flat, "--out", out, "--steps", 4, "--height", 16, "--width", 16, "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dmquant: error:") and message in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_mixed_precision_from_the_cli_writes_a_plan_that_reruns(sd_folder, prompts, tmp_path):
    recipe = tmp_path / "auto-fast.yaml"  # the auto recipe without learned rounding, to keep the test short
    recipe.write_text("weights: {bits: 4}\nactivations: {bits: 8}\n"
                      "mixed_precision: {candidate_bits: [2, 4, 8], num_samples: 2}\n")
    out, again = tmp_path / "run", tmp_path / "again"
    common = ["--prompts", prompts, "--steps", 4, "--num-timesteps", 2, "--height", 16, "--width", 16, "--quiet"]
    assert run_cli("calibrate", "--model", sd_folder, "--recipe", recipe, "--target-bits", 5, "--out", out,
                   *common) == 0
    run = json.loads((out / "run.json").read_text())
    plan = run["calibration"]["mixed_precision"]
    assert run["tag"] == "WmixedA8" and abs(plan["average_bits"] - 5) < 0.1 and len(plan["histogram"]) >= 2
    assert (out / "mixed_precision.png").read_bytes().startswith(b"\x89PNG")
    assert "## Mixed precision" in (out / "summary.md").read_text()
    assert run_cli("calibrate", "--model", sd_folder, "--recipe", out / "recipe.yaml", "--out", again, *common) == 0
    rerun = json.loads((again / "run.json").read_text())
    assert "mixed_precision" not in rerun["calibration"] and rerun["tag"] == "WmixedA8"
    layers = json.loads((again / "unet" / "dmquant_config.json").read_text())["layers"]
    assert {name: spec["weights"][0]["bits"] for name, spec in layers.items()} == plan["bits"]


def test_outlier_and_correction_recipe_from_the_cli(sd_folder, prompts, tmp_path, capsys):
    recipe = tmp_path / "w4a4c.yaml"
    recipe.write_text("weights: {bits: 4, granularity: group, group_size: 16}\n"
                      "activations: {bits: 4, symmetric: true, granularity: group, group_size: 16}\n"
                      "smoothing: {alpha: 0.5}\nlow_rank: {rank: 4}\ncorrection: {method: ptqd, num_prompts: 2}\n")
    out = tmp_path / "run"
    assert run_cli("calibrate", "--model", sd_folder, "--recipe", recipe, "--prompts", prompts, "--out", out,
                   "--steps", 5, "--num-timesteps", 2, "--height", 16, "--width", 16, "--quiet") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["outliers"]["layers"] == run["quantized_layers"] == run["outliers"]["smoothed"]
    assert run["calibration"]["correction"]["prompts"] == 2 and (out / "dmquant_correction.safetensors").is_file()
    assert "noise correction: ptqd" in (out / "summary.md").read_text()
    common = ["--prompt", "a red circle", "--height", 16, "--width", 16]
    assert run_cli("generate", "--model", out, "--out", tmp_path / "ok.png", "--steps", 5, *common) == 0
    capsys.readouterr()
    assert run_cli("generate", "--model", out, "--out", tmp_path / "bad.png", "--steps", 7, *common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same scheduler and number of steps" in err[0] and not (tmp_path / "bad.png").exists()


def test_existing_output_folder_is_not_overwritten(sd_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("calibrate", "--model", sd_folder, "--recipe", "w4a16", "--out", out, "--quiet") == 2
    assert "exists already" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_console_script_lists_commands():
    result = subprocess.run([sys.executable, "-m", "dmquant.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("calibrate", "generate", "recipes"):
        assert command in result.stdout


def test_two_accelerate_processes_calibrate_like_one(tmp_path):
    """Calibration batches spread over 2 processes give the same statistics as 1 process."""
    from safetensors.torch import load_file

    class_ids = tmp_path / "ids.txt"
    class_ids.write_text("1\n2\n3\n4\n")
    common = ["calibrate", "--model", "tiny-random-dit", "--recipe", "w8a8-static", "--prompts", str(class_ids),
              "--steps", "4", "--batch-size", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # on a machine without GPUs, --multi_gpu starts 2 torchrun processes that form a gloo group
    # (accelerate's --cpu would start a single process here)
    result = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "dmquant.cli",
                             *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = [json.loads((tmp_path / name / "run.json").read_text())["calibration"] for name in ("one", "two")]
    assert [r["processes"] for r in runs] == [1, 2]
    one = load_file(str(tmp_path / "one" / "transformer" / "dmquant_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "transformer" / "dmquant_weights.safetensors"))
    assert one.keys() == two.keys() and sum(k.endswith("input_quantizers.0.scale") for k in one) > 10
    assert all(torch.equal(one[k], two[k]) for k in one)
