"""Adapters for diffusers denoisers: where the denoiser lives in a pipeline, what to leave alone.

Defaults follow what the field found necessary: the first and last layers and the timestep
embedding MLP stay in full precision. Recipes add ``include`` / ``exclude`` glob patterns on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dmquant.errors import DMQuantError


@dataclass(frozen=True)
class DenoiserAdapter:
    """What dmquant needs to know about one family of denoisers."""

    name: str
    class_names: tuple[str, ...]
    default_exclude: tuple[str, ...]
    timestep_argument: str = "timestep"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.class_names


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

ADAPTERS = (UNET, DIT)
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
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    cls = type(model).__name__
    if "Transformer" in cls:
        return DIT
    if "UNet" in cls:
        return UNET
    raise DMQuantError(
        f"no adapter for the denoiser {cls}: supported are "
        f"{', '.join(n for a in ADAPTERS for n in a.class_names)}"
    )
