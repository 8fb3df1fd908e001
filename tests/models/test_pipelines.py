"""Today's pipelines end to end on tiny random weights built offline (text encoders and tokenizers
included): ``quantize(pipe, ...)`` with prompts, generation, save / load, and the command line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import dmquant
from dmquant.cli import main
from dmquant.generation import GenerationConfig, generate
from dmquant.models.tiny import build_tiny_pipeline
from dmquant.nn.wrap import quantized_attention
from dmquant.quantizers.affine import sqnr_db

CALIBRATION = ["a yellow star", "big purple circle at the left"]
TEST = ["a red circle", "blue square at the top", "green triangle"]
CONFIG = GenerationConfig(num_inference_steps=4, batch_size=4, progress=False)
PIPELINES = {"tiny-random-flux": ("FluxPipeline", 16), "tiny-random-sd3": ("StableDiffusion3Pipeline", 16),
             "tiny-random-qwen-image": ("QwenImagePipeline", 32)}  # image side: 4×4 latent tokens each


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_w8a8_pipeline_end_to_end(name, tmp_path):
    cls, side = PIPELINES[name]
    size = dict(height=side, width=side)
    pipe = build_tiny_pipeline(name)
    assert type(pipe).__name__ == cls
    reference = generate(pipe, TEST, CONFIG, **size)
    dmquant.quantize(pipe, "w8a8-static", prompts=CALIBRATION, num_inference_steps=4, progress=False, **size)
    _assert_attention_calibrated(pipe)
    simulated = generate(pipe, TEST, CONFIG, **size)
    assert simulated.shape == reference.shape == (len(TEST), side, side, 3)
    # a tiny random model reaches ~60 dB; wrong scales or an unquantized model would miss 20 dB or equality
    assert not np.array_equal(simulated, reference) and _psnr(simulated, reference) > 20.0

    dmquant.freeze(pipe)
    frozen = generate(pipe, TEST, CONFIG, **size)
    assert _psnr(frozen, reference) > 20.0
    pipe.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    assert type(loaded).__name__ == "Quantized" + cls and loaded.dmquant.frozen
    assert np.array_equal(generate(loaded, TEST, CONFIG, **size), frozen)


def _assert_attention_calibrated(pipe):
    attention = quantized_attention(pipe.transformer)
    assert attention and [n for n, _ in attention] == pipe.dmquant.report.attention
    for _, attn in attention:
        assert attn.processor.routed > 0 and all(q.calibrated for q in attn.dmq_quant.quantizers())


def test_w8a8_wan_video_pipeline(tmp_path):
    """WanPipeline (text to video) through the Python API, the pipeline called directly. The random Wan VAE flattens the latents' differences
    (frames agree to ~110 dB), so the accuracy check is on the latents."""
    pipe = build_tiny_pipeline("tiny-random-wan")
    call = dict(num_inference_steps=4, height=16, width=16, num_frames=5, guidance_scale=5.0)

    def run(p, output_type):
        return p(prompt=TEST[:2], generator=torch.Generator().manual_seed(0), output_type=output_type, **call).frames

    reference = run(pipe, "latent")
    dmquant.quantize(pipe, "w8a8-static", prompts=CALIBRATION, progress=False, **call)
    _assert_attention_calibrated(pipe)
    assert 20.0 <= sqnr_db(reference, run(pipe, "latent")) < 70.0
    dmquant.freeze(pipe)
    frozen = run(pipe, "np")
    assert frozen.shape == (2, 5, 16, 16, 3) and np.isfinite(frozen).all()
    pipe.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    assert type(loaded).__name__ == "QuantizedWanPipeline"
    assert np.array_equal(run(loaded, "np"), frozen)
    videos = generate(loaded, TEST[:1], replace(CONFIG, num_inference_steps=1, num_frames=5), height=16, width=16)
    assert videos.shape == (1, 5, 16, 16, 3)  # generate and evaluate on video: tests/models/test_video.py


def test_cli_calibrate_and_generate_flux(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CALIBRATION) + "\n")
    run, image = tmp_path / "run", tmp_path / "image.png"
    assert main(["calibrate", "--model", "tiny-random-flux", "--recipe", "w8a8-static", "--prompts", str(prompts),
                 "--out", str(run), "--steps", "3", "--height", "16", "--width", "16", "--quiet"]) == 0
    assert main(["generate", "--model", str(run), "--prompt", TEST[0], "--out", str(image), "--steps", "3",
                 "--height", "16", "--width", "16"]) == 0
    assert Image.open(image).size == (16, 16)
