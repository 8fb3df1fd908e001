"""Generation from prompt lists with fixed seeds, batched, sharded across processes.

Image ``i`` always uses prompt ``i`` and seed ``seed + i`` with its own ``torch.Generator``. The images
are cut into batches of ``batch_size`` by global index *before* sharding, and the batches go to the
processes round-robin, so every batch (and so every image, bit for bit) is the same whether one process
or many generate them. With ``accelerate launch --num_processes K``, each process generates its batches
and the images are gathered on every process.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dmquant.errors import DMQuantError
from dmquant.metrics.images import as_uint8_batch
from dmquant.prompts import class_id, read_prompt_file


@dataclass(frozen=True)
class GenerationConfig:
    """How images are generated: the protocol of eval/README.md."""

    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    batch_size: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise DMQuantError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise DMQuantError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "progress"}


def read_prompts(path: str | Path, num_images: int | None = None) -> list[str]:
    """Prompts of a text file (:func:`dmquant.prompts.read_prompt_file`); with ``num_images``, the first
    ``num_images`` prompts (DMQuantError if the file has fewer)."""
    prompts = read_prompt_file(path)
    if num_images is not None:
        check_enough_prompts(prompts, num_images, str(path))
        prompts = prompts[:num_images]
    return prompts


def check_enough_prompts(prompts: Sequence[str], num_images: int, where: str = "the prompt list") -> None:
    if num_images < 1:
        raise DMQuantError(f"num_images must be >= 1, got {num_images}")
    if len(prompts) < num_images:
        raise DMQuantError(
            f"{where} has {len(prompts)} prompts but {num_images} images were asked for (one prompt per image): "
            f"add prompts or lower --num-images"
        )


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The batches (lists of global image indices) that process ``rank`` of ``world_size`` generates."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DMQuantError(f"bad shard: rank {rank} of world size {world_size}")
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return batches[rank::world_size]


def _is_class_conditional(pipe: Any) -> bool:
    return "class_labels" in inspect.signature(pipe.__call__).parameters


prompt_to_class = class_id  # the one mapping of prompts to DiT classes lives in dmquant.prompts


def _run_batch(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], cfg: GenerationConfig) -> np.ndarray:
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                  generator=generators, output_type="np")
    if _is_class_conditional(pipe):
        out = pipe(class_labels=[prompt_to_class(pipe, p) for p in prompts], **kwargs)
    else:
        out = pipe(prompt=list(prompts), **kwargs)
    return as_uint8_batch(np.asarray(out.images))


def generate_shard(
    pipe: Any, prompts: Sequence[str], cfg: GenerationConfig, rank: int = 0, world_size: int = 1
) -> dict[int, np.ndarray]:
    """{global index: uint8 image} for the batches of ``rank``."""
    from tqdm.auto import tqdm

    from dmquant.correction.ptqd import check_correction_schedule

    check_correction_schedule(pipe, cfg.num_inference_steps)

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    batches = shard_batches(len(prompts), cfg.batch_size, rank, world_size)
    out: dict[int, np.ndarray] = {}
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"generate [{rank}/{world_size}]", unit="img",
               disable=not cfg.progress)
    for batch in batches:
        images = _run_batch(pipe, [prompts[i] for i in batch], [cfg.seed + i for i in batch], cfg)
        out.update(zip(batch, images))
        bar.update(len(batch))
    bar.close()
    return out


def generate(pipe: Any, prompts: Sequence[str], cfg: GenerationConfig | None = None, distributed: bool | None = None) -> np.ndarray:
    """All images (uint8, N x H x W x 3) for ``prompts``, in prompt order.

    Under a distributed launcher (``distributed`` None or True) the work is sharded over the processes
    and gathered, so every process returns the full, identical set. On CPUs, start the processes with
    ``accelerate launch --multi_gpu --num_processes K`` (torchrun; gloo is used when there is no GPU) or
    ``torchrun --nproc_per_node K``: ``accelerate launch --cpu --num_processes K`` starts one process
    unless given ``--mpirun_hostfile`` (accelerate 1.15).
    """
    cfg = cfg or GenerationConfig()
    prompts = list(prompts)
    if not prompts:
        raise DMQuantError("no prompts to generate from")
    if _is_class_conditional(pipe):  # fail before generating anything
        for p in prompts:
            prompt_to_class(pipe, p)
    rank, world = 0, 1
    state = None
    if distributed is not False:
        from accelerate import PartialState

        device = getattr(pipe, "device", None)
        # cpu=True lets processes started by torchrun / `accelerate launch --multi_gpu` on a machine
        # without GPUs form a gloo group (accelerate only does that when asked for the CPU)
        state = PartialState(cpu=getattr(device, "type", "cpu") == "cpu")
        rank, world = state.process_index, state.num_processes
    shard = generate_shard(pipe, prompts, cfg, rank, world)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([shard])
        shard = {k: v for part in parts for k, v in part.items()}
    missing = set(range(len(prompts))) - set(shard)
    if missing:
        raise DMQuantError(f"generation lost images {sorted(missing)[:5]}...")
    return np.stack([shard[i] for i in range(len(prompts))])
