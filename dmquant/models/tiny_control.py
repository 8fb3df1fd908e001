"""Tiny random-weight ControlNet pipelines (SD, SDXL, FLUX), built offline from configs: for tests and quick checks.

Each pipeline's ControlNet is made from its tiny denoiser (``ControlNetModel.from_unet`` /
``FluxControlNetModel.from_transformer``, the denoiser's weights copied as diffusers does). diffusers
starts a ControlNet's output layers at zero (the zero-convs ``controlnet_down_blocks`` /
``controlnet_mid_block``, the last conv of ``controlnet_cond_embedding``, FLUX's ``controlnet_blocks`` /
``controlnet_single_blocks`` / ``controlnet_x_embedder``); a trained ControlNet has moved them away from
zero, so here they get random weights: the ControlNet's residuals then change the denoiser's output, as
they do in a trained one. Images are 16×16 (8×8×4 latents); conditioning images are RGB in [0, 1].
"""

from __future__ import annotations

import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from dmquant.models.tiny import _eval_mode, _tiny_clip, _tiny_vae, build_tiny_pipeline, char_tokenizer

TINY_CONTROL_NAMES = ("tiny-random-sd-controlnet", "tiny-random-sdxl-controlnet", "tiny-random-flux-controlnet")
# the tiny VAE halves the image side (two levels): the ControlNet's conditioning embedding must too
_COND_CHANNELS = (8, 16)


def randomize_zero_layers(model: nn.Module, prefixes: tuple[str, ...]) -> nn.Module:
    """Give the linear and conv layers under ``prefixes`` (a ControlNet's zero-initialised outputs) their
    default random initialisation (drawn from torch's global generator); returns ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name.startswith(prefixes):
            module.reset_parameters()
    return model


_UNET_ZERO_LAYERS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
_FLUX_ZERO_LAYERS = ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")


def unet_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet made from ``unet`` (its encoder copied) with random (non-zero) output layers."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_COND_CHANNELS)
    return randomize_zero_layers(controlnet, _UNET_ZERO_LAYERS)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd_controlnet_pipeline(seed: int = 0) -> StableDiffusionControlNetPipeline:
    """tiny-random-sd's components with a ControlNet of its UNet: a StableDiffusionControlNetPipeline."""
    base = build_tiny_pipeline("tiny-random-sd", seed)
    torch.manual_seed(seed + 1)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=unet_controlnet(base.unet), scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return _eval_mode(pipe)


def build_tiny_sdxl_controlnet_pipeline(seed: int = 0) -> StableDiffusionXLControlNetPipeline:
    """A StableDiffusionXLControlNetPipeline: two CLIP text encoders (the second with projection), a 2-level
    UNet with SDXL's ``text_time`` added conditioning, and its ControlNet."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_tokenizer(), char_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_clip(tokenizer, CLIPTextModel, 16), tokenizer=tokenizer,
        text_encoder_2=_tiny_clip(tokenizer_2, CLIPTextModelWithProjection, 16, projection_dim=16),
        tokenizer_2=tokenizer_2, unet=unet, controlnet=unet_controlnet(unet), scheduler=_scheduler(),
        add_watermarker=False)
    return _eval_mode(pipe)


def build_tiny_flux_controlnet_pipeline(seed: int = 0) -> FluxControlNetPipeline:
    """tiny-random-flux's components with a 1 + 1 block FLUX ControlNet of its transformer (the conditioning
    image goes through the VAE and is packed like the latents): a FluxControlNetPipeline."""
    base = build_tiny_pipeline("tiny-random-flux", seed)
    torch.manual_seed(seed + 1)
    cfg = base.transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        base.transformer, num_layers=1, num_single_layers=1, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads)
    pipe = FluxControlNetPipeline(
        scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, transformer=base.transformer,
        controlnet=randomize_zero_layers(controlnet, _FLUX_ZERO_LAYERS))
    return _eval_mode(pipe)


_BUILDERS = {"tiny-random-sd-controlnet": build_tiny_sd_controlnet_pipeline,
             "tiny-random-sdxl-controlnet": build_tiny_sdxl_controlnet_pipeline,
             "tiny-random-flux-controlnet": build_tiny_flux_controlnet_pipeline}


def build_tiny_controlnet_pipeline(name: str, seed: int = 0):
    """The tiny random ControlNet pipeline ``name`` (one of ``TINY_CONTROL_NAMES``), deterministic from ``seed``."""
    if name not in _BUILDERS:
        raise KeyError(name)
    return _BUILDERS[name](seed)


def conditioning_images(count: int, seed: int, side: int = 16) -> torch.Tensor:
    """``count`` random RGB conditioning images in [0, 1] (``count×3×side×side``), deterministic from ``seed``:
    smooth blobs (a coarse random grid upsampled), like edge or depth maps are smooth at this size."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
