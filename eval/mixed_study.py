"""Mixed precision (issue 17): which sensitivity weighting over the sampling steps ranks layers as the images
do, and whether a cheap proxy ranks formats as the measured sensitivity does.

On a zoo model, with the ``auto`` recipe's calibration calls (recorded as ``dmquant.quantize`` records them):

1. the sensitivity pass of ``dmquant.calibration.mixed`` on ``--layers`` (every Nth quantized layer, or all),
   each call's output error kept, so every weighting of :func:`call_weights` is computed from one pass;
2. the proxy: each layer's weight error weighted by its input's per-channel mean square (measured on the
   same calls, no extra denoiser call per format) -- ``proxy`` alone, and ``anchored`` (the measured
   sensitivity of one format per layer, ``--anchor``, times the proxy's ratio to that format); and
   ``sampled<k>`` (the other formats' errors on k of the calls, scaled by their ratio to the anchor's there:
   ``measure: sampled``), computed from the same per-call errors;
3. ground truth (``--truth-formats``): the images of ``--num-images`` protocol prompts with only that layer's
   weight fake-quantized in that format (round to nearest, as in the pass), their mean squared error
   against the full-precision images;
4. Spearman rank correlations: each weighting against the image errors; the estimates against the measured
   sensitivity (the recipe's weighting; all (layer, format) pairs, and within each layer); the predicted SQNR
   (measured sensitivities) of the plans each chooses at the bytes of uniform W4 and at 3 bits per weight;
   the seconds each measuring mode would take on these layers at this pass's rate.

    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/mixed_study.py --model dit --out eval/ablation_mixed/study/study-dit.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/mixed_study.py --model sd --layers every4 --truth-formats "" \
        --out eval/ablation_mixed/study/study-sd.json

``--plans`` instead measures whole plans with round-to-nearest weights only (full-precision activations, no
reconstruction): the PSNR of the protocol's images against the full-precision ones, for the plans saved in
ablate_mixed's rows (``row:<file>``) and uniform formats (``uniform:<label>``, e.g. ``uniform:4g64h``: a label
ending in ``h`` stores float16 scales):

    OMP_NUM_THREADS=1 PYTHONPATH=. python eval/mixed_study.py --model dit --num-images 64 \
        --plans uniform:4,row:dit-9cb7a69bdb-WmixedA8-auto-uniform-64.json --out eval/ablation_mixed/study/plans-dit.json
"""

from __future__ import annotations

import argparse
import dataclasses
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
    storage_bytes,
)
from dmquant.calibration.proxy import record_input_moments, weight_proxy  # noqa: E402
from dmquant.calibration.run import PipelineSource  # noqa: E402
from dmquant.config import load_recipe  # noqa: E402
from dmquant.metrics.fidelity import fidelity_metrics  # noqa: E402
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


def image_error(images: np.ndarray, reference: np.ndarray) -> float:
    return float(((images.astype(np.float64) - reference.astype(np.float64)) / 255.0).__pow__(2).mean())


def plan_sqnr(layers, errors: dict[str, dict[str, float]], measured: dict[str, dict[str, float]], budget) -> float:
    """Predicted SQNR (by the measured sensitivities) of the plan that ``errors`` chooses within ``budget``."""
    options = [[(la.options[f][0], errors[la.name][f]) for f in la.options] for la in layers]
    choice = allocate(options, budget)
    truth = [[(la.options[f][0], measured[la.name][f]) for f in la.options] for la in layers]
    return sqnr_db(plan_error(truth, choice))


def bootstrap_difference(truth: dict, weighted: dict, draws: int = 1000) -> dict[str, list[float]]:
    """Each weighting's Spearman correlation with the image errors minus uniform's, over ``draws`` resamplings of
    the layers: [median, 5th, 95th percentile]."""
    names = list(truth)
    rng = np.random.default_rng(0)

    def rho(table, pick):
        pairs = [(names[i], f) for i in pick for f in truth[names[i]]]
        return spearmanr([truth[n][f] for n, f in pairs], [table[n][f] for n, f in pairs])[0]

    picks = [rng.choice(len(names), len(names)) for _ in range(draws)]
    base = np.array([rho(weighted["uniform"], pick) for pick in picks])
    found = {}
    for wt, table in weighted.items():
        d = np.array([rho(table, pick) for pick in picks]) - base
        found[wt] = [float(np.median(d)), float(np.percentile(d, 5)), float(np.percentile(d, 95))]
    return found


def plan_formats(spec: str, layers, folder: Path) -> dict[str, tuple[str, str]]:
    """layer -> (format label, scale dtype) of ``row:<file>`` (an ablate_mixed row) or ``uniform:<label>[h]``."""
    kind, _, what = spec.partition(":")
    if kind == "row":
        report = json.loads((folder / what).read_text())["calibration"]["mixed_precision"]
        # rows written before the report named it: float32 scales for auto-scale32 and recipe_auto, else float16
        dtype = report.get("scale_dtype") or ("float32" if "scale32" in what or "recipe_auto" in what else "float16")
        return {la.name: (report["formats"][la.name], dtype) for la in layers}
    label, dtype = (what[:-1], "float16") if what.endswith("h") else (what, "float32")
    return {la.name: (label, dtype) for la in layers}


@torch.no_grad()
def plan_images(pipe, denoiser, layers, formats: dict[str, tuple[str, str]], base, prompts) -> np.ndarray:
    """The images with every layer's weight fake-quantized as ``formats`` says (round to nearest)."""
    originals = {}
    try:
        for la in layers:
            label, dtype = formats[la.name]
            module = denoiser.get_submodule(la.name)
            originals[la.name] = module.weight.data
            c = dataclasses.replace(la.formats[label].weights(base), scale_dtype=dtype)
            module.weight.data = fake_quantized_weight(module.weight.data, c, la.split)
        return generate(pipe, prompts)
    finally:
        for name, w in originals.items():
            denoiser.get_submodule(name).weight.data = w


def measure_plans(args, pipe, denoiser, adapter, config) -> None:
    layers = candidate_layers(denoiser, config, adapter)
    base = candidate_base(config)
    _, prompts = prompts_for(args.model, args.num_images)
    reference = generate(pipe, prompts)
    rows = {}
    for spec in args.plans.split(","):
        formats = plan_formats(spec, layers, Path(__file__).resolve().parent / "ablation_mixed")
        metrics = fidelity_metrics(plan_images(pipe, denoiser, layers, formats, base, prompts), reference)
        bytes_ = sum(storage_bytes(tuple(denoiser.get_submodule(la.name).weight.shape), dataclasses.replace(
            la.formats[formats[la.name][0]].weights(base), scale_dtype=formats[la.name][1]), la.split) for la in layers)
        rows[spec] = {"psnr": metrics["psnr_vs_reference"], "ssim": metrics["ssim_vs_reference"],
                      "average_bits": 8 * bytes_ / sum(la.numel for la in layers)}
        print(spec, json.dumps(rows[spec]), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit", choices=sorted(MODELS))
    p.add_argument("--layers", default="all", help="'all' or 'everyN'")
    p.add_argument("--truth-formats", default="3,4,3g64", help="formats with image ground truth ('' for none)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--anchor", default="4")
    p.add_argument("--plans", default="", help="row:<file> / uniform:<label>[h], comma-separated (see above)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    config = load_recipe("auto")
    config = dataclasses.replace(config, mixed_precision=dataclasses.replace(config.mixed_precision, measure="all"))
    pipe = dmquant.zoo.load(MODELS[args.model])
    _, denoiser, adapter = find_denoiser(pipe)
    if args.plans:
        measure_plans(args, pipe, denoiser, adapter, config)
        return
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
        with torch.no_grad(), record_input_moments(denoiser, [la.name for la in layers]) as moments:
            for a, k in calls:
                denoiser(*a, **k)
        base = candidate_base(config)
        proxy = {}
        for la in layers:
            w = denoiser.get_submodule(la.name).weight.data
            proxy[la.name] = {f: weight_proxy(w, fake_quantized_weight(w, c.weights(base), la.split), moments[la.name])
                              for f, c in la.formats.items()}
        result["seconds_proxy"] = round(time.perf_counter() - start, 1)

    weighted = {wt: {la.name: {f: sum(x * e for x, e in zip(call_weights(wt, powers, timesteps), errs))
                               for f, errs in la.call_errors.items()} for la in layers} for wt in WEIGHTINGS}
    used = config.mixed_precision.weighting  # the recipe's: what the proxies are judged against
    measured = weighted[used]
    anchored = {la.name: {f: measured[la.name][args.anchor] * proxy[la.name][f] / max(proxy[la.name][args.anchor],
                                                                                       1e-30)
                          for f in la.formats} for la in layers}
    w = call_weights(used, powers, timesteps)
    estimates = {"proxy": proxy, "anchored": anchored}
    for k in (2, 4, 8):  # measure: sampled with sampled_calls k, from the same call errors
        subset = spread(range(len(calls)), k)
        estimates[f"sampled{k}"] = {la.name: {f: measured[la.name][args.anchor] * sum(
            w[i] * la.call_errors[f][i] for i in subset) / max(sum(w[i] * la.call_errors[args.anchor][i]
                                                                  for i in subset), 1e-30)
            for f in la.formats} for la in layers}
    pairs = [(la.name, f) for la in layers for f in la.formats]
    rho = {}
    for name, table in estimates.items():
        rho[name] = {"all_pairs": spearmanr([measured[n][f] for n, f in pairs], [table[n][f] for n, f in pairs])[0],
                     "within_layer_median": float(np.median([spearmanr(
                         [measured[la.name][f] for f in la.formats], [table[la.name][f] for f in la.formats])[0]
                         for la in layers]))}
    result["weighting"] = used
    result["proxy_vs_measured"] = rho
    # denoiser calls of each mode for these layers, and the seconds they take at this pass's rate
    runs = {"all": sum(len(la.formats) for la in layers) * len(calls), "anchored": len(layers) * len(calls)}
    runs.update({f"sampled{k}": len(layers) * len(calls) + sum(len(la.formats) - 1 for la in layers) * min(k, len(calls))
                 for k in (2, 4, 8)})
    result["projected_seconds"] = {m: round(result["seconds_measure"] * n / runs["all"], 1) for m, n in runs.items()}
    numel = sum(la.numel for la in layers)
    shapes = {la.name: tuple(denoiser.get_submodule(la.name).weight.shape) for la in layers}
    budgets = {"w4_bytes": budget_bytes(config.mixed_precision, config, layers, 0, shapes), "3bit": 3.0 * numel / 8}
    result["plans"] = {b: {name: plan_sqnr(layers, table, measured, budget)
                           for name, table in (("measured", measured), *estimates.items(),
                                               *((wt, weighted[wt]) for wt in WEIGHTINGS if wt != used))}
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
        result["weighting_minus_uniform_bootstrap"] = bootstrap_difference(truth, weighted)
        if {"3", "4"} <= set(truth_formats):  # layers whose W3 images are closer to FP than their W4 images
            result["w3_closer_than_w4"] = [n for n in truth if truth[n]["3"] < truth[n]["4"]]
        result["truth"] = truth
    result["measured"] = {wt: weighted[wt] for wt in WEIGHTINGS}
    result["proxy"] = proxy
    result["bytes"] = {la.name: {f: la.options[f][0] for f in la.formats} for la in layers}
    result["call_errors"] = {la.name: la.call_errors for la in layers}
    result["powers"] = powers
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k in ("seconds_record", "seconds_measure", "seconds_proxy",
                                                        "projected_seconds", "weighting",
                                                        "seconds_truth", "proxy_vs_measured", "plans",
                                                        "uniform_w4_sqnr", "weighting_vs_images",
                                                        "weighting_minus_uniform_bootstrap", "w3_closer_than_w4")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
