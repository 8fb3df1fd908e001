"""Mixed precision (issue 17): which sensitivity weighting over the sampling steps ranks layers as the images
do, and whether a cheap proxy ranks formats as the measured sensitivity does.

On a zoo model, with the ``auto`` recipe's calibration calls (recorded as ``dmquant.quantize`` records them):

1. the sensitivity pass of ``dmquant.calibration.mixed`` on ``--layers`` (every Nth quantized layer, or all),
   each call's output error kept, so every weighting of :func:`call_weights` is computed from one pass;
2. the proxy: each layer's weight error weighted by its input's per-channel mean square (measured on the
   same calls, no extra denoiser call per format) -- ``proxy`` alone, and ``anchored`` (the measured
   sensitivity of one format per layer, ``--anchor``, times the proxy's ratio to that format);
3. ground truth (``--truth-formats``): the images of ``--num-images`` protocol prompts with only that layer's
   weight fake-quantized in that format (round to nearest, as in the pass), their mean squared error
   against the full-precision images;
4. Spearman rank correlations: each weighting against the image errors; the proxies against the measured
   sensitivity (all (layer, format) pairs, and within each layer); the predicted SQNR (measured
   sensitivities) of the plans each chooses at the bytes of uniform W4 and at 3 bits per weight.

    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/mixed_study.py --model dit --out eval/ablation_mixed/study-dit.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/mixed_study.py --model sd --layers every4 --truth-formats "" \
        --out eval/ablation_mixed/study-sd.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_time import MODELS, calib_inputs, generate, prompts_for  # noqa: E402

import dmquant  # noqa: E402
from dmquant.calibration.allocation import allocate, plan_error  # noqa: E402
from dmquant.calibration.mixed import (  # noqa: E402
    budget_bytes,
    call_timesteps,
    call_weights,
    candidate_base,
    candidate_layers,
    fake_quantized_weight,
    measure_sensitivity,
    spread,
    sqnr_db,
)
from dmquant.calibration.run import PipelineSource  # noqa: E402
from dmquant.config import load_recipe  # noqa: E402
from dmquant.models.adapters import find_denoiser  # noqa: E402

WEIGHTINGS = ("uniform", "relative", "early", "late")


def record_calls(pipe, model: str, config, folder: Path):
    """The calibration calls ``dmquant.quantize`` records for ``config`` (guidance 5, the protocol's prompts)."""
    _, denoiser, adapter = find_denoiser(pipe)
    calib, _ = prompts_for(model, 1)
    prompts = calib_inputs(pipe, model, calib)[: config.calibration.max_prompts]
    source = PipelineSource(pipe, denoiser, prompts, config.calibration, folder, {"guidance_scale": 5.0}, adapter)
    source.collect(denoiser, 0, False)
    return spread(source.iter_calls(), config.mixed_precision.num_samples)


@torch.no_grad()
def input_moments(denoiser, names: list[str], calls) -> dict[str, torch.Tensor]:
    """Each layer's per-input-channel mean square of its input over ``calls``."""
    sums, counts, hooks = {}, {}, []

    def hook(name, kind):
        def fn(module, args):
            x = args[0].detach().float()
            m = x.pow(2).mean(dim=(0, 2, 3)) if kind == "conv" else x.reshape(-1, x.shape[-1]).pow(2).mean(0)
            sums[name] = sums.get(name, 0) + m
            counts[name] = counts.get(name, 0) + 1
        return fn

    for n in names:
        module = denoiser.get_submodule(n)
        hooks.append(module.register_forward_pre_hook(hook(n, "conv" if module.weight.dim() == 4 else "linear")))
    try:
        for a, k in calls:
            denoiser(*a, **k)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


def weight_proxy(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """``sum (dW)^2 * E[x_in^2]`` over the weight (one mean square per input channel, shared by a kernel)."""
    d2 = (weight - approx).float().pow(2)
    d2 = d2.sum(dim=(2, 3)) if d2.dim() == 4 else d2
    return float((d2 * moment[None, :]).sum())


def image_error(images: np.ndarray, reference: np.ndarray) -> float:
    return float(((images.astype(np.float64) - reference.astype(np.float64)) / 255.0).__pow__(2).mean())


def plan_sqnr(layers, errors: dict[str, dict[str, float]], measured: dict[str, dict[str, float]], budget) -> float:
    """Predicted SQNR (by the measured sensitivities) of the plan that ``errors`` chooses within ``budget``."""
    options = [[(la.options[f][0], errors[la.name][f]) for f in la.options] for la in layers]
    choice = allocate(options, budget)
    truth = [[(la.options[f][0], measured[la.name][f]) for f in la.options] for la in layers]
    return sqnr_db(plan_error(truth, choice))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit", choices=sorted(MODELS))
    p.add_argument("--layers", default="all", help="'all' or 'everyN'")
    p.add_argument("--truth-formats", default="3,4,3g64", help="formats with image ground truth ('' for none)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--anchor", default="4")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    config = load_recipe("auto")
    pipe = dmquant.zoo.load(MODELS[args.model])
    _, denoiser, adapter = find_denoiser(pipe)
    result: dict = {"model": args.model, "layers_arg": args.layers}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        calls = record_calls(pipe, args.model, config, Path(folder))
        layers = candidate_layers(denoiser, config, adapter)
        if args.layers != "all":
            layers = layers[:: int(args.layers.removeprefix("every"))]
        timesteps = call_timesteps(adapter, calls)
        result["timesteps"] = timesteps
        result["seconds_record"] = round(time.perf_counter() - start, 1)

        start = time.perf_counter()
        powers = measure_sensitivity(denoiser, layers, config, calls, progress=False, timesteps=timesteps)
        result["seconds_measure"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        moments = input_moments(denoiser, [la.name for la in layers], calls)
        base = candidate_base(config)
        proxy = {}
        for la in layers:
            w = denoiser.get_submodule(la.name).weight.data
            proxy[la.name] = {f: weight_proxy(w, fake_quantized_weight(w, c.weights(base), la.split), moments[la.name])
                              for f, c in la.formats.items()}
        result["seconds_proxy"] = round(time.perf_counter() - start, 1)

    weighted = {wt: {la.name: {f: sum(x * e for x, e in zip(call_weights(wt, powers, timesteps), errs))
                               for f, errs in la.call_errors.items()} for la in layers} for wt in WEIGHTINGS}
    measured = weighted["uniform"]
    anchored = {la.name: {f: measured[la.name][args.anchor] * proxy[la.name][f] / max(proxy[la.name][args.anchor],
                                                                                       1e-30)
                          for f in la.formats} for la in layers}
    pairs = [(la.name, f) for la in layers for f in la.formats]
    rho = {}
    for name, table in (("proxy", proxy), ("anchored", anchored)):
        rho[name] = {"all_pairs": spearmanr([measured[n][f] for n, f in pairs], [table[n][f] for n, f in pairs])[0],
                     "within_layer_median": float(np.median([spearmanr(
                         [measured[la.name][f] for f in la.formats], [table[la.name][f] for f in la.formats])[0]
                         for la in layers]))}
    result["proxy_vs_measured"] = rho
    numel = sum(la.numel for la in layers)
    shapes = {la.name: tuple(denoiser.get_submodule(la.name).weight.shape) for la in layers}
    budgets = {"w4_bytes": budget_bytes(config.mixed_precision, config, layers, 0, shapes), "3bit": 3.0 * numel / 8}
    result["plans"] = {b: {name: plan_sqnr(layers, table, measured, budget)
                           for name, table in (("measured", measured), ("anchored", anchored), ("proxy", proxy),
                                               *((wt, weighted[wt]) for wt in WEIGHTINGS if wt != "uniform"))}
                       for b, budget in budgets.items()}
    result["uniform_w4_sqnr"] = sqnr_db(sum(measured[la.name]["4"] for la in layers))

    truth_formats = [f for f in args.truth_formats.split(",") if f]
    if truth_formats:
        start = time.perf_counter()
        _, prompts = prompts_for(args.model, args.num_images)
        reference = generate(pipe, prompts)
        truth = {}
        for la in layers:
            module = denoiser.get_submodule(la.name)
            original = module.weight.data
            truth[la.name] = {}
            try:
                for f in truth_formats:
                    if f not in la.formats:
                        continue
                    module.weight.data = fake_quantized_weight(original, la.formats[f].weights(base), la.split)
                    truth[la.name][f] = image_error(generate(pipe, prompts), reference)
            finally:
                module.weight.data = original
        result["seconds_truth"] = round(time.perf_counter() - start, 1)
        tp = [(n, f) for n in truth for f in truth[n]]
        gt = [truth[n][f] for n, f in tp]
        result["weighting_vs_images"] = {
            name: {"all_pairs": spearmanr(gt, [table[n][f] for n, f in tp])[0],
                   **{f"format_{f}": spearmanr([truth[n][f] for n in truth if f in truth[n]],
                                               [table[n][f] for n in truth if f in truth[n]])[0]
                      for f in truth_formats}}
            for name, table in (*weighted.items(), ("proxy", proxy), ("anchored", anchored))}
        result["truth"] = truth
    result["measured"] = {wt: weighted[wt] for wt in WEIGHTINGS}
    result["proxy"] = proxy
    result["bytes"] = {la.name: {f: la.options[f][0] for f in la.formats} for la in layers}
    result["call_errors"] = {la.name: la.call_errors for la in layers}
    result["powers"] = powers
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k in ("seconds_record", "seconds_measure", "seconds_proxy",
                                                        "seconds_truth", "proxy_vs_measured", "plans",
                                                        "uniform_w4_sqnr", "weighting_vs_images")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
