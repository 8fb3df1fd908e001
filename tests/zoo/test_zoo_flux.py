"""tiny-shapes-flux: the zoo's modern-family model (SD3-style MMDiT, flow matching) loads and generates."""

import numpy as np
import torch

import dmquant
from dmquant.generation import GenerationConfig, generate

PROMPT = "a large red circle at the top left on a black background"


def test_flux_loads_and_generates_deterministically():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = dmquant.zoo.load("tiny-shapes-flux")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.dtype == torch.float32
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 2_000_000
    with torch.no_grad():  # the T5 slot is a stand-in that outputs SD3's "no T5" zeros
        embeds = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)[0]
    assert embeds.shape == (1, 32 + 256, 128) and not embeds[:, 32:].any()
    cfg = GenerationConfig(num_inference_steps=4, guidance_scale=5.0, batch_size=2, progress=False)
    a = generate(pipe, [PROMPT] * 2, cfg, distributed=False)
    b = generate(pipe, [PROMPT] * 2, cfg, distributed=False)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])
