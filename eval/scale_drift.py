"""Learned weight scales on a saved mixed plan of tiny-shapes-sd (issue 17, fourth session): rerun the plan of a
cached ``ablate_mixed`` row with or without ``reconstruction.learn_weight_scales`` and report PSNR against FP on
``--num-images`` images, each block's reconstruction loss (first / last step) and how far each weight's scales
moved (max |log ratio|), by bit-width.

    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/scale_drift.py --row eval/ablation_mixed_v4/sd-8798461e71-WmixedA8-auto-lws-fid-200.json --lws on --max-bits 8
    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/scale_drift.py --row <same> --lws on      # weights of <= 4 bits (default)
    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/scale_drift.py --row <same> --lws off
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_time import MODELS, calib_inputs, fingerprint, generate, prompts_for, reference_images  # noqa: E402

import dmquant  # noqa: E402
import dmquant.calibration.reconstruct as reconstruct  # noqa: E402
from dmquant.calibration.mixed import Candidate, plan_config  # noqa: E402
from dmquant.config import load_recipe  # noqa: E402
from dmquant.metrics.fidelity import psnr_per_image  # noqa: E402


def candidate(label: str) -> Candidate:
    """A plan's format label (``4``, ``3a``, ``4g64``) as its candidate."""
    m = re.fullmatch(r"(\d)(a?)(?:g(\d+))?", str(label))
    return Candidate(int(m[1]), int(m[3]) if m[3] else None, bool(m[2]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", type=Path, required=True, help="a cached ablate_mixed row of tiny-shapes-sd (its plan)")
    p.add_argument("--lws", choices=("on", "off"), default="on")
    p.add_argument("--max-bits", type=int, default=4, help="reconstruction.weight_scale_max_bits")
    p.add_argument("--iterations", type=int, default=1600)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "scale_drift")
    a = p.parse_args()
    bits = json.loads(a.row.read_text())["calibration"]["mixed_precision"]["bits"]
    config = plan_config(load_recipe("auto"), {k: candidate(v) for k, v in bits.items()})
    config = replace(config, reconstruction=replace(
        config.reconstruction, learn_weight_scales=a.lws == "on", weight_scale_max_bits=a.max_bits,
        iterations=a.iterations, num_samples=a.num_samples))
    blocks = []
    fit = reconstruct._optimize

    def recorded(unit, layers, scales, gains, *rest):
        first, last = fit(unit, layers, scales, gains, *rest)
        moved = [(q.bits, float(q.scale_gain.detach().abs().max())) for layer in layers
                 for q in layer.weight_quantizers if q.scale_gain is not None]
        blocks.append({"first": first, "last": last, "moved": moved})
        return first, last

    reconstruct._optimize = recorded
    pipe = dmquant.zoo.load(MODELS["sd"])
    ref = reference_images("sd", a.num_images, fingerprint("sd"), a.out)
    calib, prompts = prompts_for("sd", a.num_images)
    dmquant.quantize(pipe, config, prompts=calib_inputs(pipe, "sd", calib)[:64], progress=False, guidance_scale=5.0)
    psnr = [v for v in psnr_per_image(generate(pipe, prompts), ref) if np.isfinite(v)]
    print(f"PSNR {np.mean(psnr):.2f} dB ({a.num_images} images), lws {a.lws}, max bits {a.max_bits}")
    for i, b in enumerate(blocks):
        top = max((m for _, m in b["moved"]), default=0.0)
        print(f"block {i:2d}: loss {b['first']:.3e} -> {b['last']:.3e}, scales moved up to e^{top:.3f}")
    by_bits = defaultdict(list)
    for b in blocks:
        for w, m in b["moved"]:
            by_bits[w].append(m)
    for w, ms in sorted(by_bits.items()):
        print(f"{w}-bit weights: {len(ms)}, max |log ratio| median {np.median(ms):.3f}, max {max(ms):.3f}")


if __name__ == "__main__":
    main()
