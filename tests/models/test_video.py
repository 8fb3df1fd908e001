"""Video pipelines through ``generate``, ``evaluate`` and ``dmquant generate``: tiny-random-wan (WanPipeline,
text to video) with 5 frames of 16×16 and few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dmquant
from dmquant.cli import main
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.metrics.evaluation import evaluate
from dmquant.models.tiny import build_tiny_pipeline

PROMPTS = ["a large red circle at the top left on a black background",
           "a small blue square at the bottom on a gray background",
           "a medium yellow triangle in the center on a brown background"]
SIZE = dict(height=16, width=16)
FRAMES = 5
CONFIG = GenerationConfig(num_inference_steps=2, batch_size=2, progress=False, num_frames=FRAMES)


@pytest.fixture(scope="module")
def wan():
    return build_tiny_pipeline("tiny-random-wan")


def test_generate_video_shape_and_determinism(wan):
    videos = generate(wan, PROMPTS, CONFIG, distributed=False, **SIZE)
    assert videos.shape == (3, FRAMES, 16, 16, 3) and videos.dtype == np.uint8
    # video i from seed + i whatever the batching: one at a time gives the same frames
    one_by_one = generate(wan, PROMPTS, GenerationConfig(2, 5.0, 0, 1, False, FRAMES), distributed=False, **SIZE)
    assert np.array_equal(videos, one_by_one)
    shifted = generate(wan, PROMPTS[1:], GenerationConfig(2, 5.0, 1, 2, False, FRAMES), distributed=False, **SIZE)
    assert np.array_equal(videos[1:], shifted)


def test_num_frames_checked(wan):
    with pytest.raises(DMQuantError, match="num_frames"):
        GenerationConfig(num_frames=0)
    with pytest.raises(DMQuantError, match="video pipelines"):
        generate(build_tiny_pipeline("tiny-random-sd"), PROMPTS[:1], CONFIG, distributed=False)


def test_cli_num_frames_on_an_image_pipeline(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    assert main(["calibrate", "--model", "tiny-random-sd", "--recipe", "w8a8", "--prompts", str(prompts), "--out",
                 str(tmp_path / "run"), "--steps", "2", "--num-frames", "3", "--quiet"]) == 2
    assert "video pipelines" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_evaluate_video_metrics_and_grid(wan, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(wan, PROMPTS[:2], 2, out, reference=wan, config=CONFIG, distributed=False, **SIZE)
    assert m["psnr_vs_reference"] == "inf" and m["ssim_vs_reference"] == pytest.approx(1.0)
    assert m["fid"] is None and "skipped" in m["fid_note"] and m["num_frames"] == FRAMES
    assert 0 < m["clip_score"] <= 100 and "middle frame" in m["clip_frame"]
    assert json.loads((out / "metrics.json").read_text()) == m
    report = (out / "report.md").read_text()
    assert "middle frame" in report and "FID skipped" in report
    # 2 videos x 4 frames (of 5, evenly spaced), reference | evaluated, 16 px enlarged 16x
    cell, scale = 16 + 2, 256 // 16
    assert Image.open(out / "grid.png").size == ((2 * (4 * cell + 2) + 8) * scale, (2 * cell + 2) * scale)
    assert Image.open(out / "images" / "evaluated" / "00000.png").size == (FRAMES * 16, 16)


def test_quantized_video_evaluate_against_fp(tmp_path):
    fp, q = build_tiny_pipeline("tiny-random-wan"), build_tiny_pipeline("tiny-random-wan")
    dmquant.quantize(q, "w8a8", prompts=["a yellow star", "big purple circle"], num_inference_steps=2,
                     num_frames=FRAMES, progress=False, **SIZE)
    m = evaluate(q, PROMPTS[:2], 2, tmp_path / "eval", reference=fp, config=CONFIG, distributed=False, **SIZE)
    # the random Wan VAE flattens the latents' differences: most frames come out identical in uint8 (each counts at
    # the one-level PSNR, about 83 dB at this size); SSIM < 1 shows that quantization changed some frames
    assert float(m["psnr_vs_reference"]) > 20.0 and 0.99 < m["ssim_vs_reference"] < 1.0


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_cli_generate_video(tmp_path, suffix):
    out = tmp_path / f"video{suffix}"
    assert main(["generate", "--model", "tiny-random-wan", "--prompt", PROMPTS[0], "--out", str(out), "--steps", "2",
                 "--height", "16", "--width", "16", "--num-frames", str(FRAMES)]) == 0
    image = Image.open(out)
    if suffix == ".png":
        assert image.size == (FRAMES * 16, 16)
    else:
        assert image.size == (16, 16) and image.n_frames == FRAMES


def test_cli_evaluate_video_and_its_report(tmp_path):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "eval"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    assert main(["evaluate", "--model", "tiny-random-wan", "--reference", "tiny-random-wan", "--prompts", str(prompts),
                 "--num-images", "2", "--out", str(out), "--steps", "2", "--height", "16", "--width", "16",
                 "--num-frames", str(FRAMES), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["psnr_vs_reference"] == "inf" and m["num_frames"] == FRAMES and m["fid"] is None
    report = (out / "report.md").read_text()
    header, table = report.split("| metric | value |")
    # the header speaks of videos, not images, and names no FID features; the table has no FID rows
    assert "(first 2, one video each)" in header and "(video i: seed 0 + i)" in header
    assert "one image" not in header and "image i" not in header and "FID features" not in header
    assert "FID" not in table
    assert "CLIP score (0-100, higher is better), middle frame (index 2 of 5)" in table
