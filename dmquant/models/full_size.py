"""Full-size denoiser architectures built from their published configs (random weights, offline).

Speed and memory do not depend on weight values, so these are faithful benchmarks of the real
models without downloading them.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def sd15_unet(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The Stable Diffusion 1.5 UNet2DConditionModel (859.5M parameters) with random weights."""

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET).to(dtype).eval()


SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def sdxl_unet(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The Stable Diffusion XL base UNet2DConditionModel (2.57B parameters) with random weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SDXL_UNET).to(dtype).eval()


def flux_transformer(num_layers: int = 19, num_single_layers: int = 38, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A FLUX.1-dev FluxTransformer2DModel (real widths: 3072 hidden, 24 heads of 128, T5 width 4096) with
    ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks (19 and 38 in the real
    model, 11.9B parameters), random weights, built directly on ``device``."""
    torch.manual_seed(seed)
    config = dict(FLUX_DEV, num_layers=num_layers, num_single_layers=num_single_layers)
    with torch.device(device):
        return FluxTransformer2DModel(**config).to(dtype).eval()
