"""LTXPipeline, CogVideoXPipeline and HunyuanVideoPipeline end to end on tiny random pipelines built offline
(T5 / Llama + CLIP text encoders and in-memory tokenizers, each family's own VAE): ``quantize(pipe, ...)``
with prompts, frames, freeze, save / load bit for bit, and the command line on a saved pipeline folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from PIL import Image
from test_pipelines import CALIBRATION, TEST, _assert_attention_calibrated, _psnr

import dmquant
from dmquant.cli import main
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.models.tiny import build_tiny_pipeline
from dmquant.quantizers.affine import sqnr_db

FRAMES = 9  # 3 latent frames (CogVideoX, HunyuanVideo: 4× in time) or 2 (LTX: 8×)
PIPELINES = {"tiny-random-ltx": ("LTXPipeline", 32), "tiny-random-cogvideox": ("CogVideoXPipeline", 16),
             "tiny-random-hunyuan-video": ("HunyuanVideoPipeline", 16)}  # LTX wants sides divisible by 32
SHAPES = ["a large red circle at the top left on a black background",
          "a small blue square at the bottom on a gray background"]


@pytest.mark.parametrize("name", list(PIPELINES))
def test_w8a8_video_pipeline_end_to_end(name, tmp_path):
    cls, side = PIPELINES[name]
    call = dict(num_inference_steps=3, height=side, width=side, num_frames=FRAMES)

    def run(p, output_type):
        return p(prompt=TEST[:2], generator=torch.Generator().manual_seed(0), output_type=output_type, **call).frames

    pipe = build_tiny_pipeline(name)
    assert type(pipe).__name__ == cls
    latents, frames = run(pipe, "latent"), run(pipe, "np")
    dmquant.quantize(pipe, "w8a8-static", prompts=CALIBRATION, progress=False, **call)
    _assert_attention_calibrated(pipe)
    # a tiny random model reaches ~50 dB on the latents, ~60 dB on the frames; wrong scales or an
    # unquantized denoiser would miss 20 dB or the upper bound
    assert 20.0 <= sqnr_db(latents, run(pipe, "latent")) < 70.0
    simulated = run(pipe, "np")
    assert simulated.shape == frames.shape == (2, FRAMES, side, side, 3)
    assert not np.array_equal(simulated, frames) and _psnr(simulated * 255, frames * 255) > 30.0

    dmquant.freeze(pipe)
    frozen = run(pipe, "np")
    assert _psnr(frozen * 255, frames * 255) > 30.0
    pipe.save_pretrained(tmp_path / "q")
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    assert type(loaded).__name__ == "Quantized" + cls and loaded.dmquant.frozen
    assert np.array_equal(run(loaded, "np"), frozen)
    videos = generate(loaded, TEST[:1], GenerationConfig(2, 5.0, 0, 1, False, FRAMES), height=side, width=side)
    assert videos.shape == (1, FRAMES, side, side, 3) and videos.dtype == np.uint8


def test_hunyuan_tokenizer_crops_exactly_the_prompt_template():
    pipe = build_tiny_pipeline("tiny-random-hunyuan-video")
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    embeds, mask = pipe._get_llama_prompt_embeds(["a red circle", "a blue square"], DEFAULT_PROMPT_TEMPLATE)
    # what is left after the crop: the prompt's 12 / 13 characters and <|eot_id|>, then padding
    assert mask.sum(1).tolist() == [13, 14] and not torch.equal(embeds[0, :13], embeds[1, :13])


def test_video_sizes_checked_before_work():
    with pytest.raises(DMQuantError, match="multiple of 32 for LTXPipeline"):
        generate(build_tiny_pipeline("tiny-random-ltx"), TEST[:1], GenerationConfig(num_frames=FRAMES), height=16,
                 width=16)


def test_cli_on_a_saved_hunyuan_video_folder(tmp_path, capsys):
    folder = tmp_path / "fp"
    build_tiny_pipeline("tiny-random-hunyuan-video").save_pretrained(folder)
    (tmp_path / "calibration.txt").write_text("\n".join(CALIBRATION) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(SHAPES) + "\n")
    size = ["--height", "16", "--width", "16", "--num-frames", str(FRAMES), "--steps", "2"]
    run, video = tmp_path / "run", tmp_path / "video.gif"
    assert main(["calibrate", "--model", str(folder), "--recipe", "w8a8-static", "--prompts", str(tmp_path / "calibration.txt"),
                 "--out", str(run), "--quiet", *size]) == 0
    assert json.loads((run / "run.json").read_text())["adapter"] == "hunyuan-video"
    assert main(["generate", "--model", str(run), "--prompt", TEST[0], "--out", str(video), *size]) == 0
    assert Image.open(video).n_frames == FRAMES
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--reference", str(folder), "--prompts", str(tmp_path / "eval.txt"),
                 "--num-images", "2", "--out", str(out), "--quiet", *size]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_frames"] == FRAMES and 30.0 < float(m["psnr_vs_reference"]) and m["ssim_vs_reference"] < 1.0
    capsys.readouterr()
