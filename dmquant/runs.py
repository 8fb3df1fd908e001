"""Run folders: what ``dmquant calibrate`` writes.

A run folder is a saved quantized pipeline (diffusers layout, see :mod:`dmquant.pipeline`) plus
``run.json`` (base model, recipe, calibration summary), ``recipe.yaml`` and ``summary.md``.
Folders and images are written atomically: into a temporary sibling, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dmquant import __version__
from dmquant.errors import DMQuantError

RUN_FORMAT, RUN_VERSION = "dmquant-run", 1


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error."""
    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
        if old is not None:
            os.replace(out, old)  # the previous folder stays until the new one is in place
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_folder(out: str | Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise DMQuantError(f"output folder {out} exists already: choose another --out, or pass --overwrite")


def save_image_atomic(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 H x W x 3 image (format from the suffix) through a temporary sibling."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        Image.fromarray(np.asarray(image)).save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_run(pipe, out: str | Path, base_model: str, seconds: float | None = None, overwrite: bool = False) -> Path:
    """Save a pipeline quantized by :func:`dmquant.quantize` with its run description (under accelerate,
    call it on the main process only)."""
    info = getattr(pipe, "dmquant", None)
    if info is None:
        raise DMQuantError("this pipeline was not quantized by dmquant: call dmquant.quantize(pipe, recipe) first")
    run = {
        "format": RUN_FORMAT, "version": RUN_VERSION, "dmquant_version": __version__,
        "base_model": _portable(base_model), "recipe": info.config.name, "tag": info.config.tag,
        "denoiser": info.denoiser, "adapter": info.adapter,
        "quantized_layers": len(info.report.quantized), "excluded_layers": info.report.excluded,
        "attention_modules": len(info.report.attention), "calibration": info.calibration,
        "outliers": info.outliers,
        "seconds": None if seconds is None else round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    extra = {"run.json": json.dumps(run, indent=2), "summary.md": _summary(run),
             "recipe.yaml": yaml.safe_dump(info.config.to_dict(), sort_keys=False)}
    pipe.save_pretrained(out, overwrite=overwrite, extra_files=extra)
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
        *_outlier_lines(run.get("outliers") or {}, calib.get("correction")),
        f"- time: {run['seconds']} s", "",
        "Load it with `dmquant.load_quantized_pipeline(folder)` or `dmquant generate --model folder`.", "",
    ])


def _outlier_lines(outliers: dict, correction: dict | None) -> list[str]:
    lines = []
    if outliers:
        lines.append(f"- outlier branches: {outliers['layers']} layers (smoothed {outliers['smoothed']}, rotated "
                     f"{outliers['rotated']}, low-rank {outliers['low_rank']}, rank capped on {outliers['rank_capped']}); "
                     f"{outliers['branch_bytes'] / 2**20:.2f} MiB of branch tensors")
    if correction:
        lines.append(f"- noise correction: {correction['method']} fitted on {correction['prompts']} prompts at "
                     f"{correction['num_inference_steps']} steps (generate with that step count)")
    return lines
