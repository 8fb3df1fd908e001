"""Old name, kept while tests/test_pipeline.py, tests/test_time_techniques.py and
tests/calibration/test_outlier_stage.py import it: use :func:`dmquant.generation.generate`."""

from __future__ import annotations

from dmquant.generation import GenerationConfig, generate


def generate_images(pipe, prompts: list, num_inference_steps: int = 25, seed: int = 0,
                    guidance_scale: float | None = None, **call_kwargs) -> list:
    """Images (uint8 H x W x 3) for ``prompts``, one batch, image i from seed ``seed + i``."""
    cfg = GenerationConfig(num_inference_steps, guidance_scale, seed, batch_size=max(1, len(prompts)), progress=False)
    return list(generate(pipe, prompts, cfg, distributed=False, **call_kwargs))
