"""Ablation of the time-dimension techniques on the zoo (issue 4), under the protocol of eval/README.md.

Each variant is the naive baseline (min-max ranges, one static range per tensor, no split,
round-to-nearest, uniform calibration steps) with one technique switched on, or a shipped recipe.
Generation follows eval/README.md (DDIM 25 steps, guidance 5.0, image i from seed i, batch 16,
held-out prompts for SD, training-pair captions for the class-conditioned DiT); the metrics are the
judge's CLIP score and PSNR / SSIM against the full-precision images of the same seeds.

    OMP_NUM_THREADS=1 python eval/ablate_time.py --models sd --bits W4A8 --variants naive,time-step
    python eval/ablate_time.py --table          # eval/ablation/*.json -> the table printed as markdown
    python eval/ablate_time.py --plot           # eval/time_ranges.png (per-step ranges of a few layers)

Results are cached per run in eval/ablation/<model>-<weights>-<bits>-<variant>-<n>.json (delete to rerun),
where <weights> fingerprints the zoo denoiser's weights file, so retrained zoo weights start afresh
(the full-precision reference images are cached under the same fingerprint).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

import dmquant
from dmquant.config import QuantConfig, load_recipe

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "ablation"
MODELS = {"sd": "tiny-shapes-sd", "dit": "tiny-shapes-dit", "flux": "tiny-shapes-flux"}
TEXT_MODELS = ("sd", "flux")  # text-conditioned: held-out captions (the DiT is class-conditioned)
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A6": (4, 6)}
VARIANTS = {
    "naive": {},
    "sampler-normal": {"calibration": {"sampler": {"kind": "normal", "mean": 0.4, "std": 0.4}}},
    "sampler-beta": {"calibration": {"sampler": {"kind": "beta", "alpha": 2.0, "beta": 2.0}}},
    "sampler-all": {"calibration": {"sampler": "all"}},
    "sampler-progressive": {"calibration": {"sampler": {"kind": "progressive", "rounds": 1}}},
    "time-step": {"time": {"mode": "step"}, "calibration": {"sampler": "all"}},
    "time-interval4": {"time": {"mode": "interval", "num_intervals": 4}, "calibration": {"sampler": "all"}},
    "time-learned": {"time": {"mode": "learned"}, "calibration": {"sampler": "all"}},
    "split": {"split": {}},
    "adaround-layer": {"reconstruction": {"unit": "layer", "learn_act_scales": False}},
    "brecq-block": {"reconstruction": {"unit": "block", "learn_act_scales": False}},
    "brecq-block-lsq": {"reconstruction": {"unit": "block", "learn_act_scales": True}},
}


def naive_recipe(bits: str, variant: str, calib_prompts: int) -> QuantConfig:
    wb, ab = BITS[bits]
    data = {"name": f"{bits}-{variant}",
            "weights": {"bits": wb, "symmetric": True, "granularity": "channel", "method": "minmax"},
            "activations": {"bits": ab, "symmetric": False, "granularity": "tensor", "method": "minmax"},
            "attention": {"bits": 8, "probs_bits": None, "method": "minmax"},
            "calibration": {"sampler": "uniform", "num_timesteps": 8, "num_inference_steps": 25,
                            "batch_size": 8, "max_prompts": calib_prompts}}
    for key, value in VARIANTS[variant].items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) and key in data else value
    return QuantConfig.from_dict(data)


def recipe_for(bits: str, variant: str, calib_prompts: int) -> QuantConfig:
    if variant.startswith("recipe:"):
        return load_recipe(variant.split(":", 1)[1])
    return naive_recipe(bits, variant, calib_prompts)


def prompts_for(model: str, n: int) -> tuple[list, list[str]]:
    """(calibration prompts, evaluation prompts) of the protocol."""
    from dmquant.prompts import read_prompts

    calib = read_prompts(ROOT.parent / "calib" / "shapes_calib.txt")
    if model in TEXT_MODELS:
        return calib, read_prompts(ROOT.parent / "calib" / "shapes_eval.txt", n)
    single = [p for p in calib if " and " not in p]
    return single, single[:n]


def calib_inputs(pipe, model: str, prompts: list) -> list:
    if model in TEXT_MODELS:
        return prompts
    from dmquant.diffusers_io import class_id

    return [class_id(pipe, p) for p in prompts]


def generate(pipe, prompts):
    from dmquant.generation import GenerationConfig
    from dmquant.generation import generate as gen

    return gen(pipe, prompts, GenerationConfig(progress=False), distributed=False)


def fingerprint(model: str) -> str:
    """Short hash of the zoo denoiser's weights (results of other weights are never mixed)."""
    import hashlib

    folder = dmquant.zoo.path(MODELS[model])
    files = sorted(folder.glob("*/diffusion_pytorch_model.safetensors"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:10]


def reference_images(model: str, n: int, weights: str, out: Path = OUT):
    path = out / f"{model}-{weights}-fp-{n}.npz"
    if path.is_file():
        return np.load(path)["images"]
    _, prompts = prompts_for(model, n)
    images = generate(dmquant.zoo.load(MODELS[model]), prompts)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images)
    return images


def run_one(model: str, bits: str, variant: str, n: int, calib_prompts: int, out: Path = OUT) -> dict:
    config = recipe_for(bits, variant, calib_prompts)
    label = "recipe_" + Path(variant.split(":", 1)[1]).stem if variant.startswith("recipe:") else variant
    return run_config(model, config, variant, label, n, calib_prompts, out=out)


def run_config(model: str, config: QuantConfig, variant: str, label: str, n: int, calib_prompts: int,
               fid: bool = False, out: Path = OUT) -> dict:
    """Quantize the zoo model with ``config``, generate ``n`` images by the protocol, measure; cached
    in <out>/<model>-<weights>-<bits>-<label>-<n>.json (eval/ablation by default). ``fid``: add the FID (judge features)
    against the procedural ground truth of the prompts, and that of the FP images."""
    from dmquant.metrics.clip_score import clip_scores_per_image, compute_clip_score
    from dmquant.metrics.fidelity import fidelity_metrics, psnr_per_image
    from dmquant.zoo.judge import JUDGE as ZOO_CLIP

    weights = fingerprint(model)
    pipe = dmquant.zoo.load(MODELS[model])
    if fingerprint(model) != weights:
        raise RuntimeError(f"the {model} zoo weights changed while loading: run again")
    path = out / f"{model}-{weights}-{config.tag}-{label}-{n}.json"
    digest = config.digest()
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("config_digest", digest) != digest:  # rows from before the digest existed are taken
            raise SystemExit(f"{path.name} was measured with another recipe under the label {label!r} (a recipe "
                             "it modifies changed since): use a new --out folder")
        return cached
    ref = reference_images(model, n, weights, out)
    calib, prompts = prompts_for(model, n)
    start = time.perf_counter()
    kwargs = {"guidance_scale": 5.0}
    dmquant.quantize(pipe, config, prompts=calib_inputs(pipe, model, calib)[: config.calibration.max_prompts],
                     progress=False, **kwargs)
    seconds = time.perf_counter() - start
    images = generate(pipe, prompts)
    result = {"model": model, "weights": weights, "bits": config.tag, "variant": variant, "config_digest": digest,
              "num_images": n, "calibration_seconds": round(seconds, 1),
              "clip_score": compute_clip_score(images, prompts, ZOO_CLIP, "cpu"),
              "clip_score_fp": compute_clip_score(ref, prompts, ZOO_CLIP, "cpu"),
              **fidelity_metrics(images, ref), "calibration": _jsonable(pipe.dmquant.calibration),
              # per image (None: identical to FP's), for paired comparisons of two rows (ablate_mixed --paired)
              "psnr_per_image": [round(float(v), 4) if np.isfinite(v) else None for v in psnr_per_image(images, ref)],
              "clip_per_image": [round(v, 4) for v in clip_scores_per_image(images, prompts, ZOO_CLIP, "cpu")],
              "clip_per_image_fp": [round(v, 4) for v in clip_scores_per_image(ref, prompts, ZOO_CLIP, "cpu")],
              "outliers": {k: v for k, v in pipe.dmquant.outliers.items() if k not in ("alpha", "left_out")}}
    out.mkdir(parents=True, exist_ok=True)
    if fid:
        from dmquant.metrics import render_prompts
        from dmquant.metrics.fid import fid_features, frechet_distance

        # the judge's features of the images, FP's and the prompts' ground truth: FID from them is compute_fid's,
        # and they are kept (features_path) for paired intervals between rows (ablate_mixed --paired)
        feats = {k: fid_features(v, ZOO_CLIP) for k, v in
                 (("images", images), ("fp", ref), ("real", render_prompts(prompts)))}
        result["fid"] = frechet_distance(feats["images"], feats["real"])
        result["fid_fp"] = frechet_distance(feats["fp"], feats["real"])
        save_file({k: v.astype(np.float32) for k, v in feats.items()}, str(features_path(path)))
        result["fid_features_file"] = features_path(path).name
    path.write_text(json.dumps(result, indent=1))
    return result


def features_path(row: Path) -> Path:
    """Where a row measured with ``fid`` keeps its per-image FID features (images, FP's, the ground truth's)."""
    return row.with_suffix(".fid.safetensors")


def current_rows(out: Path) -> list[dict]:
    """The cached results in ``out`` that were measured on the current zoo weights."""
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    current = {m: fingerprint(m) for m in MODELS}
    return [r for r in rows if r.get("weights") == current[r["model"]]]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def table(rows: list[dict]) -> str:
    lines = ["| model | bits | variant | images | CLIP (FP) | CLIP Δ% | PSNR dB | SSIM | calib s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["model"], r["bits"], r["variant"] != "naive", r["variant"], r["num_images"])):
        delta = 100 * (r["clip_score"] - r["clip_score_fp"]) / r["clip_score_fp"]
        lines.append(f"| {r['model']} | {r['bits']} | {r['variant']} | {r['num_images']} "
                     f"| {r['clip_score']:.2f} ({r['clip_score_fp']:.2f}) "
                     f"| {delta:+.2f} | {r['psnr_vs_reference']:.2f} | {r['ssim_vs_reference']:.4f} "
                     f"| {r['calibration_seconds']:.0f} |")
    return "\n".join(lines)


def collect_ranges(layers: list[str], num_prompts: int = 8) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(timesteps, {layer: [steps, 2] input (min, max)}) of tiny-shapes-sd over a 25-step DDIM run."""
    from dmquant.diffusers_io import scheduler_timesteps
    from dmquant.models.adapters import find_denoiser

    pipe = dmquant.zoo.load(MODELS["sd"])
    _, unet, _ = find_denoiser(pipe)
    ranges = {name: [] for name in layers}
    handles = [unet.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: ranges[n].append((float(args[0].min()), float(args[0].max())))) for n in layers]
    calib, _ = prompts_for("sd", 1)
    pipe(calib[:num_prompts], num_inference_steps=25, guidance_scale=5.0,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    for h in handles:
        h.remove()
    t = scheduler_timesteps(pipe.scheduler, 25).numpy()
    return t, {n: np.array(v) for n, v in ranges.items()}


PANEL_W, PANEL_H, PANEL_TOP = 318, 210, 40


def _draw_panel(draw, x0: int, name: str, t: np.ndarray, r: np.ndarray) -> None:
    """One layer: per-step min (blue) and max (red), dotted lines at the static min-max range."""
    lo, hi = r[:, 0], r[:, 1]
    vmin, vmax = float(lo.min()), float(hi.max())

    def px(k: int, v: float) -> tuple[float, float]:
        return x0 + PANEL_W * k / (len(t) - 1), PANEL_TOP + PANEL_H * (vmax - v) / (vmax - vmin)

    draw.rectangle([x0, PANEL_TOP, x0 + PANEL_W, PANEL_TOP + PANEL_H], outline="gray")
    for v, color in ((vmax, (255, 150, 150)), (vmin, (150, 150, 255)), (0.0, (200, 200, 200))):
        for x in range(x0, x0 + PANEL_W, 6):
            draw.line([x, px(0, v)[1], x + 3, px(0, v)[1]], fill=color)
    for series, color in ((hi, "red"), (lo, "blue")):
        draw.line([px(k, v) for k, v in enumerate(series)], fill=color, width=2)
    bottom = PANEL_TOP + PANEL_H
    draw.text((x0 + 3, PANEL_TOP + 3), f"max {vmax:.2f}", fill="black")
    draw.text((x0 + 3, bottom - 13), f"min {vmin:.2f}", fill="black")
    draw.text((x0, bottom + 4), name, fill="black")
    draw.text((x0, bottom + 16), f"t={t[0]:.0f}", fill="black")
    draw.text((x0 + PANEL_W - 30, bottom + 16), f"t={t[-1]:.0f}", fill="black")


def plot_ranges(out: Path) -> None:
    """PNG of per-step input ranges of a few layers (PIL only: no plotting library needed)."""
    from PIL import Image, ImageDraw

    layers = ["down_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv2",
              "up_blocks.1.resnets.0.conv1", "up_blocks.2.attentions.2.proj_out"]
    t, ranges = collect_ranges(layers)
    img = Image.new("RGB", ((PANEL_W + 12) * len(layers) + 12, PANEL_TOP + PANEL_H + 40), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 4), "tiny-shapes-sd: input min (blue) / max (red) of a layer at each of 25 DDIM steps, "
              "8 prompts, CFG 5; dotted: the one static min-max range over all steps", fill="black")
    for i, name in enumerate(layers):
        _draw_panel(draw, 12 + i * (PANEL_W + 12), name, t, ranges[name])
    img.save(out)
    spans = {n: float((r[:, 1] - r[:, 0]).max() / (r[:, 1] - r[:, 0]).min()) for n, r in ranges.items()}
    print("largest / smallest per-step range width:", {n: round(v, 2) for n, v in spans.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd,dit")
    p.add_argument("--bits", default="W4A8,W8A8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--calib-prompts", type=int, default=32)
    p.add_argument("--table", action="store_true")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--out", type=Path, default=OUT, help="cache folder (a fresh one reruns every row)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.plot:
        plot_ranges(ROOT / "time_ranges.png")
        return
    if args.table:
        print(table(current_rows(args.out)))
        return
    for model in args.models.split(","):
        for bits in args.bits.split(","):
            for variant in args.variants.split(","):
                r = run_one(model, bits, variant, args.num_images, args.calib_prompts, args.out)
                print(f"{model} {r['bits']} {variant}: CLIP {r['clip_score']:.2f} (FP {r['clip_score_fp']:.2f}) "
                      f"PSNR {r['psnr_vs_reference']:.2f} calib {r['calibration_seconds']}s", flush=True)


if __name__ == "__main__":
    main()
