"""The calibration run: explicit phases over a *source* of denoiser calls.

    collect      the source records full-precision denoiser calls (prompts through the pipeline at the
                 sampler's steps, or calls the user recorded); the TimeTable gets the run's timesteps.
                 A pipeline source also records, in the same runs, the calls to the pipeline's other
                 modules it is asked for (a ControlNet): :class:`CompanionSource` replays them
    outliers     smoothing (from the collected calls), rotation, low-rank branch; every weight quantized
    observe      static activation ranges from the calls; a sampler with ``rounds`` (PCR) records again
                 along the quantized model's own trajectory and observes again, ``rounds`` times
    reconstruct  AdaRound / BRECQ rounding and LSQ activation scales (recipes with ``reconstruction``)

Noise correction, fitted on the quantized pipeline's own sampling runs, follows in
:func:`dmquant.api.quantize`; freezing (integer storage) is :func:`dmquant.api.freeze`. Each phase is a
function of the run's state; :func:`calibrate` runs those the recipe asks for and returns the report.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dmquant.calibration.collect import collect_denoiser_inputs
from dmquant.calibration.finite import check_finite_quantizers, check_finite_weights
from dmquant.calibration.observe import observe_activations
from dmquant.calibration.outliers import prepare_outlier_branches
from dmquant.calibration.reconstruct import reconstruct
from dmquant.calibration.records import CalibrationSet
from dmquant.calibration.samplers import make_sampler
from dmquant.config import CalibrationConfig, QuantConfig
from dmquant.diffusers_io import guidance_scale_of, process_state, scheduler_timesteps
from dmquant.errors import DMQuantError
from dmquant.models.adapters import DenoiserAdapter
from dmquant.nn.wrap import full_precision, quant_layers, time_table
from dmquant.quantizers.timetable import single_timestep


class CallSource:
    """Denoiser calls recorded by the user: ``(args, kwargs)`` pairs, replayed as they are."""

    def __init__(self, calls: Iterable[tuple[tuple, dict]], adapter: DenoiserAdapter):
        self.calls, self.adapter = list(calls), adapter
        if not self.calls:
            raise DMQuantError("calibration_data holds no denoiser calls: pass at least one (args, kwargs) pair")

    def collect(self, denoiser: nn.Module, round_index: int, progress: bool) -> None:
        if round_index:
            raise DMQuantError("the progressive sampler re-records along the quantized model's trajectory: "
                               "it needs prompts through a pipeline, not calibration_data")

    def timesteps(self) -> torch.Tensor:
        ts = {single_timestep(self.adapter.read_timestep(a, k)) for a, k in self.calls}
        return torch.tensor(sorted(ts, reverse=True), dtype=torch.float64)

    def iter_calls(self) -> Iterator[tuple[tuple, dict]]:
        return iter(self.calls)

    def guidance_scale(self) -> float | None:
        """Recorded calls carry no CFG scale (a recipe's ``reconstruction.guidance_scale`` gives one)."""
        return None

    def summary(self) -> dict:
        return {"denoiser_calls_given": len(self.calls)}


class PipelineSource:
    """Prompts run through the pipeline; the denoiser's calls at the sampler's steps are recorded into
    safetensors shards under ``folder`` (one sub-folder per recording round).

    The time table's keys are the timesteps the denoiser itself received in those runs (as the pipeline
    passes them: DDPM integers, or flow-matching values such as FLUX's sigma = t / 1000), so they match
    what the denoiser sees when it generates."""

    def __init__(self, pipe, denoiser: nn.Module, prompts: Sequence, c: CalibrationConfig, folder: Path,
                 call_kwargs: dict, adapter: DenoiserAdapter,
                 companions: dict[str, tuple[nn.Module, DenoiserAdapter]] | None = None):
        self.pipe, self.denoiser, self.prompts, self.c = pipe, denoiser, list(prompts), c
        self.folder, self.call_kwargs, self.adapter = Path(folder), call_kwargs, adapter
        self.sampler = make_sampler(c.sampler, c.num_timesteps, c.seed)
        self.steps: set[int] = set()
        self.seen: set[float] = set()
        self.current: Path | None = None
        self.companions = {name: CompanionSource(self, name, module, a) for name, (module, a) in
                           (companions or {}).items()}

    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        return remembered_timestep(self.adapter, self.seen, args, kwargs)

    def _steps_of(self, batch: int) -> list[int]:
        steps = self.sampler.select(self.c.num_inference_steps, batch)
        self.steps.update(steps)
        return steps

    def collect(self, denoiser: nn.Module, round_index: int, progress: bool) -> None:
        """Record the calls of round ``round_index`` (round 0 once: mixed precision records it before wrapping)."""
        if round_index == 0 and self.current == self.folder:
            return
        self.current = self.folder if round_index == 0 else self.folder / f"progressive-{round_index}"
        c = self.c
        others = {s.folder: (s.module, s.timestep) for s in self.companions.values()} if round_index == 0 else {}
        collect_denoiser_inputs(self.pipe, denoiser, self.prompts, self._steps_of, self.current,
                                c.num_inference_steps, c.batch_size, c.seed, progress, self.call_kwargs,
                                step_key=self._timestep, others=others)

    def timesteps(self) -> torch.Tensor:
        """The timesteps the denoiser received in the calibration runs (else those the pipeline's
        scheduler visits, scaled as the adapter says the pipeline passes them)."""
        if self.seen:
            return torch.tensor(sorted(self.seen, reverse=True), dtype=torch.float64)
        steps = scheduler_timesteps(self.pipe.scheduler, self.c.num_inference_steps)
        return steps * self.adapter.timestep_scale

    def iter_calls(self) -> Iterator[tuple[tuple, dict]]:
        param = next(self.denoiser.parameters())
        return CalibrationSet(self.current).iter_calls(param.device, param.dtype)

    def guidance_scale(self) -> float | None:
        """The CFG scale of the calibration runs."""
        return guidance_scale_of(self.pipe, self.call_kwargs)

    def summary(self) -> dict:
        return {"prompts": len(self.prompts), "steps": sorted(self.steps), "sampler": self.c.sampler.kind,
                "num_inference_steps": self.c.num_inference_steps, "processes": process_state().num_processes}


class CompanionSource:
    """The calls a :class:`PipelineSource`'s runs made to another module of the pipeline (a ControlNet), recorded
    at the same steps as the denoiser's (in the sub-folder ``name``), before anything was quantized. Replayed
    as recorded: no progressive rounds."""

    def __init__(self, parent: PipelineSource, name: str, module: nn.Module, adapter: DenoiserAdapter):
        self.parent, self.name, self.module, self.adapter = parent, name, module, adapter
        self.folder = parent.folder / name
        self.seen: set[float] = set()

    def timestep(self, args: tuple, kwargs: dict) -> float | None:
        return remembered_timestep(self.adapter, self.seen, args, kwargs)

    def collect(self, module: nn.Module, round_index: int, progress: bool) -> None:
        if self.parent.current is None:
            raise DMQuantError(f"the {self.name}'s calls are recorded with the denoiser's: collect the pipeline "
                               "source first, before anything is quantized")

    def timesteps(self) -> torch.Tensor:
        return torch.tensor(sorted(self.seen, reverse=True), dtype=torch.float64)

    def iter_calls(self) -> Iterator[tuple[tuple, dict]]:
        param = next(self.module.parameters())
        return CalibrationSet(self.folder).iter_calls(param.device, param.dtype)

    def guidance_scale(self) -> float | None:
        return self.parent.guidance_scale()

    def summary(self) -> dict:
        return {**self.parent.summary(), "recorded_with": "the denoiser's calibration runs"}


def remembered_timestep(adapter: DenoiserAdapter, seen: set[float], args: tuple, kwargs: dict) -> float | None:
    """The call's one timestep (added to ``seen``), or None (a per-sample or per-token timestep)."""
    try:
        t = single_timestep(adapter.read_timestep(args, kwargs))
    except DMQuantError:
        return None
    seen.add(t)
    return t


@dataclass
class CalibrationRun:
    """The state the phases share."""

    denoiser: nn.Module
    adapter: DenoiserAdapter
    config: QuantConfig
    source: CallSource | PipelineSource | CompanionSource | None
    progress: bool = True
    report: dict = field(default_factory=dict)

    @property
    def needs_calls(self) -> bool:
        c = self.config
        return c.needs_activation_ranges or c.smoothing is not None or c.reconstruction is not None


def collect(run: CalibrationRun) -> None:
    with full_precision(run.denoiser):
        run.source.collect(run.denoiser, 0, run.progress)
    table = time_table(run.denoiser)
    if table is not None:
        table.set_keys(run.source.timesteps())


def prepare_weights(run: CalibrationRun) -> None:
    """Outlier branches where the recipe asks for them (they quantize the residual weights); otherwise
    every layer's weight quantizers are calibrated on the weight."""
    if run.config.has_outlier_branch:
        calls = run.source.iter_calls() if run.config.smoothing is not None else None
        run.report["outliers"] = prepare_outlier_branches(run.denoiser, run.config, calls, run.progress)
        return
    for _, layer in quant_layers(run.denoiser):
        layer.calibrate_weight()


def observe(run: CalibrationRun) -> None:
    run.report["denoiser_calls"] = observe_activations(run.denoiser, run.source.iter_calls(), run.progress)
    rounds = getattr(getattr(run.source, "sampler", None), "rounds", 0)
    for r in range(rounds):  # PCR: record again along the quantized model's own trajectory
        run.source.collect(run.denoiser, r + 1, run.progress)
        run.report["denoiser_calls"] = observe_activations(run.denoiser, run.source.iter_calls(), run.progress)
    run.report["progressive_rounds"] = rounds


def reconstruct_phase(run: CalibrationRun) -> None:
    c = run.config
    learn = c.reconstruction.learn_act_scales and c.activations is not None
    run.report["reconstruction"] = reconstruct(run.denoiser, c.reconstruction, run.adapter, run.source.iter_calls(),
                                               learn, c.calibration.seed, run.progress,
                                               guidance_scale=run.source.guidance_scale())


def calibrate(run: CalibrationRun) -> dict:
    """Run the phases ``run.config`` asks for, in order; returns the report (with seconds per phase)."""
    phases = [("collect", collect, run.needs_calls), ("weights", prepare_weights, True),
              ("observe", observe, run.config.needs_activation_ranges),
              ("reconstruct", reconstruct_phase, run.config.reconstruction is not None)]
    if run.needs_calls and run.source is None:
        raise DMQuantError("this recipe calibrates on data: pass prompts (or calibration_data)")
    check_finite_weights(run.denoiser)  # NaN/Inf are named here, never saved as scales
    start = time.perf_counter()
    for name, phase, wanted in phases:
        if wanted:
            begin = time.perf_counter()
            phase(run)
            check_finite_quantizers(run.denoiser, name)
            run.report[f"seconds_{name}"] = round(time.perf_counter() - begin, 2)
    if run.source is not None and run.needs_calls:
        run.report.update(run.source.summary())
    run.report["seconds"] = round(time.perf_counter() - start, 2)
    return run.report
