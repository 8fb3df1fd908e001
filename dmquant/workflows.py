"""End-to-end jobs behind the command line, usable from Python too."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from dmquant.api import quantize, with_budget
from dmquant.config import load_recipe
from dmquant.diffusers_io import check_call_inputs, process_state, prompts_for_pipeline
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate, is_video_pipeline
from dmquant.loading import load_pipeline
from dmquant.prompts import read_prompts
from dmquant.runs import check_image_path, check_output_folder, save_image_atomic, save_run


@dataclass(frozen=True)
class CalibrateJob:
    model: str
    recipe: str
    out: str
    prompts: str | None = None
    num_inference_steps: int | None = None
    num_timesteps: int | None = None
    batch_size: int | None = None
    max_prompts: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    target_bits: float | None = None
    max_weight_memory: str | None = None
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | None) -> int | None:
    """Bytes from ``2GB``, ``1.5 GiB``, ``700MB`` or ``123456`` (None stays None)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match and SIZE_UNITS.get(match.group(2).upper())
    if not unit or float(match.group(1)) * unit < 1:
        raise DMQuantError(f"--max-weight-memory {text!r} is not a size: write e.g. 2GB, 700MiB or 123456 (bytes)")
    return int(float(match.group(1)) * unit)


def calibrate(job: CalibrateJob) -> Path:
    """Load, quantize and calibrate, then write the run folder; returns its path."""
    # every input is checked before any work: recipe, numbers, prompt file, output folder, then the model
    config = with_budget(load_recipe(job.recipe), job.target_bits, parse_size(job.max_weight_memory))
    for name in ("num_inference_steps", "num_timesteps", "batch_size", "max_prompts", "height", "width",
                 "num_frames"):
        value = getattr(job, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DMQuantError(f"{name}={value!r} must be a positive integer")
    if job.seed is not None and (isinstance(job.seed, bool) or not isinstance(job.seed, int) or job.seed < 0):
        raise DMQuantError(f"seed={job.seed!r} must be a non-negative integer")
    prompts = read_prompts(job.prompts) if job.prompts else None
    if job.max_prompts is not None and prompts:
        prompts = prompts[: job.max_prompts]
    check_output_folder(job.out, job.overwrite)
    start = time.perf_counter()
    pipe = load_pipeline(job.model, device=job.device)
    steps = job.num_inference_steps or config.calibration.num_inference_steps
    check_call_inputs(pipe, steps, job.height, job.width)
    if job.num_frames is not None and not is_video_pipeline(pipe):
        raise DMQuantError(f"{type(pipe).__name__} is an image pipeline: --num-frames is for video pipelines")
    if prompts is not None:
        prompts = prompts_for_pipeline(pipe, prompts)
    call_kwargs = {k: v for k, v in dict(guidance_scale=job.guidance_scale, height=job.height,
                                         width=job.width, num_frames=job.num_frames).items() if v is not None}
    quantize(pipe, config, prompts, num_inference_steps=job.num_inference_steps, num_timesteps=job.num_timesteps,
             batch_size=job.batch_size, seed=job.seed, progress=job.progress, **call_kwargs)
    state = process_state(job.device)
    if state.is_main_process:  # under accelerate, the main process writes the folder
        save_run(pipe, job.out, job.model, seconds=time.perf_counter() - start, overwrite=job.overwrite)
    state.wait_for_everyone()
    return Path(job.out)


def generate_image(model: str, prompt: str, out: str, num_inference_steps: int = 25, seed: int = 0,
                   guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                   device: str = "cpu", num_frames: int | None = None) -> Path:
    """One image from ``prompt`` (seed ``seed``; the pipeline's own guidance scale unless given) into ``out``.
    A video pipeline's frames go into one strip image, left to right, or an animated GIF if ``out`` ends
    with .gif (``num_frames``: the pipeline's default when None)."""
    config = GenerationConfig(num_inference_steps, guidance_scale, seed, batch_size=1, progress=False,
                              num_frames=num_frames)
    check_image_path(out)  # before any work
    pipe = load_pipeline(model, device=device)
    kwargs = {k: v for k, v in dict(height=height, width=width).items() if v is not None}
    return save_image_atomic(generate(pipe, [prompt], config, distributed=False, **kwargs)[0], out)
