"""Adapters for diffusers denoisers: where the denoiser lives in a pipeline, what to leave alone.

Defaults follow what the field found necessary: the first and last layers (patch / latent embedders,
the final norm's modulation and projection), the timestep / guidance / pooled-text embedding MLPs and
the text-side embedders stay in full precision; everything inside the blocks (attention projections,
feed-forwards, the per-block AdaLN modulation, the text stream of joint blocks) is quantized (the
MMDiT choices measured on tiny-shapes-flux: see the comment above ``FLUX``).
Recipes add ``include`` / ``exclude`` glob patterns on top. A denoiser of no known family gets the
``generic`` adapter: its linear and conv layers are quantized, its attention is left in full precision.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

from torch import nn

from dmquant.errors import DMQuantError


@dataclass(frozen=True)
class DenoiserAdapter:
    """What dmquant needs to know about one family of denoisers."""

    name: str
    class_names: tuple[str, ...]
    default_exclude: tuple[str, ...]
    timestep_argument: str = "timestep"
    timestep_position: int = 1  # its place in forward()'s signature (adapter_for reads it from the signature)
    block_types: tuple[str, ...] = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock",
                                    "Downsample2D", "Upsample2D")  # units of block reconstruction (BRECQ)
    timestep_scale: float = 1.0  # the denoiser's timestep = the scheduler's * this (FLUX, Qwen-Image: 1/1000)
    quantize_attention: bool = True  # False: attention left in full precision (unknown denoisers)

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.class_names

    def read_timestep(self, args: tuple, kwargs: dict):
        """The timestep argument of one denoiser call (keyword or positional)."""
        if self.timestep_argument in kwargs:
            return kwargs[self.timestep_argument]
        if len(args) > self.timestep_position:
            return args[self.timestep_position]
        raise DMQuantError(f"the denoiser was called without its {self.timestep_argument!r} argument: "
                           "time-conditioned quantizers cannot tell the step")

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The outermost modules of ``block_types``, in execution order (BRECQ's reconstruction units)."""
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if module is model or type(module).__name__ not in self.block_types:
                continue
            if not any(name.startswith(outer + ".") for outer, _ in found):
                found.append((name, module))
        return found

    def concat_points(self, model: nn.Module) -> list[tuple[str, int]]:
        """``(layer name, split index)`` of each layer that consumes a skip concatenation ``cat([h, skip])``.

        The index is the number of channels of the first part (the upsampled features ``h``).
        Only UNets have them; see :func:`unet_concat_points`.
        """
        return unet_concat_points(model) if self.name == "unet" else []


UNET = DenoiserAdapter(
    name="unet",
    class_names=("UNet2DConditionModel", "UNet2DModel"),
    default_exclude=(
        "conv_in",
        "conv_out",
        "time_embedding.*",
        "time_embed.*",
        "add_embedding.*",
        "class_embedding.*",
    ),
)

DIT = DenoiserAdapter(
    name="dit",
    class_names=(
        "DiTTransformer2DModel",
        "PixArtTransformer2DModel",
        "Transformer2DModel",
        "SanaTransformer2DModel",
    ),
    default_exclude=(
        "pos_embed.*",  # patch embedding: the first layer
        "proj_out*",  # the final layer (and its modulation)
        "*.emb.*",  # DiT: per-block timestep/label embedding MLP
        "adaln_single.*",  # PixArt: timestep embedding MLP
        "time_embed.*",
    ),
)

def _family(name: str, class_name: str, exclude: tuple[str, ...], blocks: tuple[str, ...],
            timestep_scale: float = 1.0) -> DenoiserAdapter:
    return DenoiserAdapter(name=name, class_names=(class_name,), default_exclude=exclude, block_types=blocks,
                           timestep_scale=timestep_scale)


# Today's transformer families. Each keeps its embedders (latent patches, text, timestep, guidance, pooled
# text) and its output (norm_out's modulation, proj_out) in full precision. FLUX and Qwen-Image pipelines
# pass timestep / 1000 (flow-matching sigmas) to the denoiser.
# Inside the MMDiT blocks (SD3, FLUX) the per-block AdaLN modulation (norm1*.linear) and the text stream
# (add_*_proj, to_add_out, ff_context) stay quantized: measured on tiny-shapes-flux, an SD3-style MMDiT trained
# with flow matching (eval/flux_defaults.py, 64 held-out captions, PSNR against FP; pipelines/README.md has the
# table), the AdaLN layers in full precision gain +0.38 / +1.39 / +0.91 dB at w8a8 / w4a8-rtn / w4a4 for +27% /
# +72% / +62% weight bytes (8-bit weights on them give the same gain for a third of those bytes: a `layers`
# override), the text stream in full precision +0.28 / +0.29 / -0.15 dB for +25% / +67% / +57%. On a FLUX.1-sized
# transformer (models.full_size.flux_transformer) they are 27% and 18% of the linear weights.
FLUX = _family("flux", "FluxTransformer2DModel",
               ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out"),
               ("FluxTransformerBlock", "FluxSingleTransformerBlock"), timestep_scale=1e-3)
SD3 = _family("sd3", "SD3Transformer2DModel",
              ("pos_embed.*", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out"),
              ("JointTransformerBlock",))
QWEN_IMAGE = _family("qwen-image", "QwenImageTransformer2DModel",
                     ("img_in", "txt_in", "time_text_embed.*", "norm_out.*", "proj_out"),
                     ("QwenImageTransformerBlock",), timestep_scale=1e-3)
WAN = _family("wan", "WanTransformer3DModel", ("patch_embedding", "condition_embedder.*", "proj_out"),
              ("WanTransformerBlock",))
LTX = _family("ltx", "LTXVideoTransformer3DModel", ("proj_in", "time_embed.*", "caption_projection.*", "proj_out"),
              ("LTXVideoTransformerBlock",))
COGVIDEOX = _family("cogvideox", "CogVideoXTransformer3DModel",
                    ("patch_embed.*", "time_embedding.*", "ofs_embedding.*", "norm_out.*", "proj_out"),
                    ("CogVideoXBlock",))
HUNYUAN_VIDEO = _family("hunyuan-video", "HunyuanVideoTransformer3DModel",
                        ("x_embedder.*", "context_embedder.*", "time_text_embed.*", "norm_out.*", "proj_out"),
                        ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"))
# ControlNets (quantized with ``quantize(pipe, ..., controlnet=True)``): the denoiser family's embedders stay
# in full precision, and so do the ControlNet's own first layer on the conditioning image and its outputs, the
# projections that make the residuals added to the denoiser (``*_FULL_PRECISION``). Measured on the tiny random
# ControlNet pipelines, w8a8 (eval/controlnet_sqnr.py; SQNR of the ControlNet's residuals / of the denoiser's
# output per step with both quantized): quantizing SD's zero-convs controlnet_down_blocks costs 4.4 dB /
# 0.2 dB, FLUX's controlnet_blocks 13.5 / 9.6, controlnet_single_blocks 13.7 / 9.7, controlnet_x_embedder
# 4.7 / 2.1; SD's controlnet_mid_block (a zero-conv too, one 1x1 conv) and the whole controlnet_cond_embedding
# cost <= 0.2 / 0.3 dB: the cond embedding is quantized but its conv_in (raw pixels, like the UNet's conv_in).
# XLabs-style FLUX ControlNets' input_hint_block is treated like the cond embedding (not measured: the tiny
# model has none).
CONTROLNET_FULL_PRECISION = ("controlnet_cond_embedding.conv_in", "controlnet_down_blocks.*", "controlnet_mid_block")
FLUX_CONTROLNET_FULL_PRECISION = ("controlnet_x_embedder", "input_hint_block.conv_in", "controlnet_blocks.*",
                                  "controlnet_single_blocks.*")
CONTROLNET = DenoiserAdapter(name="controlnet", class_names=("ControlNetModel",),
                             default_exclude=UNET.default_exclude + CONTROLNET_FULL_PRECISION)
FLUX_CONTROLNET = _family("flux-controlnet", "FluxControlNetModel",
                          ("x_embedder", "context_embedder", "time_text_embed.*") + FLUX_CONTROLNET_FULL_PRECISION,
                          FLUX.block_types, timestep_scale=1e-3)
GENERIC = DenoiserAdapter(name="generic", class_names=(), default_exclude=(), block_types=(), quantize_attention=False)

ADAPTERS = (UNET, DIT, FLUX, SD3, QWEN_IMAGE, WAN, LTX, COGVIDEOX, HUNYUAN_VIDEO, CONTROLNET, FLUX_CONTROLNET)


def _skip_channels(model: nn.Module) -> list[int]:
    """Channels of the skip tensors a diffusers UNet pushes on the way down, in push order.

    ``conv_in``'s output, then every down block's resnet outputs and its downsampler's output.
    """
    stack = [model.conv_in.out_channels]
    for block in model.down_blocks:
        stack += [r.out_channels for r in block.resnets]
        stack += [d.out_channels for d in (getattr(block, "downsamplers", None) or [])]
    return stack


def unet_concat_points(model: nn.Module) -> list[tuple[str, int]]:
    """Concatenations of a diffusers UNet's up blocks (``UpBlock2D``, ``CrossAttnUpBlock2D``, ...).

    Each up-block resnet ``i`` gets ``cat([hidden, skip], dim=1)``, where ``skip`` is popped from the
    down path's stack; its ``conv1`` and ``conv_shortcut`` consume that concatenation (``conv1`` after
    GroupNorm and SiLU, which keep channels in place). The split index is ``in_channels - skip``.
    """
    if not all(hasattr(model, a) for a in ("conv_in", "down_blocks", "up_blocks")):
        return []
    stack, points = _skip_channels(model), []
    for b, block in enumerate(model.up_blocks):
        for i, resnet in enumerate(block.resnets):
            if not stack:
                raise DMQuantError(f"up_blocks.{b} takes more skips than the down path gives: unknown UNet layout")
            split = resnet.in_channels - stack.pop()
            if split <= 0:
                raise DMQuantError(f"up_blocks.{b}.resnets.{i} does not consume a concatenation: unknown UNet layout")
            prefix = f"up_blocks.{b}.resnets.{i}"
            points.append((f"{prefix}.conv1", split))
            if getattr(resnet, "conv_shortcut", None) is not None:
                points.append((f"{prefix}.conv_shortcut", split))
    return points
DENOISER_ATTRIBUTES = ("unet", "transformer")


def find_denoiser(pipe) -> tuple[str, nn.Module, DenoiserAdapter]:
    """The pipeline's denoiser: ``(attribute name, module, adapter)``.

    A bare denoiser module may be passed instead of a pipeline; then the attribute name is ``""``.
    """
    if isinstance(pipe, nn.Module) and not hasattr(pipe, "components"):
        return "", pipe, adapter_for(pipe)
    for attr in DENOISER_ATTRIBUTES:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return attr, module, adapter_for(module)
    raise DMQuantError(
        f"{type(pipe).__name__} has no 'unet' or 'transformer' component: dmquant quantizes the denoiser of a "
        "diffusion pipeline; pass a pipeline with a UNet or a DiT-style transformer"
    )


def adapter_for(model: nn.Module) -> DenoiserAdapter:
    """The family adapter of ``model`` (by class name; ``generic`` for an unknown denoiser), with the
    timestep's position read from its ``forward`` signature."""
    adapter = next((a for a in ADAPTERS if a.matches(model)), None)
    if adapter is None:
        adapter = UNET if "UNet" in type(model).__name__ else GENERIC
    try:
        names = [n for n in inspect.signature(model.forward).parameters]
    except (TypeError, ValueError):  # builtins and odd callables: keep the default position
        return adapter
    if adapter.timestep_argument in names:
        adapter = replace(adapter, timestep_position=names.index(adapter.timestep_argument))
    return adapter
