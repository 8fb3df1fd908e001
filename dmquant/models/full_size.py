"""Full-size denoiser architectures built from their published configs (random weights, offline).

Speed and memory do not depend on weight values, so these are faithful benchmarks of the real
models without downloading them.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

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
