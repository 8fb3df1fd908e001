"""Evaluation: FID, CLIP score, fidelity to a reference, the report of ``dmquant evaluate``; the generation
they measure is :func:`dmquant.generation.generate` (re-exported here with its helpers).

    from dmquant.metrics import evaluate, generate, GenerationConfig, compute_fid, compute_clip_score, psnr, ssim

Names are imported on first use. Package-level names never equal a submodule's name
(``dmquant.metrics.fid`` is the module, ``dmquant.metrics.compute_fid`` the function).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate": "dmquant.metrics.evaluation",
    "render_prompts": "dmquant.metrics.evaluation",
    "generate": "dmquant.generation",
    "generate_shard": "dmquant.generation",
    "shard_batches": "dmquant.generation",
    "GenerationConfig": "dmquant.generation",
    "load_pipeline": "dmquant.loading",
    "read_prompts": "dmquant.prompts",
    "compute_fid": "dmquant.metrics.fid",
    "frechet_distance": "dmquant.metrics.fid",
    "compute_clip_score": "dmquant.metrics.clip_score",
    "load_clip": "dmquant.metrics.clip_score",
    "ClipModel": "dmquant.zoo.judge",
    "attribute_accuracy": "dmquant.zoo.judge",
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
