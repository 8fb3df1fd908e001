"""Collect the denoiser's inputs at chosen denoising steps by running the full-precision pipeline.

A forward pre-hook on the denoiser counts the steps within one pipeline call and records the calls
at the sampler's steps (classifier-free guidance as the pipeline builds it: one batched call, or
separate conditional and unconditional calls, which share a step when ``step_key`` tells the step). Batches of prompts can be spread over processes with accelerate; each
process writes its own shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmquant.calibration.records import save_calls
from dmquant.diffusers_io import conditioning_argument, guidance_arguments, process_state
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
) -> Path:
    """Run ``pipe`` over ``prompts`` and store the denoiser's inputs at ``steps`` under ``out_dir``.

    ``steps`` is a list of step indices, or a function of the batch index giving them (samplers that
    draw steps afresh for every prompt batch).
    """
    state = process_state()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cond_arg = conditioning_argument(pipe)
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    steps_of = steps if callable(steps) else (lambda _batch, fixed=list(steps): fixed)
    recorder = _StepRecorder(steps_of(0), step_key)
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    indexed = list(enumerate(batches))
    try:
        with state.split_between_processes(indexed) as mine:
            bar = tqdm(mine, desc="calibration: collecting denoiser inputs", disable=not progress or not state.is_main_process)
            for index, batch in bar:
                recorder.reset(steps_of(index))
                generator = torch.Generator("cpu").manual_seed(seed + index)
                with torch.no_grad():
                    pipe(**{cond_arg: batch}, num_inference_steps=num_inference_steps,
                         generator=generator, output_type="latent", **guidance_arguments(pipe, call_kwargs or {},
                                                                                         len(batch)))
                if not recorder.calls:
                    raise DMQuantError(
                        f"the denoiser was never called at steps {sorted(recorder.steps)} with {num_inference_steps} steps"
                    )
                save_calls(recorder.calls, out_dir / f"shard-{index:05d}.safetensors")
    finally:
        handle.remove()
    state.wait_for_everyone()
    return out_dir


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
