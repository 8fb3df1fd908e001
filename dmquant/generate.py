"""Generate one image with fixed seed from any diffusers pipeline (text- or class-conditioned)."""

from __future__ import annotations

from pathlib import Path

import torch

from dmquant.calibration.collect import conditioning_argument
from dmquant.prompts import prompts_for_pipeline


def generate_images(pipe, prompts: list, num_inference_steps: int = 25, seed: int = 0,
                    guidance_scale: float | None = None, **call_kwargs):
    """PIL images for ``prompts`` (one per prompt), all from one seeded generator."""
    kwargs = dict(call_kwargs)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    from dmquant.correction.ptqd import check_correction_schedule

    check_correction_schedule(pipe, num_inference_steps)
    cond = prompts_for_pipeline(pipe, list(prompts))
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(**{conditioning_argument(pipe): cond}, num_inference_steps=num_inference_steps,
                   generator=generator, **kwargs)
    return out.images


def save_image_atomic(image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{id(image)}{path.suffix}")
    try:
        image.save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
