"""Collect the denoiser's inputs at chosen denoising steps by running the full-precision pipeline.

A forward pre-hook on the denoiser counts the steps within one pipeline call and records the calls
at the sampler's steps (classifier-free guidance as the pipeline builds it: one batched call, or
separate conditional and unconditional calls, which share a step when ``step_key`` tells the step). Batches of prompts can be spread over processes with accelerate; each
process writes its own shards. Other modules the pipeline calls at each step (a ControlNet) can be recorded
at the same steps, each into a folder of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmquant.calibration.records import save_calls
from dmquant.diffusers_io import (
    batch_call_arguments,
    conditioning_argument,
    guidance_arguments,
    process_state,
)
from dmquant.errors import DMQuantError
from dmquant.runs import make_own_temp_folder, remove_own_folder


class _StepRecorder:
    """Forward pre-hook that keeps the calls whose step index within a pipeline call is selected.

    ``step_key(args, kwargs)`` (e.g. the call's timestep) tells calls of one step apart from the next:
    consecutive calls with the same key are one step; without it, or where it returns None, every
    call is a step.
    """

    def __init__(self, steps: Sequence[int], step_key: Callable[[tuple, dict], object] | None = None):
        self.steps, self.step_key = set(steps), step_key
        self.reset()

    def reset(self, steps: Sequence[int] | None = None) -> None:
        self.calls, self.index, self.last = [], -1, None
        if steps is not None:
            self.steps = set(steps)

    def __call__(self, module, args, kwargs):
        key = self.step_key(args, kwargs) if self.step_key is not None else None
        if key is None or key != self.last:
            self.index += 1
        self.last = key
        if self.index in self.steps:
            self.calls.append((args, dict(kwargs)))


def collect_denoiser_inputs(
    pipe,
    denoiser: torch.nn.Module,
    prompts: Sequence,
    steps: Sequence[int] | Callable[[int], Sequence[int]],
    out_dir: str | Path,
    num_inference_steps: int,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    call_kwargs: dict | None = None,
    step_key: Callable[[tuple, dict], object] | None = None,
    others: dict[Path, tuple[torch.nn.Module, Callable[[tuple, dict], object] | None]] | None = None,
) -> Path:
    """Run ``pipe`` over ``prompts`` and store the denoiser's inputs at ``steps`` under ``out_dir``.

    ``steps`` is a list of step indices, or a function of the batch index giving them (samplers that
    draw steps afresh for every prompt batch). ``others`` maps a folder to another module of the pipeline
    and its step key: that module's calls at the same steps are stored there. Call arguments with one
    conditioning image per prompt are split with the prompt batches (:func:`batch_call_arguments`).
    """
    state = process_state()
    targets = {Path(out_dir): (denoiser, step_key), **(others or {})}
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
    cond_arg = conditioning_argument(pipe)
    starts = range(0, len(prompts), batch_size)
    steps_of = steps if callable(steps) else (lambda _batch, fixed=list(steps): fixed)
    recorders = {folder: _StepRecorder(steps_of(0), key) for folder, (_, key) in targets.items()}
    handles = [module.register_forward_pre_hook(recorders[folder], with_kwargs=True)
               for folder, (module, _) in targets.items()]
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    indexed = list(enumerate(starts))
    try:
        with state.split_between_processes(indexed) as mine:
            bar = tqdm(mine, desc="calibration: collecting denoiser inputs", disable=not progress or not state.is_main_process)
            for index, start in bar:
                batch, chosen = list(prompts[start : start + batch_size]), steps_of(index)
                for recorder in recorders.values():
                    recorder.reset(chosen)
                generator = torch.Generator("cpu").manual_seed(seed + index)
                kwargs = batch_call_arguments(pipe, call_kwargs or {}, start, len(batch), len(prompts))
                with torch.no_grad():
                    pipe(**{cond_arg: batch}, num_inference_steps=num_inference_steps,
                         generator=generator, output_type="latent", **guidance_arguments(pipe, kwargs, len(batch)))
                for folder, recorder in recorders.items():
                    if not recorder.calls:
                        what = "the denoiser" if folder == Path(out_dir) else type(targets[folder][0]).__name__
                        raise DMQuantError(f"{what} was never called at steps {sorted(recorder.steps)} with "
                                           f"{num_inference_steps} steps")
                    save_calls(recorder.calls, folder / f"shard-{index:05d}.safetensors")
    finally:
        for handle in handles:
            handle.remove()
    state.wait_for_everyone()
    return Path(out_dir)


@contextmanager
def shared_temp_dir(prefix: str = "dmquant-calib-") -> Iterator[Path]:
    """A temporary folder that every accelerate process sees (made by the main process, then shared)."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    path = [make_own_temp_folder(prefix) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(path)
    try:
        yield Path(path[0])
    finally:
        state.wait_for_everyone()
        if state.is_main_process:
            remove_own_folder(Path(path[0]))
