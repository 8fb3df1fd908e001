"""``dmquant inspect``: where a recipe loses, layer by layer, on a user's own pipeline.

    record     the full-precision pipeline runs the held-out prompts (other prompts than calibration, other
               seeds) and the denoiser's calls at ``num_timesteps`` evenly spaced steps are recorded
    quantize   :func:`dmquant.quantize` with the recipe on the calibration prompts (simulated)
    measure    each recorded call once through the FP model with hooks (per-layer SQNR of weights only,
               activations only, both; input statistics), then through the quantized model
               (:mod:`dmquant.diagnostics.measure`)
    report     the worst layers with their likely causes, ``inspect.json``, ``report.md`` and two plots
               (:mod:`dmquant.diagnostics.report`)
"""

from __future__ import annotations

import inspect
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dmquant import __version__
from dmquant.api import quantize
from dmquant.calibration.collect import collect_denoiser_inputs, shared_temp_dir
from dmquant.calibration.records import load_calls
from dmquant.config import QuantConfig, load_recipe
from dmquant.diagnostics.measure import CallInfo, Inspector, results
from dmquant.diagnostics.report import (
    diagnose,
    draw_sqnr_bars,
    draw_step_ranges,
    report_markdown,
    worst_layers,
)
from dmquant.diffusers_io import check_call_inputs, check_prompts, is_class_conditional, prompts_for_pipeline
from dmquant.errors import DMQuantError
from dmquant.loading import load_pipeline
from dmquant.models.adapters import find_denoiser
from dmquant.nn.wrap import quant_layers
from dmquant.prompts import read_prompts
from dmquant.quantizers.timetable import single_timestep
from dmquant.runs import atomic_folder, check_output_folder

EVAL_SEED_OFFSET = 10_000  # held-out runs use seeds seed + 10000 + batch (calibration: seed + batch)
INSPECT_FORMAT, INSPECT_VERSION = "dmquant-inspect", 1


def split_prompts(prompts: list, eval_prompts: list | None, num_eval: int) -> tuple[list, list, bool]:
    """``(calibration, held-out, held out by prompt)``: the given held-out prompts, else the last
    ``min(num_eval, n // 2)`` prompts (the same prompt, other seeds, when there is only one)."""
    if eval_prompts:
        return list(prompts), list(eval_prompts[:num_eval]), True
    if len(prompts) < 2:
        return list(prompts), list(prompts), False
    k = max(1, min(num_eval, len(prompts) // 2))
    return list(prompts[:-k]), list(prompts[-k:]), True


def eval_steps(num_inference_steps: int, num_timesteps: int) -> list[int]:
    """``num_timesteps`` step indices evenly spread over the run, first and last included."""
    n = min(num_timesteps, num_inference_steps)
    if n == 1:
        return [0]
    return sorted({round(i * (num_inference_steps - 1) / (n - 1)) for i in range(n)})


def _batch_of(args: tuple, kwargs: dict) -> int:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return int(value.shape[0])
    return 1


def _calls_with_steps(calls: list, steps: list[int], prompts_in_batch: int, adapter, class_conditional: bool):
    """``(args, kwargs, CallInfo)`` per recorded call: consecutive calls with one timestep are one step (the
    recorder kept only the chosen steps, in order); a call of twice the prompts' batch holds both CFG halves
    (uncond first, as diffusers' text pipelines build it; cond first for class-conditioned DiT); two calls
    of one step are cond then uncond (true-CFG pipelines)."""
    groups: list[list] = []
    last = object()
    for args, kwargs in calls:
        try:
            key = single_timestep(adapter.read_timestep(args, kwargs))
        except DMQuantError:
            key = None
        if key is None or key != last or not groups:
            groups.append([])
        groups[-1].append((args, kwargs, key))
        last = key
    out = []
    for step, group in zip(steps, groups):
        names = ("cond", "uncond") if len(group) == 2 else tuple(f"call{i}" for i in range(len(group)))
        halves = ("cond", "uncond") if class_conditional else ("uncond", "cond")
        for i, (args, kwargs, key) in enumerate(group):
            batch = _batch_of(args, kwargs)
            info = CallInfo(step, float("nan") if key is None else key, batch)
            if len(group) == 1 and batch == 2 * prompts_in_batch:
                info.halves = halves
            elif len(group) > 1:
                info.branch = names[i]
            out.append((args, kwargs, info))
    return out


def inspect_quantization(pipe, recipe: str | Path | dict | QuantConfig = "w8a8", prompts: Sequence | None = None, *,
                         eval_prompts: Sequence | None = None, num_inference_steps: int | None = None,
                         num_timesteps: int = 5, num_eval_prompts: int = 4, seed: int = 0, progress: bool = True,
                         base_model: str = "", **call_kwargs) -> dict:
    """Quantize ``pipe``'s denoiser with ``recipe`` (simulated, in place: ``pipe`` is quantized afterwards)
    on ``prompts`` and measure, on held-out denoiser calls, where it loses: returns ``inspect.json``'s content.

    Held-out calls: the full-precision pipeline run on ``eval_prompts`` (else the last
    ``min(num_eval_prompts, len(prompts) // 2)`` prompts, which then calibrate nothing) with seeds
    ``seed + 10000 + batch``, recorded at ``num_timesteps`` evenly spaced steps of a ``num_inference_steps`` run
    (default: the recipe's calibration steps). ``call_kwargs`` (``guidance_scale``, ``height``, ...) go to every
    pipeline call, calibration included.
    """
    start = time.perf_counter()
    config = load_recipe(recipe)
    _, denoiser, adapter = find_denoiser(pipe)
    if quant_layers(denoiser):
        raise DMQuantError("this pipeline's denoiser is quantized already: inspect the full-precision model with a "
                           "recipe (a saved quantized folder holds no full-precision weights)")
    for name, value in (("num_timesteps", num_timesteps), ("num_eval_prompts", num_eval_prompts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DMQuantError(f"{name}={value!r} must be a positive integer")
    prompts = check_prompts(pipe, prompts)
    calib, held, by_prompt = split_prompts(prompts, check_prompts(pipe, eval_prompts) if eval_prompts else None,
                                           num_eval_prompts)
    steps_n = num_inference_steps or config.calibration.num_inference_steps
    check_call_inputs(pipe, steps_n)
    steps = eval_steps(steps_n, num_timesteps)
    eval_seed = seed + EVAL_SEED_OFFSET
    base_model = base_model or type(pipe).__name__
    with shared_temp_dir("dmquant-inspect-") as folder:
        collect_denoiser_inputs(pipe, denoiser, held, steps, folder, steps_n, batch_size=len(held), seed=eval_seed,
                                progress=progress, call_kwargs=call_kwargs, step_key=_step_key(adapter))
        guidance = call_kwargs.get("guidance_scale", getattr(pipe, "_guidance_scale", None)) or _default_guidance(pipe)
        quantize(pipe, config, calib, num_inference_steps=steps_n, seed=seed, progress=progress, **call_kwargs)
        _, denoiser, adapter = find_denoiser(pipe)
        inspector = Inspector(denoiser, adapter.concat_points(denoiser))
        param = next(denoiser.parameters())
        calls = load_calls(Path(folder) / "shard-00000.safetensors", param.device, param.dtype)
        recorded = _calls_with_steps(calls, steps, len(held), adapter, is_class_conditional(pipe))
        for args, kwargs, info in recorded:
            inspector.run(args, kwargs, info, guidance_scale=guidance)
    data = {"format": INSPECT_FORMAT, "version": INSPECT_VERSION, "dmquant_version": __version__,
            "base_model": base_model, "recipe": config.name, "tag": config.tag,
            "denoiser": type(denoiser).__name__}
    data.update(results(inspector))
    cfg = ("batched" if any(i.halves for *_, i in recorded) else
           "separate calls" if any(i.branch != "all" for *_, i in recorded) else "none")
    data["settings"] = {"num_inference_steps": steps_n, "guidance_scale": guidance, "seed": seed,
                        "eval_seed": eval_seed, "calibration_prompts": len(calib), "eval_prompts": len(held),
                        "held_out_prompts": by_prompt, "denoiser_calls": len(recorded), "cfg": cfg,
                        "calibration": _jsonable(pipe.dmquant.calibration)}
    for layer in data["layers"].values():
        layer["causes"] = diagnose(layer)
    data["worst"] = worst_layers(data["layers"])
    data["seconds"] = round(time.perf_counter() - start, 2)
    return data


def _default_guidance(pipe) -> float | None:
    """The guidance scale a pipeline call uses by default (its ``guidance_scale`` argument's default)."""
    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    default = None if param is None else param.default
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def _step_key(adapter):
    def key(args, kwargs):
        try:
            return single_timestep(adapter.read_timestep(args, kwargs))
        except DMQuantError:
            return None
    return key


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def write_inspection(data: dict, out: str | Path, overwrite: bool = False) -> Path:
    """``inspect.json``, ``report.md``, ``sqnr_layers.png`` and ``step_ranges.png`` into the folder ``out``
    (written atomically; replaces only an earlier inspect folder, and only with ``overwrite``)."""
    files = {"inspect.json": json.dumps(data, indent=2, allow_nan=False) + "\n", "report.md": report_markdown(data)}
    for name, draw in (("sqnr_layers.png", draw_sqnr_bars), ("step_ranges.png", draw_step_ranges)):
        buffer = io.BytesIO()
        draw(data).save(buffer, format="PNG")
        files[name] = buffer.getvalue()
    with atomic_folder(out, overwrite, kind="inspect", replaceable=("inspect",)) as tmp:
        for name, content in files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    return Path(out)


@dataclass(frozen=True)
class InspectJob:
    model: str
    recipe: str
    prompts: str
    out: str
    eval_prompts: str | None = None
    num_inference_steps: int | None = None
    num_timesteps: int = 5
    num_eval_prompts: int = 4
    max_prompts: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True


def run_inspect(job: InspectJob) -> tuple[Path, dict]:
    """The command: every input checked before any work (recipe, numbers, prompt files, output folder,
    then the model), then :func:`inspect_quantization` and :func:`write_inspection`."""
    config = load_recipe(job.recipe)
    for name in ("num_inference_steps", "num_timesteps", "num_eval_prompts", "max_prompts", "height", "width"):
        value = getattr(job, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DMQuantError(f"{name}={value!r} must be a positive integer")
    prompts = read_prompts(job.prompts)
    if job.max_prompts is not None:
        prompts = prompts[: job.max_prompts]
    eval_prompts = read_prompts(job.eval_prompts) if job.eval_prompts else None
    check_output_folder(job.out, job.overwrite, replaceable=("inspect",))
    pipe = load_pipeline(job.model, device=job.device)
    check_call_inputs(pipe, job.num_inference_steps or config.calibration.num_inference_steps, job.height, job.width)
    prompts = prompts_for_pipeline(pipe, prompts)
    eval_prompts = prompts_for_pipeline(pipe, eval_prompts) if eval_prompts else None
    call_kwargs = {k: v for k, v in dict(guidance_scale=job.guidance_scale, height=job.height,
                                         width=job.width).items() if v is not None}
    data = inspect_quantization(pipe, config, prompts, eval_prompts=eval_prompts,
                                num_inference_steps=job.num_inference_steps, num_timesteps=job.num_timesteps,
                                num_eval_prompts=job.num_eval_prompts, seed=job.seed, progress=job.progress,
                                base_model=job.model, **call_kwargs)
    return write_inspection(data, job.out, job.overwrite), data
