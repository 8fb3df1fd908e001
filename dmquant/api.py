"""The public entry points: ``quantize`` (a calibrated simulation), ``freeze`` (integer storage) and
``precompute_time_tables`` (TDQ tables for a new schedule).

``quantize`` reads the recipe once, finds the denoiser once, wraps it (:mod:`dmquant.nn.wrap`), runs
the calibration phases over a source of denoiser calls (:mod:`dmquant.calibration.run`), fits the
noise correction if the recipe has one, and attaches :class:`~dmquant.quantized_pipeline.QuantizationInfo`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from dmquant.calibration.collect import shared_temp_dir
from dmquant.calibration.mixed import plan_mixed_precision
from dmquant.calibration.run import CalibrationRun, CallSource, PipelineSource, calibrate
from dmquant.config import QuantConfig, load_recipe
from dmquant.correction.ptqd import apply_noise_correction, fit_noise_correction
from dmquant.diffusers_io import check_prompts, scheduler_timesteps
from dmquant.errors import DMQuantError
from dmquant.models.adapters import find_denoiser
from dmquant.nn.wrap import (
    activation_quantizers,
    quant_layers,
    quantized_attention,
    set_activation_mode,
    time_table,
    wrap_denoiser,
)
from dmquant.quantized_pipeline import QuantizationInfo, attach_info, make_quantized


def quantize(
    pipe,
    recipe: str | Path | dict | QuantConfig = "w8a8",
    prompts: Sequence | None = None,
    *,
    num_inference_steps: int | None = None,
    num_timesteps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    max_prompts: int | None = None,
    calib_dir: str | Path | None = None,
    calibration_data: Iterable[tuple[tuple, dict]] | None = None,
    progress: bool = True,
    target_bits: float | None = None,
    max_weight_bytes: int | None = None,
    **call_kwargs,
):
    """Quantize the denoiser of ``pipe`` in place (simulation) and return ``pipe``.

    ``prompts`` are strings (text-conditioned pipelines) or class ids (class-conditioned ones);
    recipes whose activations are dynamic or unquantized (e.g. W4A16) need none. The named keyword
    arguments override the recipe's ``calibration`` section; the others (``height``, ``guidance_scale``,
    ...) go to the pipeline call used for calibration. Calibration inputs are stored as safetensors
    shards in ``calib_dir`` (a temporary folder if None). ``calibration_data`` (``(args, kwargs)``
    denoiser calls) replaces the pipeline runs, e.g. for a bare denoiser module.

    ``target_bits`` (average bits per quantized weight, scales included) or ``max_weight_bytes`` (the
    whole denoiser's weight memory) set the budget of a recipe with a ``mixed_precision`` section (the
    ``auto`` recipe): each layer's weight bits are then chosen from its measured sensitivity
    (:mod:`dmquant.calibration.mixed`); ``pipe.dmquant.config`` is the chosen plan, a rerunnable recipe.
    """
    config = with_budget(load_recipe(recipe), target_bits, max_weight_bytes)
    overrides = dict(num_inference_steps=num_inference_steps, num_timesteps=num_timesteps, batch_size=batch_size,
                     seed=seed, max_prompts=max_prompts)
    config = replace(config, calibration=replace(config.calibration, **{k: v for k, v in overrides.items()
                                                                         if v is not None}))
    attr, denoiser, adapter = find_denoiser(pipe)
    if calibration_data is not None and config.correction is not None:
        raise DMQuantError("noise correction ('correction') is fitted on sampling runs of the pipeline: pass "
                           "prompts instead of calibration_data, or drop the 'correction' section")
    if config.needs_calibration_data and calibration_data is None:
        prompts = _capped(check_prompts(pipe, prompts), config.calibration.max_prompts)
    folder = contextlib.nullcontext(calib_dir) if calib_dir is not None else shared_temp_dir()
    with folder as path:
        source = None
        if calibration_data is not None:
            source = CallSource(calibration_data, adapter)
        elif config.needs_calibration_data:
            source = PipelineSource(pipe, denoiser, prompts, config.calibration, Path(path), call_kwargs, adapter)
        plan = None
        if config.mixed_precision is not None:  # measure and allocate on the FP denoiser, then wrap the plan
            source.collect(denoiser, 0, progress)
            plan = plan_mixed_precision(denoiser, adapter, config, source.iter_calls(), progress)
            config = plan.config
        info = QuantizationInfo(config, attr, adapter.name, wrap_denoiser(denoiser, config, adapter))
        info.calibration = calibrate(CalibrationRun(denoiser, adapter, config, source, progress))
        if plan is not None:
            info.calibration["mixed_precision"] = plan.report()
    info.report.attention = [name for name, _ in quantized_attention(denoiser)]  # calibration may release some
    set_activation_mode(denoiser, "quant")
    info.outliers = info.calibration.pop("outliers", {})
    attach_info(pipe, info)
    make_quantized(pipe)
    if config.correction is not None:
        info.calibration["correction"] = _fit_correction(pipe, info, prompts, progress, call_kwargs)
    return pipe


def with_budget(config: QuantConfig, target_bits: float | None, max_weight_bytes: int | None) -> QuantConfig:
    """``config`` with a mixed-precision budget set (DMQuantError if the recipe has no ``mixed_precision``)."""
    if target_bits is None and max_weight_bytes is None:
        return config
    if config.mixed_precision is None:
        raise DMQuantError(f"a bit budget (target_bits / max_weight_bytes) needs a mixed-precision recipe, and "
                           f"{config.name!r} has no mixed_precision section: use the recipe 'auto' (--recipe auto)")
    mp = replace(config.mixed_precision, target_bits=target_bits, max_weight_bytes=max_weight_bytes)
    return replace(config, mixed_precision=mp)


def _capped(prompts: list, limit: int) -> list:
    if len(prompts) > limit:
        warnings.warn(f"calibrating on the first {limit} of {len(prompts)} prompts (calibration.max_prompts={limit}; "
                      "raise it with max_prompts= or --max-prompts)", stacklevel=3)
    return prompts[:limit]


def _fit_correction(pipe, info: QuantizationInfo, prompts, progress, call_kwargs) -> dict:
    """Fit the recipe's noise correction on the quantized pipeline's own runs and hook it on."""
    c, steps = info.config.correction, info.config.calibration.num_inference_steps
    start = time.perf_counter()
    stats = fit_noise_correction(pipe, list(prompts[: c.num_prompts]), steps, batch_size=c.batch_size,
                                 seed=info.config.calibration.seed, progress=progress, **call_kwargs)
    if c.method == "bias":
        stats = stats.bias_only()
    info.correction = stats
    apply_noise_correction(pipe, stats, absorb_variance=c.absorbs_variance)
    return {"method": c.method, "prompts": min(len(prompts), c.num_prompts), "num_inference_steps": steps,
            "k_mean": round(float(stats.k.mean()), 5), "residual_std_mean": round(float(stats.var.sqrt().mean()), 5),
            "seconds": round(time.perf_counter() - start, 2)}


def freeze(pipe):
    """Switch the denoiser's quantized layers to integer storage in place; returns ``pipe``."""
    _, denoiser, _ = find_denoiser(pipe)
    for _, layer in quant_layers(denoiser):
        layer.freeze()
    info = getattr(pipe, "dmquant", None)
    if info is not None:
        info.frozen = True
    return pipe


def precompute_time_tables(pipe, num_inference_steps: int) -> int:
    """TDQ (``time.mode: learned``): the activation ranges for the steps of a run of ``num_inference_steps``
    with the pipeline's scheduler, computed before generating (simulated, frozen or loaded models alike);
    returns the quantizers updated."""
    _, denoiser, adapter = find_denoiser(pipe)
    learned = [q for q in activation_quantizers(denoiser) if q.learned]
    if not learned:
        raise DMQuantError("this model has no learned (TDQ) time-conditioned quantizer: only time.mode='learned' "
                           "can compute ranges for new timesteps; others fall back to the nearest calibrated step")
    keys = scheduler_timesteps(pipe.scheduler, num_inference_steps)
    keys = keys * adapter.timestep_scale  # as the pipeline passes them to the denoiser
    for q in learned:
        q.retable(keys)
    time_table(denoiser).set_keys(keys)
    for _, layer in quant_layers(denoiser):
        if layer.frozen:
            layer.prepare_kernels()  # convs pack their weight with each table entry's input scale
    return len(learned)
