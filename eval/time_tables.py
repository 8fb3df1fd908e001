"""Why per-step activation tables (`w8a8-time`) lose to one pooled range (`w8a8-static`) on some models: the error of
each step on the FP trajectory, and the error along each model's own trajectory (issue 18, "find out why").

For a model of eval/robustness.py, a guidance scale and a calibration prompt set, both recipes are calibrated as
robustness.py does (the set's prompts, up to the recipe's ``max_prompts``); then on ``--prompts`` held-out prompts
(25 steps, the pipeline's scheduler):

* per step, the SQNR of the guided prediction ``uncond + g (cond - uncond)`` against FP's, every recipe fed FP's own
  recorded denoiser inputs (the error a step adds, nothing accumulated);
* per step, the share of the quantized layers' input values the calibrated grids clip (beyond half a step past
  an end), on those inputs;
* the SQNR of each recipe's final latents against FP's, each sampling its own trajectory (what the images see).

    OMP_NUM_THREADS=1 python eval/time_tables.py --model flux-small --set terse --guidance 7.5 [--prompts 8]
        [--methods w8a8-static,w8a8-time] [--time-capacity 65536] [--out eval/time_tables/flux-small-terse-g7.5.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import dmquant
from dmquant.diagnostics.measure import clipped_count
from dmquant.models.adapters import find_denoiser
from dmquant.nn.wrap import activation_quantizers
from dmquant.quantizers import activation
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.timetable import single_timestep

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guided_sqnr as G  # noqa: E402
import robustness as R  # noqa: E402


def clip_counter(denoiser):
    """Hooks counting, per call, the inputs of static activation quantizers that the grid clips: beyond half a step
    past its ends (a value within half a step rounds to the end code as any value rounds to its nearest code: GELU's
    minimum -0.17 just under a grid ending at -0.166 is rounding, not clipping)."""
    counts = {"out": 0, "all": 0}
    hooks = []
    for q in activation_quantizers(denoiser):
        if not getattr(q, "static", False) or q.mode != "quant":
            continue

        def pre(module, args, q=q):
            scale, zero = q.current_qparams()  # the grid's ends: (qmin - z) s .. (qmax - z) s
            x = args[0].detach()
            counts["out"] += clipped_count(x, (q.fmt.qmin - zero) * scale, (q.fmt.qmax - zero) * scale, scale)
            counts["all"] += x.numel()

        hooks.append(q.register_forward_pre_hook(pre))
    return counts, hooks


def per_step(denoiser, calls, guidance: float, counting: bool) -> tuple[list[torch.Tensor], list[float | None]]:
    """Each call's guided prediction and (``counting``) the share of quantized-layer inputs the grids clip."""
    outs, clipped = [], []
    counts, hooks = clip_counter(denoiser) if counting else ({"out": 0, "all": 0}, [])
    for call in calls:
        counts["out"] = counts["all"] = 0
        outs += G.guided_steps(denoiser, [call], guidance)
        clipped.append(counts["out"] / counts["all"] if counts["all"] else None)
    for h in hooks:
        h.remove()
    return outs, clipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-small")
    p.add_argument("--set", default="terse")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--methods", default="w8a8-static,w8a8-time")
    p.add_argument("--time-capacity", type=int, default=None,
                   help="values each per-step range observer samples for the MSE search (dmquant's "
                        "TIME_OBSERVER_CAPACITY; a pooled range samples 65,536)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.time_capacity:
        activation.TIME_OBSERVER_CAPACITY = a.time_capacity
    torch.set_num_threads(1)
    kind = R.MODELS[a.model][1]
    if kind != "text":
        raise SystemExit(f"{a.model} is class-conditioned: this script runs text-to-image models")
    pipe = R.load(a.model)
    prompts = R.eval_prompts(kind, a.prompts)
    fp_latents, calls = G.record_run(pipe, prompts, a.guidance, a.steps)
    ref, _ = per_step(find_denoiser(pipe)[1], calls, a.guidance, counting=False)
    result = {"model": a.model, "set": a.set, "guidance": a.guidance, "prompts": a.prompts, "steps": a.steps,
              "timesteps": [single_timestep(c[1]["timestep"] if "timestep" in c[1] else c[0][1]) for c in calls],
              "methods": {}}
    for method in a.methods.split(","):
        model = copy.deepcopy(pipe)
        config = R.method_config(method)
        calib = R.calibration_prompts(a.set, kind)[: config.calibration.max_prompts]
        dmquant.quantize(model, config, prompts=calib, progress=False, guidance_scale=a.guidance)
        outs, clipped = per_step(find_denoiser(model)[1], calls, a.guidance, counting=True)
        latents, _ = G.record_run(model, prompts, a.guidance, a.steps, record=False)
        steps = [sqnr_db(r, o) for r, o in zip(ref, outs)]
        result["methods"][method] = {"step_sqnr": [round(s, 2) for s in steps],
                                     "clipped": [None if c is None else round(c, 6) for c in clipped],
                                     "final_latent_sqnr": round(sqnr_db(fp_latents, latents), 2)}
        print(f"{method}: final latents {sqnr_db(fp_latents, latents):.2f} dB; per-step guided SQNR "
              + " ".join(f"{s:.1f}" for s in steps), flush=True)
    names = list(result["methods"])
    print("\n| step | timestep | " + " | ".join(f"{m} SQNR dB (clipped %)" for m in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i, t in enumerate(result["timesteps"]):
        cells = [f"{result['methods'][m]['step_sqnr'][i]:.2f} ({100 * (result['methods'][m]['clipped'][i] or 0):.3f})"
                 for m in names]
        print(f"| {i} | {t:g} | " + " | ".join(cells) + " |")
    print("| final latents, own trajectory | | " + " | ".join(
        f"{result['methods'][m]['final_latent_sqnr']:.2f}" for m in names) + " |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
