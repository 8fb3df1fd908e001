"""Issue 12's acceptance check: for every recipe on both zoo models, the simulation, the frozen model
and the saved-then-loaded model (in a fresh process) generate the same images.

    python eval/check_roundtrip.py [--models sd,dit] [--recipes w8a8,...] [--num-images 4] [--steps 10]

Per recipe and model: quantize (calibration on the zoo's calibration prompts), generate ``--num-images``
images from the held-out prompts (seed + i, guidance 5, the protocol of eval/README.md), save the quantized pipeline, load it in a new Python
process and generate again, freeze the in-memory simulation and generate again. Prints a table:
``frozen==sim`` (bit for bit) or the PSNR in dB of frozen vs simulation (integer compute differs in
float rounding), and ``loaded==frozen`` (must be bit for bit). Writes eval/check_roundtrip.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dmquant
from dmquant import zoo
from dmquant.diffusers_io import prompts_for_pipeline
from dmquant.generation import GenerationConfig, generate
from dmquant.prompts import read_prompts

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"sd": "tiny-shapes-sd", "dit": "tiny-shapes-dit"}
RECIPES = ("w8a8", "w4a8", "w4a8-rtn", "w4a16", "w8a8-sage", "w4a8-time", "w8a8-time", "w4a4", "w4a4-g64",
           "w4a8-ptqd")
SD_ONLY = {"w4a4-g64": "dit"}  # the 32-wide tiny UNet cannot take groups of 64: checked on the DiT only


def _prompts(model: str, n: int, kind: str) -> list:
    """The protocol of eval/README.md: SD evaluates held-out captions; the DiT (no class for held-out
    pairs) calibrates and evaluates on single-object training captions."""
    if model == "sd":
        return read_prompts(ROOT / "calib" / ("shapes_calib.txt" if kind == "calib" else "shapes_eval.txt"))[:n]
    single = [p for p in read_prompts(ROOT / "calib" / "shapes_calib.txt") if " and " not in p]
    return single[:n] if kind == "calib" else single[-n:]


def _images(pipe, prompts: list, steps: int) -> np.ndarray:
    return generate(pipe, prompts, GenerationConfig(steps, 5.0, 0, batch_size=len(prompts), progress=False),
                    distributed=False)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _median_image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """The median over images of each image's PSNR (one image that diverges does not set it)."""
    return float(np.median([_psnr(x, y) for x, y in zip(a, b)]))


def load_and_generate(folder: str, out: str, n: int, steps: int, model: str) -> None:
    """Run in a fresh process: load the saved folder, generate, store the images."""
    from dmquant.loading import load_pipeline

    pipe = load_pipeline(folder)
    np.save(out, _images(pipe, _prompts(model, n, "eval"), steps))


def check(model: str, recipe: str, n: int, steps: int, calib: int) -> dict:
    pipe = zoo.load(MODELS[model])
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    calib_prompts = prompts_for_pipeline(pipe, _prompts(model, calib, "calib"))
    dmquant.quantize(pipe, recipe, calib_prompts, num_inference_steps=steps, progress=False)
    seconds = time.perf_counter() - start
    sim = _images(pipe, _prompts(model, n, "eval"), steps)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(Path(tmp) / "q")
        out = Path(tmp) / "loaded.npy"
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'eval')!r}); import check_roundtrip as c; "
                f"c.load_and_generate({str(Path(tmp) / 'q')!r}, {str(out)!r}, {n}, {steps}, {model!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
        loaded = np.load(out)
    dmquant.freeze(pipe)
    frozen = _images(pipe, _prompts(model, n, "eval"), steps)
    return {"model": MODELS[model], "recipe": recipe, "calibration_s": round(seconds, 1),
            "frozen_equals_sim": bool(np.array_equal(frozen, sim)), "psnr_frozen_vs_sim": _psnr(frozen, sim),
            "median_image_psnr_frozen_vs_sim": _median_image_psnr(frozen, sim),
            "loaded_equals_frozen": bool(np.array_equal(loaded, frozen)), "psnr_loaded_vs_frozen": _psnr(loaded, frozen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd,dit")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--num-calib-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "eval" / "check_roundtrip.json"))
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            if SD_ONLY.get(recipe, model) != model:
                continue
            row = check(model, recipe, args.num_images, args.steps, args.num_calib_prompts)
            rows.append(row)
            print(f"{row['model']:16s} {recipe:10s} frozen==sim {row['frozen_equals_sim']!s:5s} "
                  f"({row['psnr_frozen_vs_sim']:.2f} dB, median image {row['median_image_psnr_frozen_vs_sim']:.2f} dB)  loaded==frozen {row['loaded_equals_frozen']!s:5s} "
                  f"calibration {row['calibration_s']:.0f} s", flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
