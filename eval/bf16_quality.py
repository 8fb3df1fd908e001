"""Image quality of quantized models that compute in bfloat16 (README "Recipes": on a CPU with AMX, quantize the
pipeline in bfloat16), against the same model's float32 images.

Rows per (model, guidance): ``bf16`` (the pipeline in bfloat16, nothing quantized), and per recipe ``<recipe>``
(float32 pipeline, quantized and frozen) and ``<recipe>-bf16`` (the pipeline moved to bfloat16 first, then
quantized and frozen: what runs on the CPU's AMX units). PSNR against the float32 images of eval/robustness.py
(same prompts and seeds), CLIP of the judge relative to float32's with a paired 95% interval, and the paired
PSNR difference of ``<recipe>-bf16`` against ``<recipe>``. Calibrated recipes use the first 64 ``terse`` prompts
of eval/robustness.py at the same guidance scale. Results are cached in eval/bf16/ (one JSON per row).

    OMP_NUM_THREADS=1 python eval/bf16_quality.py --models sd,dit --guidance 7.5 --recipes w8a8,w8a8-static
    python eval/bf16_quality.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import dmquant
from dmquant.config import load_recipe
from dmquant.metrics.fidelity import paired_difference

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "bf16"
sys.path.insert(0, str(ROOT))
import robustness as R  # noqa: E402


def build(short: str, method: str, guidance: float):
    """The pipeline of ``method`` (``bf16`` or ``<recipe>[-bf16]``), quantized and frozen where it names a recipe."""
    pipe = R.load(short)
    recipe = method.removesuffix("-bf16")
    if method.endswith("-bf16") or method == "bf16":
        pipe.to(torch.bfloat16)
    if method == "bf16":
        return pipe
    config, kind = load_recipe(recipe), R.MODELS[short][1]
    prompts = R.model_inputs(pipe, kind, R.calibration_prompts("terse", kind)[:64]) \
        if config.needs_calibration_data else None
    dmquant.quantize(pipe, config, prompts=prompts, progress=False, guidance_scale=guidance)
    dmquant.freeze(pipe)
    return pipe


def run_row(short: str, guidance: float, method: str, n: int, force: bool = False) -> dict:
    from dmquant.metrics.clip_score import clip_scores_per_image
    from dmquant.metrics.fidelity import psnr_per_image
    from dmquant.zoo.judge import JUDGE

    weights = R.fingerprint(short)
    path = OUT / f"{short}-{weights}-g{guidance:g}-{method}-{n}.json"
    if path.is_file() and not force:
        return json.loads(path.read_text())
    kind = R.MODELS[short][1]
    ref = R.reference(short, guidance, n, weights)
    prompts = R.eval_prompts(kind, n)
    pipe = build(short, method, guidance)
    images = R.generate(pipe, R.model_inputs(pipe, kind, prompts), guidance)
    psnr = psnr_per_image(images, ref)
    row = {"model": short, "weights": weights, "guidance": guidance, "method": method, "num_images": n,
           "threads": torch.get_num_threads(), "psnr": float(np.mean(psnr)),
           "psnr_per_image": [None if not np.isfinite(v) else round(float(v), 4) for v in psnr],
           "clip_per_image": [round(v, 3) for v in clip_scores_per_image(images, prompts, JUDGE, "cpu")],
           "clip_per_image_fp": [round(v, 3) for v in clip_scores_per_image(ref, prompts, JUDGE, "cpu")]}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1) + "\n")
    return row


def _array(values) -> np.ndarray:
    return np.array([np.inf if v is None else v for v in values], dtype=np.float64)


def table(n: int) -> None:
    rows = [json.loads(f.read_text()) for f in sorted(OUT.glob(f"*-{n}.json"))]
    by_cell: dict[tuple, dict] = {}
    for r in rows:
        by_cell.setdefault((r["model"], r["guidance"]), {})[r["method"]] = r
    print("| model | CFG | method | PSNR vs float32 (dB) | CLIP Δ% [95%] | bf16 - float32 model, paired (dB) [95%] |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (model, guidance), methods in sorted(by_cell.items()):
        for name, r in sorted(methods.items()):
            _, c, lo, hi = R.clip_relative(r)
            paired = ""
            base = methods.get(name.removesuffix("-bf16")) if name.endswith("-bf16") else None
            if base is not None:
                d = paired_difference(_array(r["psnr_per_image"]), _array(base["psnr_per_image"]))
                paired = f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
            psnr = "inf" if not np.isfinite(r["psnr"]) else f"{r['psnr']:.2f}"
            print(f"| {model} | {guidance:g} | {name} | {psnr} | {c:+.2f} [{lo:+.2f}, {hi:+.2f}] | {paired} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd,dit")
    p.add_argument("--guidance", default="7.5")
    p.add_argument("--recipes", default="w8a8,w8a8-static")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--table", action="store_true")
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    if a.table:
        table(a.num_images)
        return
    torch.set_num_threads(1)
    recipes = a.recipes.split(",")
    methods = ["bf16", *[m for r in recipes for m in (r, f"{r}-bf16")]]
    for short in a.models.split(","):
        for guidance in (float(g) for g in a.guidance.split(",")):
            for method in methods:
                r = run_row(short, guidance, method, a.num_images, a.force)
                c = R.clip_relative(r)[1]
                print(f"{short} g{guidance:g} {method}: PSNR {r['psnr']:.2f} dB, CLIP {c:+.2f}%", flush=True)


if __name__ == "__main__":
    main()
