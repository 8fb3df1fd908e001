"""Evaluation: generation from prompt lists (sharded with accelerate), FID, CLIP score, fidelity, reports.

    from dmquant.metrics import evaluate, generate, GenerationConfig, compute_fid, compute_clip_score, psnr, ssim

Package-level names never equal a submodule's name (``dmquant.metrics.fid`` is the module,
``dmquant.metrics.compute_fid`` the function).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate": "dmquant.metrics.evaluation",
    "load_pipeline": "dmquant.metrics.evaluation",
    "render_prompts": "dmquant.metrics.evaluation",
    "generate": "dmquant.metrics.generation",
    "generate_shard": "dmquant.metrics.generation",
    "shard_batches": "dmquant.metrics.generation",
    "read_prompts": "dmquant.metrics.generation",
    "GenerationConfig": "dmquant.metrics.generation",
    "fid": "dmquant.metrics.fid",
    "frechet_distance": "dmquant.metrics.fid",
    "clip_score": "dmquant.metrics.clip_score",
    "load_clip": "dmquant.metrics.clip_score",
    "ClipModel": "dmquant.metrics.clip_score",
    "psnr": "dmquant.metrics.fidelity",
    "ssim": "dmquant.metrics.fidelity",
    "lpips": "dmquant.metrics.fidelity",
    "fidelity_metrics": "dmquant.metrics.fidelity",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dmquant.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
