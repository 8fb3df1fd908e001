"""Core-engine check: denoiser SQNR of the shipped recipes on tiny random-weight SD and DiT pipelines.

Calibrates each recipe on 4 prompts (10 DDIM steps, 5 recorded), then compares the quantized and
full-precision denoiser outputs on inputs recorded from held-out prompts at steps 3 and 6.

    OMP_NUM_THREADS=1 python eval/core_sqnr.py
    OMP_NUM_THREADS=1 python eval/core_sqnr.py --recipes w8a8,w8a8-minmax   # w8a8 with min-max ranges
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import dmquant
from dmquant.calibration.collect import collect_denoiser_inputs
from dmquant.calibration.records import CalibrationSet
from dmquant.models.adapters import find_denoiser
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_sd_pipeline
from dmquant.quantizers.affine import sqnr_db

CASES = {
    "tiny-random-sd": (build_tiny_sd_pipeline, ["a red circle", "a blue square", "green triangle", "white disk"],
                       ["a yellow star", "small green circle"], {"height": 16, "width": 16}),
    "tiny-random-dit": (build_tiny_dit_pipeline, [1, 2, 3, 4], [7, 8], {}),
}


def recipe_named(name: str):
    """A shipped recipe, or ``w8a8-minmax``: w8a8 with min-max instead of MSE activation/attention ranges."""
    if name != "w8a8-minmax":
        return name
    data = dmquant.load_recipe("w8a8").to_dict()
    data["activations"]["method"] = data["attention"]["method"] = "minmax"
    return {**data, "name": name}


def measure(model: str, recipe: str) -> list[float]:
    build, calib, held_out, kw = CASES[model]
    pipe = build()
    _, denoiser, _ = find_denoiser(pipe)
    with tempfile.TemporaryDirectory() as tmp:
        collect_denoiser_inputs(pipe, denoiser, held_out, [3, 6], tmp, 10, progress=False, call_kwargs=kw)
        calls = list(CalibrationSet(tmp).iter_calls())
    with torch.no_grad():
        refs = [denoiser(*a, **k)[0] for a, k in calls]
        dmquant.quantize(pipe, recipe_named(recipe), prompts=calib, num_inference_steps=10, num_timesteps=5, progress=False, **kw)
        return [sqnr_db(r, denoiser(*a, **k)[0]) for r, (a, k) in zip(refs, calls)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="w8a8,w4a8-rtn,w4a16")
    args = p.parse_args()
    print("| model | recipe | SQNR step 3 (dB) | SQNR step 6 (dB) |\n|---|---|---|---|")
    for model in CASES:
        for recipe in args.recipes.split(","):
            values = measure(model, recipe)
            print(f"| {model} | {recipe} | {values[0]:.1f} | {values[1]:.1f} |")


if __name__ == "__main__":
    main()
