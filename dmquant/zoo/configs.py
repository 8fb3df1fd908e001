"""Architectures and training settings of the zoo models (one place, read by the training scripts)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# The SD-like noise schedule shared by the training of both denoisers and their inference schedulers.
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
)

TEXT_ENCODER = dict(  # vocab_size / token ids are filled in from the tokenizer
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
    projection_dim=64,
)

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)

DIT = dict(  # DiTPipeline uses class id 1000 as the "null" class, hence num_embeds_ada_norm=1000
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=1000,
)

# tiny-shapes-flux: an SD3-style MMDiT (joint text/image attention, AdaLN on the pooled text embedding) on the
# shared VAE's 8x8x4 latents in 1x1 patches (64 image tokens). The text input is the pipeline's: two CLIP
# sequences (the same 64-d tiny-shapes-sd encoder twice) side by side = 128 channels, and the pooled outputs
# side by side = 128.
MMDIT = dict(
    sample_size=8,
    patch_size=1,
    in_channels=4,
    out_channels=4,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=128,
    caption_projection_dim=64,  # = attention_head_dim * num_attention_heads (SD3 requires it)
    pooled_projection_dim=128,
    pos_embed_max_size=8,
    qk_norm="rms_norm",
)
FLOW_SHIFT = 1.0  # FlowMatchEulerDiscreteScheduler's shift at inference (SD3 uses 3.0 at 1024 px)

CLIP_EMBED_DIM = 64
CLIP_VISION = dict(image_size=32, patch_size=4, width=128, layers=4, head_width=32, mlp_ratio=4.0)
CLIP_TEXT = dict(context_length=32, width=64, heads=4, layers=2, hf_tokenizer_name="tiny-shapes-clip")


def clip_model_cfg(vocab_size: int) -> dict:
    return dict(embed_dim=CLIP_EMBED_DIM, vision_cfg=dict(CLIP_VISION), text_cfg=dict(CLIP_TEXT, vocab_size=vocab_size))


# The judge sees the images as they are (32x32, values in [0, 1]); mean/std 0.5 map them to [-1, 1].
CLIP_PREPROCESS = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", resize_mode="shortest")
