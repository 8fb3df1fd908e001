"""Issue 16's LoRA acceptance on tiny-shapes-sd with the zoo LoRA (``tiny-shapes-sd-lora``, colors rotate).

    OMP_NUM_THREADS=1 python eval/check_lora.py [--num-images 200] [--recipes w8a8,w4a8] [--fp-only]
    OMP_NUM_THREADS=1 python eval/check_lora.py --recipes w8a8,w4a8,w4a8-rtn --requantized w4a8  # eval/check_lora.json

For the protocol of eval/README.md (held-out prompts of calib/shapes_eval.txt, image i with seed i, 25
DDIM steps, guidance 5), generates with FP, FP + LoRA, and for each recipe (calibrated once, without the
LoRA, on calib/shapes_calib.txt with the recipe's own calibration settings, as eval/ablate_*.py do) the
quantized model without and with the LoRA, loaded by the plain diffusers API
(``pipe.load_lora_weights(folder, adapter_name=...)``: nothing is re-quantized). Measures

- PSNR (``dmquant.metrics.fidelity.psnr``: per image, data range 1, averaged) of recipe vs FP and of
  recipe + LoRA vs FP + LoRA; the acceptance asks the second to be at most 1 dB below the first;
- the judge's effect rate (``dmquant.zoo.lora_effect.effect_rate``: how often it reads the rotated color)
  of every image set; the acceptance asks recipe + LoRA within 5 points of FP + LoRA;
- per-image PSNRs: the median of each set, and the mean paired difference (with LoRA - without) with a
  bootstrap 95% interval (the set's mean PSNR is pulled by the few images whose trajectory tips over);
- round trips on the first ``--roundtrip-images`` prompts: LoRA loaded with adapter weight 0
  (``set_adapters``), then unloaded (``unload_lora_weights``): each must give the no-LoRA images bit for bit.

``--requantized w4a8`` adds a diagnostic row: the recipe calibrated on the model with the LoRA fused into its
FP weights, against FP + LoRA (how close the recipe gets when the LoRA is part of what it calibrated).

Writes eval/check_lora.json (``--out``) and prints a markdown table. FP's images are cached as .npy in
``--cache`` (keyed by the LoRA's and the UNet's file hashes), so a later run with other recipes reuses them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

import dmquant
from dmquant import zoo
from dmquant.config import load_recipe
from dmquant.generation import GenerationConfig, generate
from dmquant.metrics.fidelity import paired_difference, psnr, psnr_per_image
from dmquant.prompts import read_prompts
from dmquant.zoo.lora_effect import LORA_NAME, effect_rate

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = "colors"


def fingerprint() -> str:
    """Short hash of the LoRA file and tiny-shapes-sd's UNet weights (the cache key)."""
    h = hashlib.sha256()
    for f in (zoo.lora_path(LORA_NAME) / "pytorch_lora_weights.safetensors",
              zoo.path("tiny-shapes-sd") / "unet" / "diffusion_pytorch_model.safetensors"):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


class Images:
    """Generates by the protocol, caching each named set as <cache>/<key>-<name>-<n>.npy."""

    def __init__(self, prompts: list[str], steps: int, cache: Path | None) -> None:
        self.prompts, self.cache = prompts, cache
        self.cfg = GenerationConfig(steps, 5.0, 0, batch_size=16, progress=False)
        self.key = f"{fingerprint()}-s{steps}"
        self.seconds: dict[str, float] = {}

    def __call__(self, pipe, name: str, n: int | None = None, cached: bool = True) -> np.ndarray:
        prompts = self.prompts[: n or len(self.prompts)]
        path = None if self.cache is None else self.cache / f"{self.key}-{name}-{len(prompts)}.npy"
        if cached and path is not None and path.is_file():
            return np.load(path)
        start = time.perf_counter()
        images = generate(pipe, prompts, self.cfg, distributed=False)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {len(prompts)} images in {self.seconds[name]:.0f}s", flush=True)
        if cached and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, images)
        return images


def quantized_pipe(recipe: str, fused: bool = False) -> tuple[object, float]:
    """tiny-shapes-sd with its UNet quantized by ``recipe`` (simulation), calibrated without the LoRA; with
    ``fused``, the LoRA is first merged into the FP weights (the model is re-quantized with the LoRA in it)."""
    pipe = zoo.load("tiny-shapes-sd")
    if fused:
        pipe.load_lora_weights(str(zoo.lora_path(LORA_NAME)), adapter_name=ADAPTER)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    config = load_recipe(recipe)
    calib = read_prompts(ROOT / "calib" / "shapes_calib.txt")[: config.calibration.max_prompts]
    start = time.perf_counter()
    dmquant.quantize(pipe, config, prompts=calib, progress=False, guidance_scale=5.0)
    return pipe, round(time.perf_counter() - start, 1)


def measure(pipe, label: str, gen: Images, roundtrip_n: int) -> dict[str, np.ndarray | bool]:
    """``label``'s images without and with the LoRA, and the round trips back to no LoRA (only FP's are
    cached: a quantized model's images depend on the code of the day)."""
    folder, cached = str(zoo.lora_path(LORA_NAME)), label == "fp"
    plain = gen(pipe, label, cached=cached)
    pipe.load_lora_weights(folder, adapter_name=ADAPTER)
    with_lora = gen(pipe, f"{label}+lora", cached=cached)
    pipe.set_adapters(ADAPTER, 0.0)
    weight_zero = gen(pipe, f"{label}+lora@0", roundtrip_n, cached=False)
    pipe.set_adapters(ADAPTER, 1.0)
    weight_one = gen(pipe, f"{label}+lora@1", roundtrip_n, cached=False)
    pipe.unload_lora_weights()
    unloaded = gen(pipe, f"{label}-unloaded", roundtrip_n, cached=False)
    return {
        "plain": plain,
        "lora": with_lora,
        "set_adapters_0_equals_plain": bool(np.array_equal(weight_zero, plain[:roundtrip_n])),
        "set_adapters_1_equals_lora": bool(np.array_equal(weight_one, with_lora[:roundtrip_n])),
        "unload_equals_plain": bool(np.array_equal(unloaded, plain[:roundtrip_n])),
    }


def summarize(run: dict, judge, prompts: list[str], fp: dict | None = None, fp_row: dict | None = None) -> dict:
    """One table row: the round trips, the judge's effect rates, and for a recipe (``fp``, ``fp_row``: the
    FP run and its row) the PSNRs against FP and the acceptance checks."""
    row = {k: v for k, v in run.items() if isinstance(v, bool)}
    row["effect_plain"] = effect_rate(judge, run["plain"], prompts)
    row["effect_lora"] = effect_rate(judge, run["lora"], prompts)
    if fp is None:
        row["psnr_lora_vs_plain"] = psnr(run["lora"], run["plain"])
        return row
    row["psnr_vs_fp"] = psnr(run["plain"], fp["plain"])
    row["psnr_lora_vs_fp_lora"] = psnr(run["lora"], fp["lora"])
    row["psnr_delta"] = row["psnr_lora_vs_fp_lora"] - row["psnr_vs_fp"]
    plain, lora = psnr_per_image(run["plain"], fp["plain"]), psnr_per_image(run["lora"], fp["lora"])
    row["median_image_psnr_vs_fp"] = float(np.median(plain))
    row["median_image_psnr_lora_vs_fp_lora"] = float(np.median(lora))
    row["image_psnr_delta"] = paired_difference(lora, plain)
    row["effect_delta_points"] = 100 * (row["effect_lora"]["effect"] - fp_row["effect_lora"]["effect"])
    row["meets_psnr"] = row["psnr_delta"] >= -1.0
    row["meets_effect"] = abs(row["effect_delta_points"]) <= 5.0
    return row


def requantized_row(recipe: str, gen: Images, judge, prompts: list[str], fp: dict, run: dict) -> dict:
    """``recipe`` calibrated on the model with the LoRA fused into its weights, against FP + LoRA: what the
    same recipe reaches when the LoRA is part of the model it calibrates (not the acceptance's setting).
    ``run``: the recipe's own measurement (its no-LoRA images give the paired delta)."""
    pipe, seconds = quantized_pipe(recipe, fused=True)
    images = gen(pipe, f"{recipe}-fused", cached=False)
    fused = psnr_per_image(images, fp["lora"])
    return {"psnr_vs_fp_lora": psnr(images, fp["lora"]), "median_image_psnr_vs_fp_lora": float(np.median(fused)),
            "image_psnr_delta": paired_difference(fused, psnr_per_image(run["plain"], fp["plain"])),
            "effect": effect_rate(judge, images, prompts), "calibration_seconds": seconds}


def table(report: dict) -> str:
    lines = ["| model | PSNR vs FP (no LoRA) | PSNR +LoRA vs FP+LoRA | delta dB (95% CI) | median image PSNR "
             "without / with | effect, no LoRA | effect, +LoRA | set_adapters 0 / 1, unload bit for bit | calib s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, row in report["rows"].items():
        trips = " / ".join("yes" if row[k] else "NO" for k in
                           ("set_adapters_0_equals_plain", "set_adapters_1_equals_lora", "unload_equals_plain"))
        if label == "fp":
            cells = ["-"] * 4
        else:
            lo, hi = row["image_psnr_delta"]["ci95"]
            cells = [f"{row['psnr_vs_fp']:.2f}", f"{row['psnr_lora_vs_fp_lora']:.2f}",
                     f"{row['psnr_delta']:+.2f} ({lo:+.2f}, {hi:+.2f})",
                     f"{row['median_image_psnr_vs_fp']:.2f} / {row['median_image_psnr_lora_vs_fp_lora']:.2f}"]
        lines.append(f"| {label} | {' | '.join(cells)} | {row['effect_plain']['effect']:.3f} | "
                     f"{row['effect_lora']['effect']:.3f} | {trips} | {row.get('calibration_seconds', '-')} |")
    for recipe, row in report.get("requantized", {}).items():
        lo, hi = row["image_psnr_delta"]["ci95"]
        lines.append(f"| {recipe}, LoRA fused before calibration | - | {row['psnr_vs_fp_lora']:.2f} | "
                     f"{row['image_psnr_delta']['mean']:+.2f} ({lo:+.2f}, {hi:+.2f}) | - / "
                     f"{row['median_image_psnr_vs_fp_lora']:.2f} | - | {row['effect']['effect']:.3f} | - | "
                     f"{row['calibration_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--recipes", default="w8a8,w4a8")
    p.add_argument("--fp-only", action="store_true", help="only FP and FP + LoRA (no quantized model)")
    p.add_argument("--requantized", default="",
                   help="recipes (among --recipes) to calibrate again with the LoRA fused into the FP weights, "
                        "a diagnostic row against FP + LoRA")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--roundtrip-images", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("/tmp/dmquant_check_lora"))
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "check_lora.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = read_prompts(ROOT / "calib" / "shapes_eval.txt", args.num_images)
    gen = Images(prompts, args.steps, args.cache)
    judge = zoo.load("tiny-shapes-clip")
    print("fp", flush=True)
    fp = measure(zoo.load("tiny-shapes-sd"), "fp", gen, args.roundtrip_images)
    rows, requantized = {"fp": summarize(fp, judge, prompts)}, {}
    recipes = [] if args.fp_only else args.recipes.split(",")
    for recipe in recipes:
        print(recipe, flush=True)
        pipe, seconds = quantized_pipe(recipe)
        run = measure(pipe, recipe, gen, args.roundtrip_images)
        rows[recipe] = {**summarize(run, judge, prompts, fp, rows["fp"]), "calibration_seconds": seconds}
        if recipe in args.requantized.split(","):
            print(f"{recipe}, LoRA fused before calibration", flush=True)
            requantized[recipe] = requantized_row(recipe, gen, judge, prompts, fp, run)
    report = {"lora": LORA_NAME, "num_images": args.num_images, "roundtrip_images": args.roundtrip_images,
              "protocol": gen.cfg.to_dict(), "threads": args.threads, "generation_seconds": gen.seconds,
              "rows": rows, "requantized": requantized}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
