"""The one ``generate``: images from a list of prompts, batched, sharded across processes.

Image ``i`` uses prompt ``i`` and seed ``seed + i`` with its own ``torch.Generator``. The images are cut
into batches of ``batch_size`` by global index *before* sharding, and the batches go to the processes
round-robin, so every image is the same, bit for bit, whether one process or many generate it. Under
``accelerate launch --num_processes K`` (or torchrun) each process generates its batches and the images
are gathered on every process. ``dmquant generate``, ``dmquant evaluate`` and the metrics all use it.

A video pipeline (one whose output has ``frames``, e.g. WanPipeline) gives video ``i`` from prompt ``i`` and
seed ``seed + i`` the same way: uint8 N x F x H x W x 3; ``num_frames`` picks F (None: the pipeline's default).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dmquant.correction.ptqd import check_correction_schedule
from dmquant.diffusers_io import (
    check_call_inputs,
    conditioning_argument,
    guidance_arguments,
    process_state,
    prompts_for_pipeline,
)
from dmquant.errors import DMQuantError
from dmquant.metrics.images import as_uint8_batch, as_uint8_video


@dataclass(frozen=True)
class GenerationConfig:
    """How images are generated: the protocol of eval/README.md. ``guidance_scale=None``: the pipeline's default."""

    num_inference_steps: int = 25
    guidance_scale: float | None = 5.0
    seed: int = 0
    batch_size: int = 16
    progress: bool = True
    num_frames: int | None = None  # video pipelines only; None: the pipeline's default

    def __post_init__(self) -> None:
        if self.num_frames is not None and (isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int)
                                            or self.num_frames < 1):
            raise DMQuantError(f"num_frames must be a positive integer or None, got {self.num_frames!r}")
        if self.num_inference_steps < 1:
            raise DMQuantError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise DMQuantError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DMQuantError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "progress"}


def is_video_pipeline(pipe) -> bool:
    """True for a pipeline that returns video frames (its call takes ``num_frames``)."""
    return "num_frames" in inspect.signature(type(pipe).__call__).parameters


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The batches (lists of global image indices) that process ``rank`` of ``world_size`` generates."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DMQuantError(f"bad shard: rank {rank} of world size {world_size}")
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return batches[rank::world_size]


def _run_batch(pipe, prompts: Sequence, seeds: Sequence[int], cfg: GenerationConfig, call_kwargs: dict) -> np.ndarray:
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(num_inference_steps=cfg.num_inference_steps, generator=generators, output_type="np", **call_kwargs)
    if cfg.guidance_scale is not None:
        kwargs["guidance_scale"] = cfg.guidance_scale
    if cfg.num_frames is not None:
        kwargs["num_frames"] = cfg.num_frames
    kwargs = guidance_arguments(pipe, kwargs, len(prompts))
    with torch.no_grad():
        out = pipe(**{conditioning_argument(pipe): prompts_for_pipeline(pipe, prompts)}, **kwargs)
    if getattr(out, "images", None) is not None:
        return as_uint8_batch(np.asarray(out.images))
    if getattr(out, "frames", None) is not None:  # a video pipeline: N x F x H x W x 3
        return as_uint8_video(out.frames)
    raise DMQuantError(f"{type(pipe).__name__} returns neither images nor video frames: generate takes image "
                       "and video pipelines")


def generate_shard(pipe, prompts: Sequence, cfg: GenerationConfig, rank: int = 0, world_size: int = 1,
                   **call_kwargs) -> dict[int, np.ndarray]:
    """{global index: uint8 image} for the batches of ``rank``; ``call_kwargs`` go to the pipeline."""
    check_correction_schedule(pipe, cfg.num_inference_steps)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    batches = shard_batches(len(prompts), cfg.batch_size, rank, world_size)
    out: dict[int, np.ndarray] = {}
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"generate [{rank}/{world_size}]", unit="img",
               disable=not cfg.progress)
    for batch in batches:
        images = _run_batch(pipe, [prompts[i] for i in batch], [cfg.seed + i for i in batch], cfg, call_kwargs)
        out.update(zip(batch, images))
        bar.update(len(batch))
    bar.close()
    return out


def generate(pipe, prompts: Sequence, config: GenerationConfig | None = None, distributed: bool | None = None,
             **call_kwargs) -> np.ndarray:
    """All images (uint8, N x H x W x 3; videos: N x F x H x W x 3) for ``prompts`` (strings, or class ids / labels for a class-conditioned
    pipeline), in prompt order; ``call_kwargs`` (``height``, ``width``, ...) go to the pipeline.

    Under a distributed launcher (``distributed`` None or True) the work is sharded over the processes
    and gathered, so every process returns the full, identical set. On CPUs, start the processes with
    ``accelerate launch --multi_gpu --num_processes K`` (torchrun; gloo is used when there is no GPU) or
    ``torchrun --nproc_per_node K``: ``accelerate launch --cpu --num_processes K`` starts one process
    unless given ``--mpirun_hostfile`` (accelerate 1.15).
    """
    cfg = config or GenerationConfig()
    prompts = list(prompts)
    if not prompts:
        raise DMQuantError("no prompts to generate from")
    prompts_for_pipeline(pipe, prompts)  # fail before generating anything
    check_call_inputs(pipe, cfg.num_inference_steps, call_kwargs.get("height"), call_kwargs.get("width"))
    if cfg.num_frames is not None and not is_video_pipeline(pipe):
        raise DMQuantError(f"{type(pipe).__name__} is an image pipeline: --num-frames is for video pipelines")
    rank, world = 0, 1
    if distributed is not False:
        state = process_state(getattr(pipe, "device", None) or "cpu")
        rank, world = state.process_index, state.num_processes
    shard = generate_shard(pipe, prompts, cfg, rank, world, **call_kwargs)
    if world > 1:
        from accelerate.utils import gather_object

        shard = {k: v for part in gather_object([shard]) for k, v in part.items()}
    missing = set(range(len(prompts))) - set(shard)
    if missing:
        raise DMQuantError(f"generation lost images {sorted(missing)[:5]}...")
    return np.stack([shard[i] for i in range(len(prompts))])
