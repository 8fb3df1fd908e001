"""Automatic mixed precision on the zoo (issue 17), protocol of eval/README.md (as eval/ablate_outliers.py).

Variants: ``auto`` (the shipped recipe: the bytes of uniform W4 weights with float32 scales, candidates
with float16 scales, early weighting), ``w4a8`` (the shipped uniform recipe) and ``<auto|w4a8>-<modifier>-...``. Modifiers of
any recipe: ``noreco`` (no block reconstruction: round to nearest), ``g64`` (weights in groups of 64 with
float16 scales), ``lws`` (the reconstruction learns the weight scales too), ``seed<N>`` (calibration seed N: other calibration steps and reconstruction draws), ``it<N>`` (N
reconstruction iterations per block), ``ns<N>`` (N recorded calls feed the reconstruction); of ``auto``: ``<B>bit`` (``target_bits`` B, e.g. ``auto-3bit``), ``channel`` (bit-widths per
output channel only, no group candidates), ``scale32`` (candidates store float32 scales, as before float16
scales existed), ``uniform`` / ``relative`` / ``early`` / ``late`` (the weighting of the calls in the sensitivity; ``auto``:
early),
``calls<N>`` (sensitivity on N calls), ``asym`` (every 2-, 3- and 4-bit format also with zero points), ``asym2`` (the 2-bit ones only), ``anchored`` (one format per layer measured,
the others scaled by the weight-space proxy), ``all`` (every format measured on every call; ``auto``: sampled).
``recipe:<name>`` runs a shipped recipe as it is.

    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/ablate_mixed.py --models dit,sd --variants auto,auto-3bit,recipe:w4a8
    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/ablate_mixed.py --models dit,sd --variants auto,recipe:w4a8 --num-images 200 --fid
    python eval/ablate_mixed.py --table
    python eval/ablate_mixed.py --paired auto,recipe:w4a8 --out eval/ablation_mixed_v2   # paired 95% intervals

Results are cached in eval/ablation_mixed/.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_outliers import table  # noqa: E402
from ablate_time import current_rows, run_config  # noqa: E402

from dmquant.config import QuantConfig, load_recipe  # noqa: E402
from dmquant.metrics.fid import paired_fid_difference  # noqa: E402
from dmquant.metrics.fidelity import paired_difference  # noqa: E402

OUT = Path(__file__).resolve().parent / "ablation_mixed"


RECIPE_MODIFIERS = {
    "noreco": lambda c: replace(c, reconstruction=None),
    "g64": lambda c: replace(c, weights=replace(c.weights, granularity="group", group_size=64, scale_dtype="float16")),
    "lws": lambda c: replace(c, reconstruction=replace(c.reconstruction, learn_weight_scales=True)),
}
MIXED_MODIFIERS = {
    "channel": lambda mp: replace(mp, group_sizes=()),
    "scale32": lambda mp: replace(mp, scale_dtype="float32"),
    "uniform": lambda mp: replace(mp, weighting="uniform"),
    "relative": lambda mp: replace(mp, weighting="relative"),
    "early": lambda mp: replace(mp, weighting="early"),
    "late": lambda mp: replace(mp, weighting="late"),
    "asym": lambda mp: replace(mp, asymmetric_bits=(2, 3, 4)),
    "asym2": lambda mp: replace(mp, asymmetric_bits=(2,)),
    "anchored": lambda mp: replace(mp, measure="anchored"),
    "all": lambda mp: replace(mp, measure="all"),
}


def variant_config(variant: str) -> QuantConfig:
    if variant.startswith("recipe:"):
        return load_recipe(variant.split(":", 1)[1])
    name, *modifiers = variant.split("-")
    if name not in ("auto", "w4a8"):
        raise SystemExit(f"unknown variant {variant!r}: auto[-modifier...], w4a8[-modifier...] or recipe:<name>")
    config = replace(load_recipe(name), name=variant)
    mp = config.mixed_precision
    for m in modifiers:
        if m in RECIPE_MODIFIERS:
            config = RECIPE_MODIFIERS[m](config)
        elif m.startswith("seed"):
            config = replace(config, calibration=replace(config.calibration, seed=int(m[4:])))
        elif m.startswith("ns") and config.reconstruction is not None:
            config = replace(config, reconstruction=replace(config.reconstruction, num_samples=int(m[2:])))
        elif m.startswith("it") and config.reconstruction is not None:
            config = replace(config, reconstruction=replace(config.reconstruction, iterations=int(m[2:])))
        elif mp is None:
            raise SystemExit(f"modifier {m!r} of {variant!r} is for auto; w4a8 takes {', '.join(RECIPE_MODIFIERS)}")
        elif m in MIXED_MODIFIERS:
            mp = MIXED_MODIFIERS[m](mp)
        elif m.endswith("bit"):
            mp = replace(mp, target_bits=float(m[:-3]))
        elif m.startswith("calls"):
            mp = replace(mp, num_samples=int(m[5:]))
        else:
            raise SystemExit(f"unknown modifier {m!r} of {variant!r}: {', '.join([*RECIPE_MODIFIERS, *MIXED_MODIFIERS])}, "
                             "<B>bit, calls<N>")
    return replace(config, mixed_precision=mp)


def paired_rows(rows: list[dict], a: str, b: str, out: Path = OUT) -> list[str]:
    """Per model (and image count): variant ``a`` minus variant ``b``, per image (same prompts and seeds), PSNR
    against FP and the judge's CLIP score, with paired bootstrap 95% intervals (rows measured before per-image
    figures were kept are left out); with the FID against the prompts' ground truth where both rows kept their
    per-image FID features (``--fid`` rows since they are stored)."""
    by = {(r["model"], r["num_images"], r["variant"]): r for r in rows if "clip_per_image" in r}
    lines = []
    for (model, n, variant), ra in sorted(by.items()):
        rb = by.get((model, n, b))
        if variant != a or rb is None:
            continue
        psnr = [np.array([np.nan if v is None else v for v in r["psnr_per_image"]]) for r in (ra, rb)]
        dp = paired_difference(*psnr)
        dc = paired_difference(np.array(ra["clip_per_image"]), np.array(rb["clip_per_image"]))
        lines.append(f"{model} ({n} images) {a} - {b}: PSNR {dp['mean']:+.2f} dB [{dp['ci95'][0]:+.2f}, "
                     f"{dp['ci95'][1]:+.2f}] ({dp['images']} images), CLIP {dc['mean']:+.3f} [{dc['ci95'][0]:+.3f}, "
                     f"{dc['ci95'][1]:+.3f}]" + fid_difference(ra, rb, out))
    return lines


def fid_difference(ra: dict, rb: dict, out: Path) -> str:
    """", FID a - b [95% interval]" (and each against FP's) from the rows' stored features, or "" without them."""
    if "fid_features_file" not in ra or "fid_features_file" not in rb:
        return ""
    fa, fb = (load_file(str(out / r["fid_features_file"])) for r in (ra, rb))
    if not (np.array_equal(fa["real"], fb["real"]) and np.array_equal(fa["fp"], fb["fp"])):
        raise SystemExit("the two rows were measured against different ground truth or FP images")
    parts = []
    for name, x, y in (("", fa["images"], fb["images"]), (" a - FP", fa["images"], fa["fp"]),
                       (" b - FP", fb["images"], fb["fp"])):
        d = paired_fid_difference(x, y, fa["real"])
        parts.append(f"FID{name} {d['difference']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
    return ", " + ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dit,sd")
    p.add_argument("--variants", default="auto,auto-3bit,recipe:w4a8")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--calib-prompts", type=int, default=32)
    p.add_argument("--fid", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--paired", metavar="A,B", help="the paired per-image differences of variant A minus variant B "
                   "(PSNR and CLIP, bootstrap 95%% intervals) in the cached rows")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.paired:
        print("\n".join(paired_rows(current_rows(args.out), *args.paired.split(","), out=args.out)) or "no pair with per-image figures")
        return
    if args.table:
        print(table(current_rows(args.out)))
        return
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            label = variant.replace(":", "_") + ("-fid" if args.fid else "")
            r = run_config(model, variant_config(variant), variant, label, args.num_images, args.calib_prompts,
                           fid=args.fid, out=args.out)
            mixed = r["calibration"].get("mixed_precision", {})
            print(f"{model} {variant}: CLIP {r['clip_score']:.2f} (FP {r['clip_score_fp']:.2f}) PSNR "
                  f"{r['psnr_vs_reference']:.2f} bits {mixed.get('average_bits', '-')} sensitivity "
                  f"{mixed.get('seconds_sensitivity', '-')} s calib {r['calibration_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
