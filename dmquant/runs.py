"""Run folders: what ``dmquant calibrate`` writes, and how a quantized pipeline is rebuilt from one.

A run folder holds ``run.json`` (base model, recipe name, calibration summary), ``recipe.yaml``,
``quant_state.safetensors`` (the quantizers' scales and zero points) and ``summary.md``. Loading
rebuilds the simulation from the base model and the stored statistics, with no calibration.
Folders are written atomically: into a temporary sibling, then renamed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from dmquant import __version__
from dmquant.api import apply_recipe, load_quant_state, save_quant_state
from dmquant.config import load_recipe, save_recipe
from dmquant.errors import DMQuantError
from dmquant.loading import load_pipeline
from dmquant.models.adapters import find_denoiser

RUN_FORMAT, RUN_VERSION = "dmquant-run", 1


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / "run.json").is_file()


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DMQuantError(f"output folder {out} exists already: choose another --out, or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_run(pipe, out: str | Path, base_model: str, seconds: float | None = None, overwrite: bool = False) -> Path:
    """Write the run folder of a pipeline quantized by :func:`dmquant.quantize`."""
    from accelerate import PartialState

    state = PartialState()
    if not state.is_main_process:  # under accelerate, the main process writes the run folder
        state.wait_for_everyone()
        return Path(out)
    info = getattr(pipe, "dmquant", None)
    if info is None:
        raise DMQuantError("this pipeline was not quantized by dmquant: call dmquant.quantize(pipe, recipe) first")
    _, denoiser, _ = find_denoiser(pipe)
    run = {
        "format": RUN_FORMAT, "version": RUN_VERSION, "dmquant_version": __version__,
        "base_model": _portable(base_model), "recipe": info.config.name, "tag": info.config.tag,
        "denoiser": info.denoiser, "adapter": info.adapter,
        "quantized_layers": len(info.report.quantized), "excluded_layers": info.report.excluded,
        "attention_modules": len(info.report.attention), "calibration": info.calibration,
        "seconds": None if seconds is None else round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with atomic_folder(out, overwrite) as tmp:
        save_recipe(info.config, tmp / "recipe.yaml")
        save_quant_state(denoiser, tmp / "quant_state.safetensors")
        (tmp / "run.json").write_text(json.dumps(run, indent=2))
        (tmp / "summary.md").write_text(_summary(run))
    state.wait_for_everyone()
    return Path(out)


def _portable(spec: str) -> str:
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def _summary(run: dict) -> str:
    calib = run["calibration"] or {}
    return "\n".join([
        f"# dmquant run: {run['recipe']} ({run['tag']})", "",
        f"- base model: `{run['base_model']}`",
        f"- denoiser: `{run['denoiser']}` (adapter `{run['adapter']}`)",
        f"- quantized layers: {run['quantized_layers']}; kept in full precision: {len(run['excluded_layers'])}",
        f"- quantized attention modules: {run['attention_modules']}",
        f"- calibration: {calib.get('prompts', 0)} prompts, steps {calib.get('steps', [])} of "
        f"{calib.get('num_inference_steps', '-')}, {calib.get('denoiser_calls', 0)} denoiser calls",
        f"- time: {run['seconds']} s", "",
    ])


def read_run(folder: str | Path) -> dict:
    path = Path(folder) / "run.json"
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DMQuantError(f"{path} is missing or damaged ({exc}): calibrate the run again") from exc
    if run.get("format") != RUN_FORMAT:
        raise DMQuantError(f"{folder} is not a dmquant run folder: pass the --out folder of `dmquant calibrate`")
    if int(run.get("version", 0)) > RUN_VERSION:
        raise DMQuantError(f"{folder} was written by a newer dmquant (run format {run['version']}): upgrade dmquant")
    return run


def load_run(folder: str | Path, device: str = "cpu"):
    """Rebuild the quantized pipeline of a run folder (base model + recipe + stored statistics)."""
    folder = Path(folder)
    run = read_run(folder)
    pipe = load_pipeline(run["base_model"], device=device)
    config = load_recipe(folder / "recipe.yaml")
    info = apply_recipe(pipe, config)
    info.calibration = run.get("calibration") or {}
    _, denoiser, _ = find_denoiser(pipe)
    load_quant_state(denoiser, folder / "quant_state.safetensors")
    return pipe
