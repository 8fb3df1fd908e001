"""Tiny random-weight pipelines built from configs, offline: for tests and quick checks.

They have the real diffusers classes (UNet2DConditionModel with cross-attention, DiTTransformer2DModel)
at toy sizes, so every code path of dmquant runs on them in seconds.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_NAMES = ("tiny-random-sd", "tiny-random-dit")


def char_tokenizer(folder: str | Path | None = None):
    """A CLIPTokenizer whose vocabulary is single characters (built offline, no download)."""

    folder = Path(folder or tempfile.mkdtemp(prefix="dmquant-tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.-'")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)


def _tiny_vae():

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    )


def build_tiny_sd_pipeline(seed: int = 0):
    """A random-weight StableDiffusionPipeline: 16×16 images, 8×8×4 latents, a 2-level UNet."""

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _eval_mode(pipe)


def _eval_mode(pipe):
    """Models built from configs start in training mode (label dropout!); pipelines run in eval mode."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def build_tiny_dit_pipeline(seed: int = 0, attention_head_dim: int = 16):
    """A random-weight class-conditioned DiTPipeline on 8×8×4 latents (patch 2, 2 blocks)."""

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=attention_head_dim, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )
    scheduler = DDIMScheduler(clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=scheduler,
                       id2label={i: f"class {i}" for i in range(10)})
    return _eval_mode(pipe)


def build_tiny_pipeline(name: str, seed: int = 0):
    if name == "tiny-random-sd":
        return build_tiny_sd_pipeline(seed)
    if name == "tiny-random-dit":
        return build_tiny_dit_pipeline(seed)
    raise KeyError(name)
