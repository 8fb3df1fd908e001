"""Tiny random denoisers of today's diffusers families and their inputs (one denoiser call each).

Dimensions are the smallest the constructors accept with the int8 attention kernel's head size (16)
in reach; every family has one or two blocks of each kind.
"""

from __future__ import annotations

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

HEADS, HEAD_DIM = 2, 16
TEXT = 6  # text tokens


def _flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=24,
                                   pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6))

    def inputs(g, t):
        h = w = 4
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1)
        return {"hidden_states": torch.randn(1, h * w, 16, generator=g),
                "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=g),
                "pooled_projections": torch.randn(1, 20, generator=g), "timestep": torch.tensor([t / 1000]),
                "img_ids": ids.reshape(-1, 3).float(), "txt_ids": torch.zeros(TEXT, 3),
                "guidance": torch.tensor([3.5]), "joint_attention_kwargs": None, "return_dict": False}
    return model, inputs


def _sd3():
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
                                  num_attention_heads=HEADS, joint_attention_dim=24, caption_projection_dim=32,
                                  pooled_projection_dim=20, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")

    def inputs(g, t):
        return {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
                "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=g),
                "pooled_projections": torch.randn(1, 20, generator=g), "timestep": torch.tensor([float(t)]),
                "joint_attention_kwargs": None, "return_dict": False}
    return model, inputs


def _qwen():
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=24,
                                        axes_dims_rope=(4, 6, 6))

    def inputs(g, t):
        mask = torch.ones(1, TEXT, dtype=torch.long)
        mask[:, -2:] = 0
        return {"hidden_states": torch.randn(1, 16, 16, generator=g),
                "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=g), "encoder_hidden_states_mask": mask,
                "timestep": torch.tensor([t / 1000]), "img_shapes": [(1, 4, 4)], "attention_kwargs": None,
                "return_dict": False}
    return model, inputs


def _wan():
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  in_channels=4, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=32)

    def inputs(g, t):
        return {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([t]),
                "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=g), "return_dict": False}
    return model, inputs


def _ltx():
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=HEADS,
                                       attention_head_dim=HEAD_DIM, cross_attention_dim=32, num_layers=2,
                                       caption_channels=24)

    def inputs(g, t):
        mask = torch.ones(1, TEXT)
        mask[:, -2:] = 0
        return {"hidden_states": torch.randn(1, 2 * 4 * 4, 8, generator=g),
                "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=g), "timestep": torch.tensor([t]),
                "encoder_attention_mask": mask, "num_frames": 2, "height": 4, "width": 4,
                "rope_interpolation_scale": (8 / 25, 32, 32), "return_dict": False}
    return model, inputs


def _cogvideox():
    model = CogVideoXTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                        out_channels=4, time_embed_dim=32, text_embed_dim=24, num_layers=2,
                                        sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                        max_text_seq_length=TEXT)

    def inputs(g, t):
        return {"hidden_states": torch.randn(1, 2, 4, 8, 8, generator=g),
                "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=g), "timestep": torch.tensor([t]),
                "return_dict": False}
    return model, inputs


def _hunyuan():
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                           attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1,
                                           num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
                                           pooled_projection_dim=20, rope_axes_dim=(4, 6, 6))

    def inputs(g, t):
        mask = torch.ones(1, TEXT)
        mask[:, -2:] = 0
        return {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([t]),
                "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=g), "encoder_attention_mask": mask,
                "pooled_projections": torch.randn(1, 20, generator=g), "guidance": torch.tensor([6000.0]),
                "return_dict": False}
    return model, inputs


FAMILIES = {"flux": _flux, "sd3": _sd3, "qwen-image": _qwen, "wan": _wan, "ltx": _ltx, "cogvideox": _cogvideox,
            "hunyuan-video": _hunyuan}


def build(family: str, seed: int = 0):
    """``(model, inputs)``: the tiny random denoiser (eval mode) and ``inputs(generator, timestep) -> kwargs``."""
    torch.manual_seed(seed)
    model, inputs = FAMILIES[family]()
    return model.eval(), inputs


def calls(inputs, seed: int, timesteps=(900, 500, 100)) -> list[tuple[tuple, dict]]:
    """One ``((), kwargs)`` denoiser call per timestep, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [((), inputs(g, t)) for t in timesteps]
