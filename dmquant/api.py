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
from dmquant.controlnet import CONTROLNET_ATTRIBUTE, controlnet_target
from dmquant.correction.ptqd import apply_noise_correction, fit_noise_correction
from dmquant.diffusers_io import check_prompts, scheduler_timesteps
from dmquant.errors import DMQuantError
from dmquant.models.adapters import adapter_for, find_denoiser
from dmquant.nn.wrap import (
    activation_quantizers,
    quant_layers,
    quantized_attention,
    set_activation_mode,
    time_table,
    wrap_denoiser,
)
from dmquant.quantized_pipeline import QuantizationInfo, attach_info, make_quantized, quantized_components


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
    controlnet: bool | str | Path | dict | QuantConfig = False,
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

    ControlNet pipelines: pass the conditioning images as the pipeline takes them (``image=`` for SD / SDXL,
    ``control_image=`` for FLUX; one image, or one per prompt). ``controlnet=True`` also quantizes the
    pipeline's ControlNet with the same recipe (or ``controlnet="w8a8"``: a recipe of its own), calibrated on
    the calls the pipeline makes to it in the same runs; its report is ``pipe.controlnet.dmquant``.
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
    control = controlnet_target(pipe, controlnet, config, calibration_data is not None)
    control_data = control is not None and control.config.needs_calibration_data
    if (config.needs_calibration_data or control_data) and calibration_data is None:
        prompts = _capped(check_prompts(pipe, prompts), config.calibration.max_prompts)
    folder = contextlib.nullcontext(calib_dir) if calib_dir is not None else shared_temp_dir()
    with folder as path:
        source = None
        if calibration_data is not None:
            source = CallSource(calibration_data, adapter)
        elif config.needs_calibration_data or control_data:
            companions = {CONTROLNET_ATTRIBUTE: (control.module, control.adapter)} if control_data else None
            source = PipelineSource(pipe, denoiser, prompts, config.calibration, Path(path), call_kwargs, adapter,
                                    companions)
        if source is not None and (config.mixed_precision is not None or control_data):
            source.collect(denoiser, 0, progress)  # before anything is wrapped: every module in full precision
        plan = None
        if config.mixed_precision is not None:  # measure and allocate on the FP denoiser, then wrap the plan
            plan = plan_mixed_precision(denoiser, adapter, config, source.iter_calls(), progress,
                                        source.guidance_scale())
            config = plan.config
        info = _quantize_module(denoiser, adapter, config, source, attr, progress)
        if plan is not None:
            info.calibration["mixed_precision"] = plan.report()
        if control is not None:
            control_source = source.companions[CONTROLNET_ATTRIBUTE] if control_data else None
            attach_info(control.module, _quantize_module(control.module, control.adapter, control.config,
                                                         control_source, CONTROLNET_ATTRIBUTE, progress))
    attach_info(pipe, info)
    make_quantized(pipe)
    if config.correction is not None:
        info.calibration["correction"] = _fit_correction(pipe, info, prompts, progress, call_kwargs)
    return pipe


def _quantize_module(module, adapter, config: QuantConfig, source, attr: str, progress: bool) -> QuantizationInfo:
    """Wrap ``module`` (the denoiser, or a ControlNet), run the calibration phases over ``source`` and switch its
    activation quantizers on; what was done."""
    info = QuantizationInfo(config, attr, adapter.name, wrap_denoiser(module, config, adapter))
    info.calibration = calibrate(CalibrationRun(module, adapter, config, source, progress))
    info.report.attention = [name for name, _ in quantized_attention(module)]  # calibration may release some
    set_activation_mode(module, "quant")
    info.outliers = info.calibration.pop("outliers", {})
    return info


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
    """Switch the quantized layers of the denoiser (and of a ControlNet quantized with it) to integer storage in
    place; returns ``pipe``."""
    _, denoiser, _ = find_denoiser(pipe)
    for module in (denoiser, *quantized_components(pipe).values()):
        for _, layer in quant_layers(module):
            layer.freeze()
    for holder in (pipe, *quantized_components(pipe).values()):
        info = getattr(holder, "dmquant", None)
        if info is not None:
            info.frozen = True
    return pipe


def precompute_time_tables(pipe, num_inference_steps: int) -> int:
    """TDQ (``time.mode: learned``): the activation ranges for the steps of a run of ``num_inference_steps``
    with the pipeline's scheduler, computed before generating (simulated, frozen or loaded models alike);
    returns the quantizers updated (the denoiser's and those of a ControlNet quantized with it)."""
    _, denoiser, adapter = find_denoiser(pipe)
    modules = [(denoiser, adapter), *((m, adapter_for(m)) for m in quantized_components(pipe).values())]
    learned = [q for module, _ in modules for q in activation_quantizers(module) if q.learned]
    if not learned:
        raise DMQuantError("this model has no learned (TDQ) time-conditioned quantizer: only time.mode='learned' "
                           "can compute ranges for new timesteps; others fall back to the nearest calibrated step")
    steps = scheduler_timesteps(pipe.scheduler, num_inference_steps)
    for module, module_adapter in modules:
        keys = steps * module_adapter.timestep_scale  # as the pipeline passes them to the module
        retabled = [q for q in activation_quantizers(module) if q.learned]
        for q in retabled:
            q.retable(keys)
        if retabled:
            time_table(module).set_keys(keys)
        for _, layer in quant_layers(module):
            if layer.frozen:
                layer.prepare_kernels()  # convs pack their weight with each table entry's input scale
    return len(learned)
