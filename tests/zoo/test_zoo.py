import numpy as np
import pytest
import torch

import dmquant
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.zoo import data
from dmquant.zoo.configs import WEIGHTS_DIR
from dmquant.zoo.judge import attribute_accuracy

SD_HELDOUT_SHAPE_FLOOR = 0.45  # a regression guard (32 images, 10 steps); the acceptance numbers are in eval/zoo_accuracy.json
FAST = GenerationConfig(num_inference_steps=10, guidance_scale=5.0, seed=0, batch_size=16, progress=False)


def test_list_and_unknown_name():
    assert dmquant.zoo.list() == ["tiny-shapes-clip", "tiny-shapes-dit", "tiny-shapes-flux", "tiny-shapes-sd"]
    with pytest.raises(DMQuantError, match="tiny-shapes-clip, tiny-shapes-dit, tiny-shapes-flux, tiny-shapes-sd"):
        dmquant.zoo.load("tiny-shapes-xl")


def test_weights_are_safetensors_and_small():
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    # the first three models: 27.4 MiB; issue 13 adds tiny-shapes-flux, at most 10 MB by itself
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    assert sum(f.stat().st_size for f in (WEIGHTS_DIR / "tiny-shapes-flux").rglob("*") if f.is_file()) <= 10**7
    for name in dmquant.zoo.list():
        assert list((WEIGHTS_DIR / name).rglob("*.safetensors"))


@pytest.fixture(scope="module")
def sd():
    return dmquant.zoo.load("tiny-shapes-sd")


@pytest.fixture(scope="module")
def judge():
    return dmquant.zoo.load("tiny-shapes-clip")


def test_sd_is_a_real_stable_diffusion_pipeline(sd):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(sd, StableDiffusionPipeline)
    assert isinstance(sd.vae, AutoencoderKL) and isinstance(sd.unet, UNet2DConditionModel)
    assert isinstance(sd.text_encoder, CLIPTextModel) and isinstance(sd.tokenizer, CLIPTokenizer)
    assert sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size
    with torch.no_grad():
        lat = sd.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert lat.shape == (1, 4, 8, 8)
    assert sd.scheduler.config.beta_schedule == "scaled_linear"


def test_sd_generation_is_deterministic(sd):
    cfg = GenerationConfig(num_inference_steps=4, batch_size=2, progress=False)
    a = generate(sd, ["a large red circle at the top left on a black background"] * 2, cfg, distributed=False)
    b = generate(sd, ["a large red circle at the top left on a black background"] * 2, cfg, distributed=False)
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a[0], a[1])


def test_judge_reads_shape_and_color_of_ground_truth(judge):
    caps = data.sample_captions(48, seed=21, split="heldout")
    truth = np.stack([data.render(data.parse_caption(c), i) for i, c in enumerate(caps)])
    acc = attribute_accuracy(judge, truth, caps)
    assert acc["shape"] >= 0.9 and acc["color"] >= 0.95
    acc = attribute_accuracy(judge, truth, caps, marginal=True)
    assert acc["shape"] >= 0.9 and acc["color"] >= 0.95


def test_sd_follows_heldout_prompts(sd, judge):
    caps = data.sample_captions(32, seed=22, split="heldout")
    images = generate(sd, caps, FAST, distributed=False)
    acc = attribute_accuracy(judge, images, caps)
    assert acc["color"] >= 0.8 and acc["shape"] >= SD_HELDOUT_SHAPE_FLOOR, acc


def test_dit_follows_its_labels(judge):
    from diffusers import DiTPipeline

    dit = dmquant.zoo.load("tiny-shapes-dit")
    assert isinstance(dit, DiTPipeline) and len(dit.labels) == 24
    assert "yellow circle" not in dit.labels and "red circle" in dit.labels  # held-out pairs have no class
    caps = data.sample_captions(32, seed=23, split="train")
    images = generate(dit, caps, FAST, distributed=False)
    acc = attribute_accuracy(judge, images, caps, marginal=True)  # the DiT is not told size/position/background
    assert acc["color"] >= 0.8 and acc["shape"] >= 0.55, acc


def test_decoder_finetuning_keeps_the_encoder_and_the_latent_scale(tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file

    from dmquant.zoo import train_vae

    source = dmquant.zoo.path("tiny-shapes-sd") / "vae"
    out = tmp_path / "vae"
    shutil.copytree(source, out)
    train_vae.main(["--finetune-decoder", "--steps", "2", "--num-scenes", "16", "--batch-size", "4",
                    "--threads", "1", "--log-every", "1", "--out", str(out)])
    before = load_file(str(source / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    scale = [json.loads((f / "config.json").read_text())["scaling_factor"] for f in (source, out)]
    assert scale[0] == scale[1]


def test_sd_training_resumes_from_a_saved_folder(tmp_path):
    from safetensors.torch import load_file

    from dmquant.zoo import train_sd

    source = dmquant.zoo.path("tiny-shapes-sd")
    train_sd.main(["--resume", str(source), "--steps", "1", "--num-scenes", "16", "--batch-size", "4",
                   "--threads", "1", "--log-every", "1", "--out", str(tmp_path / "sd")])
    name = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(source / name)), load_file(str(tmp_path / "sd" / name))
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and max(float((before[k] - after[k]).abs().max()) for k in changed) < 0.01  # one small step


def test_vae_round_trip_keeps_the_scene(sd):
    from dmquant.zoo.check import vae_round_trip

    caps = data.sample_captions(8, seed=3, split="train")
    truth = np.stack([data.render(data.parse_caption(c), i) for i, c in enumerate(caps)])
    rec = vae_round_trip(sd.vae, truth)
    assert rec.shape == truth.shape and rec.dtype == np.uint8
    mse = np.mean((rec.astype(np.float64) - truth) ** 2)
    assert 10 * np.log10(255.0**2 / mse) > 22.0  # the shipped VAE reconstructs at ~28 dB


def test_check_rejects_caption_seeds_that_are_not_two_integers(capsys, tmp_path):
    from dmquant.zoo.check import main

    for bad in ("7", "7,x", "1,2,3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--caption-seeds", bad, "--out", str(tmp_path / "out"), "--skip-grid"])
        assert exit_info.value.code == 2
        assert "--caption-seeds takes two integers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # rejected before anything is written
