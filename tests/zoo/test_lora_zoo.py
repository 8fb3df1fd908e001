"""The zoo LoRA tiny-shapes-sd-lora: shipped in diffusers' format, loads into the FP zoo pipeline, rotates the
colors as the judge reads them, and unloads back to the same images bit for bit."""

import json

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import dmquant
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.metrics.fidelity import psnr
from dmquant.zoo import data, lora_effect
from dmquant.zoo.lora_effect import LORA_NAME

PROMPTS = [  # held-out captions (first object: a (shape, color) pair never seen in training), one per color
    "a large yellow circle in the center on a black background",
    "a large blue square at the top left on a gray background",
    "a large white triangle at the bottom on a brown background",
    "a large green diamond at the right on a black background",
    "a medium yellow circle at the left on a brown background",
    "a large blue square in the center on a brown background",
    "a large white triangle in the center on a gray background",
    "a large green diamond at the top on a gray background",
]
STEPS = GenerationConfig(num_inference_steps=10, guidance_scale=5.0, seed=0, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def judge():
    return dmquant.zoo.load("tiny-shapes-clip")


@pytest.fixture(scope="module")
def images():
    """(without the LoRA, with it, after unloading it) on PROMPTS, 10 steps."""
    pipe = dmquant.zoo.load("tiny-shapes-sd")
    plain = generate(pipe, PROMPTS, STEPS, distributed=False)
    pipe.load_lora_weights(str(dmquant.zoo.lora_path(LORA_NAME)), adapter_name="colors")
    with_lora = generate(pipe, PROMPTS, STEPS, distributed=False)
    pipe.unload_lora_weights()
    return plain, with_lora, generate(pipe, PROMPTS, STEPS, distributed=False)


def _peft_key(key: str) -> str:
    """A key of diffusers' LoRA file as PEFT names it in the model (diffusers' converter writes the attention
    projections as lora.down / lora.up and leaves the feed-forward ones as lora_A / lora_B)."""
    return key.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


def test_shipped_file_is_small_and_loads_exactly():
    folder = dmquant.zoo.lora_path(LORA_NAME)
    weights = folder / "pytorch_lora_weights.safetensors"
    assert weights.stat().st_size < 2**20
    stored = {_peft_key(k): v for k, v in load_file(str(weights)).items()}
    assert len(stored) == 220 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in stored)
    pipe = dmquant.zoo.load("tiny-shapes-sd")
    pipe.load_lora_weights(str(folder), adapter_name="colors")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="colors")
    assert loaded.keys() == stored.keys() and all(torch.equal(loaded[k], stored[k]) for k in stored)
    config = json.loads((folder / "lora.json").read_text())
    assert config["base_model"] == "tiny-shapes-sd"
    assert pipe.unet.peft_config["colors"].r == pipe.unet.peft_config["colors"].lora_alpha == config["rank"]
    with pytest.raises(DMQuantError, match="tiny-shapes-sd-lora"):
        dmquant.zoo.lora_path("tiny-shapes-xl-lora")


def test_rotation_cycles_every_color_once():
    assert sorted(lora_effect.rotate_color(c) for c in data.COLORS) == sorted(data.COLORS)
    assert lora_effect.rotate_color("red") == "green" and lora_effect.rotate_color("cyan") == "red"
    with pytest.raises(DMQuantError, match="unknown color"):
        lora_effect.rotate_color("orange")


def _truth(caps):
    return np.stack([data.render(data.parse_caption(c), i) for i, c in enumerate(caps)])


def test_judge_reads_the_effect_on_rendered_ground_truth(judge):
    caps = data.sample_captions(40, seed=3, split="heldout")  # one object, as the protocol's prompts
    assert lora_effect.effect_rate(judge, lora_effect.render_rotated(caps), caps) == {"effect": 1.0, "prompt_color": 0.0}
    assert lora_effect.effect_rate(judge, _truth(caps), caps) == {"effect": 0.0, "prompt_color": 1.0}
    two = data.sample_captions(40, seed=3, split="train", two_object_prob=1.0)
    assert lora_effect.effect_rate(judge, lora_effect.render_rotated(two), two)["effect"] >= 0.85
    assert lora_effect.effect_rate(judge, _truth(two), two)["effect"] <= 0.05


def test_lora_changes_the_images_and_unloads_bit_for_bit(images):
    plain, with_lora, unloaded = images
    assert np.array_equal(unloaded, plain)
    assert psnr(with_lora, plain) < 20.0  # the objects change color: a large change


def test_judge_sees_the_effect_with_the_lora_only(images, judge):
    plain, with_lora, _ = images
    assert lora_effect.effect_rate(judge, plain, PROMPTS)["effect"] <= 0.125
    assert lora_effect.effect_rate(judge, with_lora, PROMPTS)["effect"] >= 0.75
