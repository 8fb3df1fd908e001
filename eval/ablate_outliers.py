"""Ablation of the outlier and noise-correction techniques on the zoo (issue 5), protocol of eval/README.md.

W4A4 rows start from a plain W4A4 baseline: 4-bit weights per group of 32 (min-max, round to nearest),
4-bit activations quantized on the fly per group of 32 channels of each token (symmetric, as the
W4A4 kernel does), attention in full precision; each row switches one technique on (smoothing with a
fixed or searched alpha, Hadamard rotation, the SVD low-rank branch of rank r) or a combination.
W4A8 rows compare a recipe with and without noise correction (PTQD, step-wise bias) and with the
low-rank branch. Generation, CLIP (zoo judge) and PSNR/SSIM against FP follow eval/ablate_time.py;
``--fid`` rows add the FID with judge features against the procedural ground truth of the prompts.

    OMP_NUM_THREADS=1 python eval/ablate_outliers.py --models sd --variants w4a4-base,w4a4-lowrank32
    OMP_NUM_THREADS=1 python eval/ablate_outliers.py --models sd --variants w4a8rtn-base,w4a8rtn-ptqd \
        --num-images 200 --fid
    python eval/ablate_outliers.py --table      # eval/ablation_outliers/*.json -> markdown table

Results are cached in eval/ablation_outliers/ (same naming as eval/ablation/). ``--memory`` prints the
bytes of the low-rank branch for each rank against the 4-bit weights, on the zoo models and on the
full-size SD1.5 UNet architecture (exact counts from the layer shapes; no weights are needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_time import MODELS, current_rows, prompts_for, run_config  # noqa: E402

from dmquant.config import QuantConfig, load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "ablation_outliers"
RANKS = (0, 8, 16, 32, 64)
GROUP = 32


def w4a4_base() -> dict:
    return {"weights": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": GROUP, "method": "minmax"},
            "activations": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": GROUP},
            "attention": None,
            "calibration": {"sampler": "uniform", "num_timesteps": 8, "num_inference_steps": 25, "batch_size": 8,
                            "max_prompts": 32}}


W4A4 = {
    "w4a4-base": {},
    "w4a4-act-token": {"activations": {"bits": 4, "symmetric": True, "granularity": "token"}},
    "w4a4-weights-mse": {"weights": {"method": "mse"}},
    "w4a4-smooth0.5": {"smoothing": {"alpha": 0.5}},
    "w4a4-smooth-search": {"smoothing": {"alpha": None}},
    "w4a4-rotation": {"rotation": {"seed": 0}},
    **{f"w4a4-lowrank{r}": {"low_rank": {"rank": r}} for r in RANKS if r},
    "w4a4-smooth0.5-lowrank32": {"smoothing": {"alpha": 0.5}, "low_rank": {"rank": 32}},
    "w4a4-smooth-search-lowrank32": {"smoothing": {"alpha": None}, "low_rank": {"rank": 32}},
    "w4a4-rotation-lowrank32": {"rotation": {"seed": 0}, "low_rank": {"rank": 32}},
}
CORRECTIONS = {"base": None, "ptqd": {"method": "ptqd"}, "bias": {"method": "bias"}}


def variant_config(variant: str) -> QuantConfig:
    """A variant name: one of ``W4A4``, or ``<recipe>-<base|ptqd|bias|lowrank32|smooth0.5>`` on a
    shipped recipe (``w4a8rtn`` is the recipe ``w4a8-rtn``, ``w4a8brecq`` the recipe ``w4a8``), or
    ``recipe:<name>``."""
    if variant.startswith("recipe:"):
        return load_recipe(variant.split(":", 1)[1])
    if variant in W4A4:
        data = w4a4_base()
        for key, value in W4A4[variant].items():
            data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
        return QuantConfig.from_dict({"name": variant, **data})
    recipe, _, technique = variant.rpartition("-")
    data = load_recipe({"w4a8rtn": "w4a8-rtn", "w4a8brecq": "w4a8"}.get(recipe, recipe)).to_dict()
    data["name"] = variant
    if technique in CORRECTIONS:
        data["correction"] = CORRECTIONS[technique]
    elif technique == "lowrank32":
        data["low_rank"] = {"rank": 32}
    elif technique == "smooth0.5":
        data["smoothing"] = {"alpha": 0.5}
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return QuantConfig.from_dict(data)


def table(rows: list[dict]) -> str:
    lines = ["| model | bits | variant | images | CLIP (FP) | CLIP Δ% | PSNR dB | SSIM | FID (FP) | branch KiB | calib s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["model"], r["bits"], r["num_images"], r["variant"])):
        delta = 100 * (r["clip_score"] - r["clip_score_fp"]) / r["clip_score_fp"]
        fid = f"{r['fid']:.2f} ({r['fid_fp']:.2f})" if "fid" in r else ""
        branch = r.get("outliers", {}).get("branch_bytes")
        lines.append(f"| {r['model']} | {r['bits']} | {r['variant']} | {r['num_images']} "
                     f"| {r['clip_score']:.2f} ({r['clip_score_fp']:.2f}) | {delta:+.2f} "
                     f"| {r['psnr_vs_reference']:.2f} | {r['ssim_vs_reference']:.4f} | {fid} "
                     f"| {'' if branch is None else f'{branch / 1024:.0f}'} | {r['calibration_seconds']:.0f} |")
    return "\n".join(lines)


def branch_memory(model: torch.nn.Module, ranks=RANKS, max_fraction: float = 0.5, exclude=None) -> list[dict]:
    """Bytes of the 16-bit low-rank branch per rank against the packed 4-bit weights (group 64 scales)
    of the layers a W4 recipe quantizes, from the shapes of ``model``'s Linear/Conv2d layers."""
    shapes = [m.weight.shape for name, m in model.named_modules()
              if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and not (exclude and exclude(name))]
    w4 = sum(s.numel() // 2 + 2 * (s.numel() // 64) for s in shapes)
    rows = []
    for r in ranks:
        branch = 0
        for s in shapes:
            out, inp = s[0], s.numel() // s[0]
            rank = min(r, int(max_fraction * min(out, inp)))
            branch += 2 * rank * (out + inp)
        rows.append({"rank": r, "branch_bytes": branch, "w4_bytes": w4, "ratio": branch / w4})
    return rows


def print_memory() -> None:
    import dmquant
    from dmquant.models.adapters import find_denoiser
    from dmquant.models.full_size import sd15_unet

    def default_exclude(adapter):
        import fnmatch

        return lambda n: any(fnmatch.fnmatchcase(n, p) for p in adapter.default_exclude)

    targets = []
    for name in MODELS.values():
        _, den, adapter = find_denoiser(dmquant.zoo.load(name))
        targets.append((name, den, default_exclude(adapter)))
    from accelerate import init_empty_weights

    from dmquant.models.adapters import adapter_for

    with init_empty_weights():
        unet = sd15_unet()

    targets.append(("SD1.5 UNet (860M, architecture only)", unet, default_exclude(adapter_for(unet))))
    print("| model | " + " | ".join(f"rank {r}" for r in RANKS) + " |")
    print("| --- |" + " --- |" * len(RANKS))
    for name, den, exclude in targets:
        rows = branch_memory(den, exclude=exclude)
        cells = [f"{r['branch_bytes'] / 2**20:.2f} MiB ({100 * r['ratio']:.0f}%)" for r in rows]
        print(f"| {name} (W4: {rows[0]['w4_bytes'] / 2**20:.2f} MiB) | " + " | ".join(cells) + " |")


def fid_noise(model: str, n: int = 200, seeds=(1000, 2000)) -> dict:
    """The FID's own sampling noise: the full-precision model with other seeds, against the same
    procedural ground truth (the spread of these values is what a FID difference must exceed)."""
    import dmquant
    from dmquant.metrics import GenerationConfig, compute_fid, generate, render_prompts
    from dmquant.zoo.judge import JUDGE as ZOO_CLIP

    _, prompts = prompts_for(model, n)
    pipe = dmquant.zoo.load(MODELS[model])
    real = render_prompts(prompts)
    return {seed: round(compute_fid(generate(pipe, prompts, GenerationConfig(seed=seed, progress=False),
                                             distributed=False), real, ZOO_CLIP), 2) for seed in seeds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd,dit")
    p.add_argument("--variants", default=",".join(W4A4))
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--calib-prompts", type=int, default=32)
    p.add_argument("--fid", action="store_true", help="also the FID (judge features) against the ground truth")
    p.add_argument("--table", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--fid-noise", action="store_true", help="FID of the FP model with other seeds (its noise)")
    p.add_argument("--out", type=Path, default=OUT, help="cache folder (a fresh one reruns every row)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.memory:
        return print_memory()
    if args.fid_noise:
        for model in args.models.split(","):
            print(model, "FP FID with seeds 1000.., 2000..:", fid_noise(model, args.num_images), flush=True)
        return
    if args.table:
        print(table(current_rows(args.out)))
        return
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            config = variant_config(variant)
            label = variant.replace(":", "_") + ("-fid" if args.fid else "")
            r = run_config(model, config, variant, label, args.num_images, args.calib_prompts, fid=args.fid, out=args.out)
            fid = f" FID {r['fid']:.2f} (FP {r['fid_fp']:.2f})" if "fid" in r else ""
            print(f"{model} {r['bits']} {variant}: CLIP {r['clip_score']:.2f} (FP {r['clip_score_fp']:.2f}) "
                  f"PSNR {r['psnr_vs_reference']:.2f}{fid} calib {r['calibration_seconds']}s", flush=True)


if __name__ == "__main__":
    main()
