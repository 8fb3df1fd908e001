"""Issue 14: bad inputs and faults against the command line. Each ends with exit code 2 and one line
(no traceback), leaves no output and no temporary folder, and leaves data that was there intact.

The table runs ``dmquant.cli.main`` in process; a quantized run folder is calibrated once (W4A16, no
data) and copied for the damaged-folder cases.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dmquant.cli import main
from dmquant.errors import DMQuantError
from dmquant.models.tiny import build_tiny_sd_pipeline
from dmquant.runs import MARKER, atomic_folder, clean_stale_folders, folder_marker

TINY = ["--height", "16", "--width", "16", "--quiet"]


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse rejects a flag
        code = exc.code
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["calibrate", "--model", "tiny-random-sd", "--recipe", "w4a16", "--out", str(root / "q"), "--quiet"]) == 0
    nan_model = build_tiny_sd_pipeline()
    with torch.no_grad():
        nan_model.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    nan_model.save_pretrained(root / "nan-model")
    return root


def damaged(work: Path, tmp: Path, how: str) -> Path:
    """A copy of the quantized folder, damaged one way."""
    folder = tmp / "damaged"
    shutil.copytree(work / "q", folder)
    unet = folder / "unet"
    desc_path, weights_path = unet / "dmquant_config.json", unet / "dmquant_weights.safetensors"
    desc = json.loads(desc_path.read_text())
    weights = load_file(str(weights_path))
    layer = next(iter(desc["layers"]))
    wkey = next(k for k in weights if k.startswith(layer + ".") and weights[k].dtype == torch.uint8)
    skey = next(k for k in weights if k.startswith(layer + ".") and "scale" in k)
    if how == "version-str":
        desc["version"] = "four"
    elif how == "version-float":
        desc["version"] = 4.5
    elif how == "version-newer":
        desc["version"] = 99
    elif how == "class-pipeline":
        desc["class_name"] = "StableDiffusionPipeline"
    elif how == "class-missing":
        desc["class_name"] = "NoSuchModel2D"
    elif how == "class-other-model":
        desc["class_name"] = "AutoencoderKL"
    elif how == "layers-list":
        desc["layers"] = []
    elif how == "layer-spec":
        desc["layers"][layer] = {"kind": "no-such-kind"}
    elif how == "layer-fields":
        desc["layers"][layer] = {"kind": desc["layers"][layer]["kind"]}
    elif how == "layer-name":
        desc["layers"]["no.such.module"] = desc["layers"].pop(layer)
    elif how == "desc-list":
        desc = [1, 2]
    elif how == "shape":
        weights[wkey] = weights[wkey].reshape(-1)[:-1].clone()
    elif how == "dtype-int":
        weights[wkey] = weights[wkey].to(torch.int32)
    elif how == "dtype-float":
        weights[wkey] = weights[wkey].to(torch.float32)
    elif how == "nan-scale":
        weights[skey] = torch.full_like(weights[skey], float("nan"))
    elif how == "missing-tensor":
        weights.pop(skey)
    if how == "not-json":
        desc_path.write_text("{ this is not json")
    elif how == "not-utf8":
        desc_path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        desc_path.write_text(json.dumps(desc))
    save_file(weights, str(weights_path))
    if how == "truncated":
        weights_path.write_bytes(weights_path.read_bytes()[:1000])
    elif how == "no-weights":
        weights_path.unlink()
    elif how == "no-config":
        (unet / "config.json").unlink()
    elif how == "pickle":  # a component's weights as a .bin pickle only: never unpickled
        vae = folder / "vae"
        state = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
        (vae / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(state, vae / "diffusion_pytorch_model.bin")
    elif how == "no-index":
        (folder / "model_index.json").unlink()
    return folder


DAMAGES = {  # how -> words of the message
    "version-str": "not an integer", "version-float": "not an integer", "version-newer": "newer dmquant",
    "class-pipeline": "not a diffusers model class", "class-missing": "no class NoSuchModel2D",
    "class-other-model": "config.json names", "layers-list": "'layers' is missing", "layer-spec": "unknown layer kind", "layer-fields": "damaged",
    "layer-name": "damaged", "desc-list": "not a dmquant", "shape": "disagree", "dtype-int": "disagree",
    "dtype-float": "disagree", "nan-scale": "NaN", "missing-tensor": "missing", "not-json": "damaged",
    "not-utf8": "damaged", "truncated": "truncated", "no-weights": "missing", "no-config": "config.json",
    "pickle": "safetensors", "no-index": "model_index.json",
}


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_damaged_quantized_folder(how, work, tmp_path, capsys):
    folder = damaged(work, tmp_path, how)
    before = snapshot(folder)
    out = tmp_path / "img.png"
    code, err = run(["generate", "--model", folder, "--prompt", "a red circle", "--out", out, "--steps", 2,
                     "--height", 16, "--width", 16], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("dmquant: error:") and DAMAGES[how] in lines[-1], lines[-1]
    assert not out.exists() and snapshot(folder) == before


# --------------------------------------------------------------------------- the table of bad inputs
def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "list.yaml": "- weights\n- activations\n", "scalar.yaml": "42\n", "syntax.yaml": "weights: {bits: [\n",
        "bits9.yaml": "weights: {bits: 9}\n", "bitsword.yaml": "weights: {bits: eight}\n",
        "unknown.yaml": "weigths: {bits: 8}\n", "unknownsub.yaml": "weights: {bitz: 8}\n",
        "sectionlist.yaml": "weights: [1, 2]\n", "nan.yaml": "weights: {bits: 8, percentile: .nan}\n",
        "include.yaml": "include: down_blocks\n", "group48.yaml": "weights: {bits: 4, granularity: group, group_size: 48}\n"
                                                                  "activations: null\n",
        "sampler.yaml": "calibration: {sampler: 7}\n", "steps0.yaml": "calibration: {num_inference_steps: 0}\n",
        "empty.txt": "\n# nothing\n", "ok.txt": "a red circle\na blue square\n", "ids.txt": "1\n9999\n",
        "labels.txt": "a purple hexagon\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp / "latin1.txt").write_bytes("a caf\xe9 with a red circle\n".encode("latin-1"))
    (tmp / "nul.txt").write_bytes(b"a red\x00circle\n")
    (tmp / "dir.yaml").mkdir()
    (tmp / "dir.txt").mkdir()
    (tmp / "adir.png").mkdir()
    (tmp / "not-a-pipeline").mkdir()
    (tmp / "a-file").write_text("x")
    precious = tmp / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    marked = tmp / "marked"
    marked.mkdir()
    (marked / MARKER).write_text(json.dumps({"written_by": "dmquant", "kind": "model"}))
    (marked / "old.txt").write_text("an earlier run")
    return {p.name: p for p in tmp.iterdir()}


CAL = ["calibrate", "--model", "tiny-random-sd", "--recipe", "w4a16", "--prompts", "ok.txt", "--out", "OUT", *TINY]
GEN = ["generate", "--model", "Q", "--prompt", "a red circle", "--out", "OUT.png", "--steps", "2", "--height", "16",
       "--width", "16"]
EVA = ["evaluate", "--model", "tiny-random-sd", "--prompts", "ok.txt", "--num-images", "2", "--out", "OUT",
       "--steps", "2", "--quiet"]
BENCH = ["bench", "--model", "tiny-random-sd"]
DIT = ["calibrate", "--model", "tiny-random-dit", "--recipe", "w8a8", "--prompts", "ok.txt", "--out", "OUT", "--quiet"]
DEMO = ["demo", "--out", "OUT", "--num-images", "2", "--steps", "2", "--quiet"]


def _set(base: list[str], **flags) -> list[str]:
    argv = list(base)
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] if value is True else [flag, value]
    return argv


CASES = [  # (id, argv, words of the message; None: an argparse usage error)
    ("recipe-unknown", _set(CAL, recipe="w3a3"), "unknown recipe"),
    ("recipe-list", _set(CAL, recipe="list.yaml"), "not a mapping"),
    ("recipe-scalar", _set(CAL, recipe="scalar.yaml"), "not a mapping"),
    ("recipe-syntax", _set(CAL, recipe="syntax.yaml"), "not valid YAML"),
    ("recipe-latin1", _set(CAL, recipe="latin1.yaml"), "UTF-8"),
    ("recipe-bits9", _set(CAL, recipe="bits9.yaml"), "weights.bits=9"),
    ("recipe-bits-word", _set(CAL, recipe="bitsword.yaml"), "wrong type"),
    ("recipe-unknown-key", _set(CAL, recipe="unknown.yaml"), "unknown recipe keys"),
    ("recipe-unknown-subkey", _set(CAL, recipe="unknownsub.yaml"), "unknown keys"),
    ("recipe-section-list", _set(CAL, recipe="sectionlist.yaml"), "must be a mapping"),
    ("recipe-nan", _set(CAL, recipe="nan.yaml"), "wrong type"),
    ("recipe-include-str", _set(CAL, recipe="include.yaml"), "wrong type"),
    ("recipe-sampler-int", _set(CAL, recipe="sampler.yaml"), "wrong type"),
    ("recipe-steps0", _set(CAL, recipe="steps0.yaml"), "positive integer"),
    ("recipe-missing", _set(CAL, recipe="missing.yaml"), "does not exist"),
    ("recipe-dir", _set(CAL, recipe="dir.yaml"), "does not exist"),
    ("recipe-group48", _set(CAL, recipe="group48.yaml"), "does not divide"),
    ("steps-0", _set(CAL, steps="0"), None),
    ("steps-negative", _set(CAL, steps="-3"), None),
    ("steps-word", _set(CAL, steps="many"), None),
    ("steps-too-many", _set(CAL, steps="5000"), "training timesteps"),
    ("num-timesteps-0", _set(CAL, num_timesteps="0"), None),
    ("batch-size-0", _set(CAL, batch_size="0"), None),
    ("max-prompts-negative", _set(CAL, max_prompts="-1"), None),
    ("seed-negative", _set(CAL, seed="-1"), None),
    ("seed-huge", _set(CAL, seed=str(2**70)), None),
    ("guidance-nan", _set(CAL, guidance_scale="nan"), None),
    ("guidance-inf", _set(CAL, guidance_scale="inf"), None),
    ("height-0", _set(CAL, height="0"), None),
    ("height-12", _set(CAL, height="12"), "multiple of 8"),
    ("prompts-missing", _set(CAL, prompts="missing.txt"), "prompt file not found"),
    ("prompts-empty", _set(CAL, prompts="empty.txt"), "has no prompts"),
    ("prompts-latin1", _set(CAL, prompts="latin1.txt"), "not UTF-8"),
    ("prompts-nul", _set(CAL, prompts="nul.txt"), "NUL"),
    ("prompts-dir", _set(CAL, prompts="dir.txt"), "prompt file not found"),
    ("model-zoo-judge", _set(CAL, model="tiny-shapes-clip"), "not a diffusion pipeline"),
    ("model-unknown", _set(CAL, model="no-such-model"), "neither a folder"),
    ("model-not-pipeline", _set(CAL, model="not-a-pipeline"), "not a diffusers pipeline folder"),
    ("model-file", _set(CAL, model="a-file"), "not a diffusers pipeline folder"),
    ("model-hub-offline", _set(CAL, model="someone/not-cached"), "huggingface-cli download"),
    ("model-nan-weights", _set(CAL, model="NAN"), "NaN"),
    ("dit-class-id", _set(DIT, prompts="ids.txt"), "class id 9999"),
    ("dit-label", _set(DIT, prompts="labels.txt"), "names none"),
    ("dit-height", _set(CAL, model="tiny-random-dit"), "takes no --height"),
    ("out-unmarked", _set(CAL, out="precious"), "not written by dmquant"),
    ("out-unmarked-overwrite", _set(CAL, out="precious", overwrite=True), "not written by dmquant"),
    ("out-marked-no-overwrite", _set(CAL, out="marked"), "--overwrite"),
    ("out-file", _set(CAL, out="a-file"), "not a folder"),
    ("out-under-file", _set(CAL, out="a-file/run"), "not a folder"),
    ("out-read-only", _set(CAL, out="/sys/dmquant-run"), "cannot be written"),
    ("gen-steps-0", _set(GEN, steps="0"), None),
    ("gen-seed-negative", _set(GEN, seed="-5"), None),
    ("gen-suffix", _set(GEN, out="OUT.xyz"), "unknown image type"),
    ("gen-out-dir", _set(GEN, out="adir.png"), "is a folder"),
    ("gen-read-only", _set(GEN, out="/sys/dmquant.png"), "cannot be written"),
    ("gen-height-12", _set(GEN, height="12"), "multiple of 8"),
    ("eval-out-quantized-model", _set(EVA, out="Q"), "does not replace"),
    ("eval-out-unmarked", _set(EVA, out="precious"), "not written by dmquant"),
    ("eval-num-images-1", _set(EVA, num_images="1"), None),
    ("eval-num-images-0", _set(EVA, num_images="0"), None),
    ("eval-too-few-prompts", _set(EVA, num_images="5"), "has 2 prompts"),
    ("eval-batch-0", _set(EVA, batch_size="0"), None),
    ("eval-steps-negative", _set(EVA, steps="-1"), None),
    ("eval-reference-unknown", _set(EVA, reference="no-such-model"), "neither a folder"),
    ("eval-prompts-latin1", _set(EVA, prompts="latin1.txt"), "not UTF-8"),
    ("bench-batch-0", _set(BENCH, batch="0"), None),
    ("bench-latent-0", _set(BENCH, latent_size="0"), None),
    ("bench-repeats-0", _set(BENCH, repeats="0"), None),
    ("bench-zoo-judge", _set(BENCH, model="tiny-shapes-clip"), "not a diffusion pipeline"),
    ("demo-bad-recipe", _set(DEMO, recipes="w8a8,nope"), "unknown recipe 'nope'"),
    ("demo-empty-recipe", _set(DEMO, recipes=","), "unknown recipe"),
    ("demo-duplicate-recipes", _set(DEMO, recipes="w8a8,w8a8"), "distinct"),
    ("demo-num-images-1", _set(DEMO, num_images="1"), None),
    ("demo-out-unmarked", _set(DEMO, out="precious"), "not written by dmquant"),
    ("unknown-command", ["frobnicate"], None),
]


def _sys_is_read_only() -> bool:
    try:
        os.mkdir("/sys/.dmquant-probe")
    except OSError:
        return True
    os.rmdir("/sys/.dmquant-probe")
    return False


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, words, work, tmp_path, capsys):
    if "/sys/" in " ".join(argv) and not _sys_is_read_only():
        pytest.skip("no read-only place on this machine (/sys is writable)")
    files = _files(tmp_path)
    out = tmp_path / "out"
    subst = {**files, "OUT": out, "OUT.png": tmp_path / "out.png", "OUT.xyz": tmp_path / "out.xyz", "Q": work / "q",
             "NAN": work / "nan-model"}
    argv = [str(subst.get(a) or (files[a.split("/")[0]] / a.split("/", 1)[1] if a.split("/")[0] in files else a))
            for a in argv]
    guarded = {p: snapshot(p) for p in (files["precious"], files["marked"], work / "q")}
    code, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    if words is None:  # argparse: usage line, then one error line
        assert lines[-1].startswith("dmquant") and "error:" in lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("dmquant: error:") and words in lines[0], lines
    assert not out.exists() and not (tmp_path / "out.png").exists() and not leftovers(out)
    assert all(snapshot(p) == before for p, before in guarded.items())  # pre-existing data intact


# --------------------------------------------------------------------------------------- faults
def test_full_disk_while_saving_leaves_old_folder_intact(work, tmp_path, capsys, monkeypatch):
    import dmquant.serialization

    out = tmp_path / "run"
    shutil.copytree(work / "q", out)
    before = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))

    monkeypatch.setattr(dmquant.serialization, "save_file", full)
    code, err = run(["calibrate", "--model", "tiny-random-sd", "--recipe", "w4a16", "--out", out, "--overwrite",
                     "--quiet"], capsys)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(out) == before and not leftovers(out)


def test_read_only_place_injected(tmp_path, capsys, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    out = tmp_path / "ro" / "run"
    code, err = run(["calibrate", "--model", "tiny-random-sd", "--recipe", "w4a16", "--out", out, "--quiet"], capsys)
    assert code == 2 and "cannot be written" in err and "Permission denied" in err and not out.exists()


def test_overwrite_replaces_a_marked_folder_and_leaves_others(work, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(work / "q", out)
    (out / "note.txt").write_text("from the earlier run")
    assert folder_marker(out)["kind"] == "model"
    code, err = run(["calibrate", "--model", "tiny-random-sd", "--recipe", "w4a16", "--out", out, "--overwrite",
                     "--quiet"], capsys)
    assert code == 0, err
    assert not (out / "note.txt").exists() and (out / "unet" / "dmquant_weights.safetensors").is_file()
    assert folder_marker(out) is not None
    # the earlier run's own files are deleted; the file a user added there is not: it stays, named, beside
    (old,) = leftovers(out)
    assert sorted(p.name for p in (out.parent / old).iterdir()) == sorted([MARKER, "note.txt"])
    assert (out.parent / old / "note.txt").read_text() == "from the earlier run"
    assert f"{old} holds files dmquant did not write" in err


def test_internal_errors_exit_1_with_a_report_line(monkeypatch, tmp_path, capsys):
    import dmquant.workflows

    def bug(*args, **kwargs):
        raise RuntimeError("an invariant broke\nsecond line")

    monkeypatch.setattr(dmquant.workflows, "calibrate", bug)
    argv = ["calibrate", "--model", "tiny-random-sd", "--recipe", "w4a16", "--out", tmp_path / "run", "--quiet"]
    code, err = run(argv, capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "this is a bug" in err and "--debug" in err
    code, err = run([*argv, "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "an invariant broke" in err

    def disk(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "/dev/sdz")

    monkeypatch.setattr(dmquant.workflows, "calibrate", disk)
    code, err = run(argv, capsys)
    assert code == 2 and err.startswith("dmquant: error: Input/output error (/dev/sdz)") and "Traceback" not in err


def test_stale_temporary_folders_of_killed_runs(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "run"
    tmp = tmp_path / f".run.tmp-{pid}-abcd"
    tmp.mkdir()
    (tmp / MARKER).write_text(json.dumps({"written_by": "dmquant", "kind": "model"}))
    old = tmp_path / f".run.old-{pid}-ef01"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"written_by": "dmquant", "kind": "model"}))
    (old / "weights.txt").write_text("the previous run")
    foreign = tmp_path / f".run.tmp-{pid}-user"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not dmquant's")
    notes = clean_stale_folders(out)
    assert len(notes) == 2 and not tmp.exists() and not old.exists()
    assert (out / "weights.txt").read_text() == "the previous run"  # moved aside, killed: put back
    assert (foreign / "mine.txt").exists()  # never touched
    assert "removed" in capsys.readouterr().err


def test_kill_9_during_save_keeps_the_old_folder(tmp_path):
    out = tmp_path / "run"
    with atomic_folder(out) as folder:
        (folder / "data.txt").write_text("complete run")
    script = ("import os, sys, signal\nfrom dmquant.runs import atomic_folder\n"
              f"with atomic_folder({str(out)!r}, overwrite=True) as tmp:\n"
              "    (tmp / 'data.txt').write_text('half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9
    assert (out / "data.txt").read_text() == "complete run"
    assert len(leftovers(out)) == 1  # the unfinished folder of the killed run
    clean_stale_folders(out)
    assert not leftovers(out) and (out / "data.txt").read_text() == "complete run"


def test_identical_runs_write_identical_bytes(work, tmp_path, capsys):
    out = tmp_path / "again"
    assert run(["calibrate", "--model", "tiny-random-sd", "--recipe", "w4a16", "--out", out, "--quiet"], capsys)[0] == 0
    first, second = snapshot(work / "q"), snapshot(out)
    assert first.keys() == second.keys()
    differ = {k for k in first if first[k] != second[k]}
    # only the time stamps and durations (which may coincide); the marker stamps each file's write time
    assert differ <= {"run.json", "summary.md", MARKER}
    marks = [json.loads(first[MARKER]), json.loads(second[MARKER])]
    assert marks[0]["files"] == marks[1]["files"]  # the same files, of the same sizes (but the timed ones)
    sizes = [{k: v[0] for k, v in m["stamps"].items() if k not in ("run.json", "summary.md")} for m in marks]
    assert sizes[0] == sizes[1] and len(sizes[0]) == len(first) - 3
    assert "run.json" in differ and any(k.endswith("dmquant_weights.safetensors") for k in first)


def test_api_names_the_layer_with_non_finite_weights():
    import dmquant

    pipe = build_tiny_sd_pipeline()
    with torch.no_grad():
        pipe.unet.down_blocks[0].resnets[0].conv1.weight.fill_(float("inf"))
    with pytest.raises(DMQuantError, match="down_blocks.0.resnets.0.conv1.weight holds 0 NaN and .* Inf"):
        dmquant.quantize(pipe, "w4a16", progress=False)


# -------------------------------------------------------------------- property: exit 0 or 2, never 1
_VALUES = [None, 0, 1, -1, 2, 3, 4, 8, 9, 16, 32, 48, 0.5, 99.9, float("nan"), "x", "tensor", "channel", "group",
           "token", "minmax", "mse", "uniform", "all", True, False, [], [1], {}, {"bits": 4}, "int8", "fake-quant"]
_KEYS = {
    "weights": ["bits", "symmetric", "granularity", "group_size", "method", "percentile"],
    "activations": ["bits", "symmetric", "granularity", "group_size", "method", "percentile"],
    "attention": ["bits", "probs_bits", "method", "kernel"],
    "calibration": ["sampler", "num_timesteps", "num_inference_steps", "batch_size", "max_prompts", "seed"],
}
_FLAGS = {"--steps": ["1", "2", "0", "-2", "x"], "--num-timesteps": ["1", "3", "0"], "--batch-size": ["1", "2", "0"],
          "--max-prompts": ["1", "-1"], "--seed": ["0", "7", "-1"], "--guidance-scale": ["1.5", "nan", "-1"]}


_GOOD = {"bits": [4, 8], "symmetric": [True, False], "granularity": ["tensor", "channel"], "method": ["minmax", "mse"],
         "percentile": [99.9], "group_size": [None, 8], "probs_bits": [None, 8], "kernel": ["fake-quant"],
         "sampler": ["uniform", "all"], "num_timesteps": [1, 2], "num_inference_steps": [2], "batch_size": [1, 2],
         "max_prompts": [1, 2], "seed": [0, 3], "include": [["*"]], "exclude": [[], ["down_blocks.*"]],
         "use_default_excludes": [True, False], "name": ["r"]}


def _value(rng: random.Random, key: str):
    return rng.choice(_GOOD[key]) if key in _GOOD and rng.random() < 0.6 else rng.choice(_VALUES)


def _random_recipe(rng: random.Random) -> object:
    if rng.random() < 0.05:
        return rng.choice([[1, 2], "w8a8", 3, None])
    recipe: dict = {"weights": {"bits": 8}, "activations": None, "calibration": {"num_timesteps": 1}}
    for _ in range(rng.randint(1, 3)):
        section = rng.choice([*_KEYS, *_KEYS, "include", "exclude", "name", "use_default_excludes", "bogus"])
        if section in _KEYS:
            if not isinstance(recipe.get(section), dict):
                recipe[section] = {}
            if rng.random() < 0.05:
                recipe[section] = rng.choice(_VALUES)
            else:
                key = rng.choice([*_KEYS[section], "nonsense"] if rng.random() < 0.1 else _KEYS[section])
                recipe[section][key] = _value(rng, key)
        else:
            recipe[section] = _value(rng, section)
    return recipe


def test_property_random_recipes_and_flags_end_with_0_or_2(tmp_path, capsys):
    rng = random.Random(14)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    codes = []
    for i in range(24):
        recipe = tmp_path / f"r{i}.yaml"
        recipe.write_text(yaml.safe_dump(_random_recipe(rng)))
        out = tmp_path / f"out{i}"
        argv = ["calibrate", "--model", "tiny-random-sd", "--recipe", recipe, "--prompts", prompts, "--out", out,
                "--steps", "2", *TINY]
        for flag in rng.sample(sorted(_FLAGS), rng.randint(0, 3)):
            argv += [flag, rng.choice(_FLAGS[flag])]
        code, err = run(argv, capsys)
        assert code in (0, 2), (recipe.read_text(), argv, err)
        assert "Traceback" not in err
        assert (code == 0) == out.is_dir() and not leftovers(out)
        codes.append(code)
    assert codes.count(2) >= 8 and codes.count(0) >= 2, codes
