"""End-to-end jobs behind the command line, usable from Python too."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dmquant.api import quantize
from dmquant.config import load_recipe
from dmquant.diffusers_io import process_state, prompts_for_pipeline
from dmquant.generation import GenerationConfig, generate
from dmquant.loading import load_pipeline
from dmquant.prompts import read_prompts
from dmquant.runs import check_output_folder, save_image_atomic, save_run


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
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True


def calibrate(job: CalibrateJob) -> Path:
    """Load, quantize and calibrate, then write the run folder; returns its path."""
    config = load_recipe(job.recipe)  # bad recipes fail before the model loads
    prompts = read_prompts(job.prompts) if job.prompts else None
    if job.max_prompts is not None and prompts:
        prompts = prompts[: job.max_prompts]
    check_output_folder(job.out, job.overwrite)  # before any work
    start = time.perf_counter()
    pipe = load_pipeline(job.model, device=job.device)
    if prompts is not None:
        prompts = prompts_for_pipeline(pipe, prompts)
    call_kwargs = {k: v for k, v in dict(guidance_scale=job.guidance_scale, height=job.height,
                                         width=job.width).items() if v is not None}
    quantize(pipe, config, prompts, num_inference_steps=job.num_inference_steps, num_timesteps=job.num_timesteps,
             batch_size=job.batch_size, seed=job.seed, progress=job.progress, **call_kwargs)
    state = process_state(job.device)
    if state.is_main_process:  # under accelerate, the main process writes the folder
        save_run(pipe, job.out, job.model, seconds=time.perf_counter() - start, overwrite=job.overwrite)
    state.wait_for_everyone()
    return Path(job.out)


def generate_image(model: str, prompt: str, out: str, num_inference_steps: int = 25, seed: int = 0,
                   guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                   device: str = "cpu") -> Path:
    """One image from ``prompt`` (seed ``seed``; the pipeline's own guidance scale unless given) into ``out``."""
    pipe = load_pipeline(model, device=device)
    kwargs = {k: v for k, v in dict(height=height, width=width).items() if v is not None}
    config = GenerationConfig(num_inference_steps, guidance_scale, seed, batch_size=1, progress=False)
    return save_image_atomic(generate(pipe, [prompt], config, distributed=False, **kwargs)[0], out)
