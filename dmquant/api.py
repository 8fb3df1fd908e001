"""The public entry point: ``dmquant.quantize(pipe, recipe, prompts=...)``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dmquant.calibration.collect import check_prompts, collect_denoiser_inputs, process_state, shared_temp_dir
from dmquant.calibration.observe import observe_activations
from dmquant.calibration.outliers import prepare_outlier_branches
from dmquant.calibration.records import CalibrationSet
from dmquant.calibration.samplers import make_sampler
from dmquant.config import QuantConfig, load_recipe
from dmquant.errors import DMQuantError
from dmquant.models.adapters import find_denoiser
from dmquant.nn.wrap import (
    WrapReport,
    full_precision,
    quant_layers,
    set_activation_mode,
    wrap_denoiser,
)


@dataclass
class QuantizationInfo:
    """What ``quantize`` did; attached to the pipeline as ``pipe.dmquant``."""

    config: QuantConfig
    denoiser: str
    adapter: str
    report: WrapReport
    calibration: dict = field(default_factory=dict)
    frozen: bool = False
    outliers: dict = field(default_factory=dict)
    correction: object | None = None  # NoiseCorrectionStats when the recipe has 'correction'


def apply_recipe(pipe, recipe, progress: bool = False) -> QuantizationInfo:
    """Wrap the pipeline's denoiser for ``recipe`` and quantize its weights (no activation statistics).

    Rotation and the low-rank branch are attached here; smoothing, which needs activation
    statistics, is attached by :func:`quantize` during calibration.
    """
    config = load_recipe(recipe)
    attr, denoiser, adapter = find_denoiser(pipe)
    report = wrap_denoiser(denoiser, config, adapter)
    outliers = {}
    if not config.has_outlier_branch:
        for _, layer in quant_layers(denoiser):
            layer.calibrate_weight()
    elif config.smoothing is None:  # the outlier stage quantizes the weights it transforms
        outliers = prepare_outlier_branches(denoiser, config, progress=progress)
    set_activation_mode(denoiser, "quant" if not config.needs_calibration_data else "off")
    info = QuantizationInfo(config, attr, adapter.name, report, outliers=outliers)
    _attach(pipe, info)
    from dmquant.pipeline import make_quantized

    make_quantized(pipe)
    return info


def quantize(
    pipe,
    recipe: str | Path | dict | QuantConfig = "w8a8",
    prompts: Sequence | None = None,
    *,
    num_inference_steps: int | None = None,
    num_timesteps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    calib_dir: str | Path | None = None,
    calibration_data: Iterable[tuple[tuple, dict]] | None = None,
    progress: bool = True,
    **call_kwargs,
):
    """Quantize the denoiser of ``pipe`` in place (simulation) and return ``pipe``.

    ``prompts`` are strings (text-conditioned pipelines) or class ids (class-conditioned ones);
    recipes whose activations are dynamic or unquantized (e.g. W4A16) need none. Keyword arguments
    not named here (``height``, ``guidance_scale``, ...) go to the pipeline call used for calibration.
    Calibration inputs are stored as safetensors shards in ``calib_dir`` (a temporary folder if None).
    ``calibration_data`` (``(args, kwargs)`` denoiser calls) replaces the pipeline runs, e.g. for a
    bare denoiser module.
    """
    config = load_recipe(recipe)
    config = replace(config, calibration=_override(config.calibration, num_inference_steps, num_timesteps, batch_size, seed))
    find_denoiser(pipe)  # fail early on pipelines without a denoiser
    if config.needs_calibration_data and calibration_data is None:
        prompts = check_prompts(pipe, prompts)[: config.calibration.max_prompts]
    if config.correction is not None and calibration_data is not None:
        raise DMQuantError("noise correction ('correction') is fitted on sampling runs of the pipeline: pass "
                           "prompts instead of calibration_data, or drop the 'correction' section")
    info = apply_recipe(pipe, config, progress=progress)
    if config.needs_calibration_data and calibration_data is not None:
        _, denoiser, _ = find_denoiser(pipe)
        calls = list(calibration_data)
        if config.smoothing is not None:
            info.outliers = prepare_outlier_branches(denoiser, config, calls, progress)
        info.calibration = {"denoiser_calls": observe_activations(denoiser, calls, progress)}
        if config.reconstruction is not None:
            from dmquant.calibration.reconstruct import reconstruct

            info.calibration["reconstruction"] = reconstruct(denoiser, config, calls, progress=progress)
    elif config.needs_calibration_data:
        info.calibration = _calibrate_activations(pipe, info, prompts, calib_dir, progress, call_kwargs)
    if config.correction is not None:
        info.calibration["correction"] = _fit_correction(pipe, info, prompts, progress, call_kwargs)
    return pipe


def _fit_correction(pipe, info: QuantizationInfo, prompts, progress, call_kwargs) -> dict:
    """Fit the recipe's noise correction on the quantized pipeline's own runs and hook it on."""
    from dmquant.correction.ptqd import apply_noise_correction, fit_noise_correction

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


def _override(calib, steps, timesteps, batch_size, seed):
    changes = {k: v for k, v in dict(num_inference_steps=steps, num_timesteps=timesteps,
                                     batch_size=batch_size, seed=seed).items() if v is not None}
    return replace(calib, **changes)


def _calibrate_activations(pipe, info: QuantizationInfo, prompts, calib_dir, progress, call_kwargs) -> dict:
    _, denoiser, _ = find_denoiser(pipe)
    config = info.config
    c = config.calibration
    sampler = make_sampler(c.sampler, c.num_timesteps, c.seed)
    steps_of = _StepsOf(sampler, c.num_inference_steps)
    start = time.perf_counter()
    if config.time is not None:
        set_time_keys(denoiser, pipe.scheduler, c.num_inference_steps)
    param = next(denoiser.parameters())
    rounds = c.sampler.rounds if c.sampler.kind == "progressive" else 0
    with shared_temp_dir() as tmp:
        folder = Path(calib_dir) if calib_dir is not None else tmp
        set_activation_mode(denoiser, "off")
        with full_precision(denoiser):
            collect_denoiser_inputs(pipe, denoiser, prompts, steps_of, folder, c.num_inference_steps,
                                    c.batch_size, c.seed, progress, call_kwargs)
        if config.smoothing is not None:
            info.outliers = prepare_outlier_branches(
                denoiser, config, CalibrationSet(folder).iter_calls(param.device, param.dtype), progress)
        calls = observe_activations(denoiser, CalibrationSet(folder).iter_calls(param.device, param.dtype), progress)
        for r in range(rounds):  # PCR: record again along the quantized model's own trajectory
            folder = Path(tmp) / f"progressive-{r + 1}"
            collect_denoiser_inputs(pipe, denoiser, prompts, steps_of, folder, c.num_inference_steps,
                                    c.batch_size, c.seed, progress, call_kwargs)
            calls = observe_activations(denoiser, CalibrationSet(folder).iter_calls(param.device, param.dtype),
                                        progress)
        observed = time.perf_counter() - start
        recon = _reconstruct(denoiser, config, CalibrationSet(folder), param, progress)
    return {"prompts": len(prompts), "steps": sorted(steps_of.seen), "num_inference_steps": c.num_inference_steps,
            "sampler": c.sampler.kind, "progressive_rounds": rounds, "denoiser_calls": calls,
            "seconds_observation": round(observed, 2), **recon, "processes": process_state().num_processes,
            "seconds": round(time.perf_counter() - start, 2)}


class _StepsOf:
    """The sampler's steps for each prompt batch; remembers every step it handed out."""

    def __init__(self, sampler, num_inference_steps: int):
        self.sampler, self.n, self.seen = sampler, num_inference_steps, set()

    def __call__(self, batch: int) -> list[int]:
        steps = self.sampler.select(self.n, batch)
        self.seen.update(steps)
        return steps


def set_time_keys(denoiser, scheduler, num_inference_steps: int) -> None:
    """Time tables get one entry per timestep of the scheduler's run (the steps generation will visit)."""
    from dmquant.nn.timestep import install_timestep_hook, scheduler_timesteps

    copy = type(scheduler).from_config(scheduler.config)  # the pipeline's own scheduler keeps its state
    install_timestep_hook(denoiser).set_keys(scheduler_timesteps(copy, num_inference_steps))


def _reconstruct(denoiser, config: QuantConfig, calib: CalibrationSet, param, progress) -> dict:
    if config.reconstruction is None:
        return {}
    from dmquant.calibration.reconstruct import reconstruct

    start = time.perf_counter()
    report = reconstruct(denoiser, config, calib.iter_calls(param.device, param.dtype), progress=progress)
    return {"reconstruction": report, "seconds_reconstruction": round(time.perf_counter() - start, 2)}


def _attach(pipe, info: QuantizationInfo) -> None:
    object.__setattr__(pipe, "dmquant", info)


def precompute_time_tables(pipe, num_inference_steps: int) -> int:
    """TDQ (``time.mode: learned``): compute the activation ranges for the steps of a run of
    ``num_inference_steps`` with the pipeline's scheduler, before generating; returns the quantizers updated."""
    from dmquant.nn.timestep import precompute_learned_tables

    _, denoiser, _ = find_denoiser(pipe)
    return precompute_learned_tables(denoiser, pipe.scheduler, num_inference_steps)
