"""Which ControlNet of a pipeline ``quantize(pipe, ..., controlnet=...)`` quantizes, and with which recipe.

The ControlNet is calibrated on the calls the pipeline makes to it in the denoiser's calibration runs
(recorded at the same steps, before anything is quantized: :class:`dmquant.calibration.run.CompanionSource`);
its :class:`~dmquant.quantized_pipeline.QuantizationInfo` is attached to the ControlNet module itself
(``pipe.controlnet.dmquant``), and saving, loading and freezing treat it like the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from dmquant.config import QuantConfig, load_recipe
from dmquant.errors import DMQuantError
from dmquant.models.adapters import DenoiserAdapter, adapter_for

CONTROLNET_ATTRIBUTE = "controlnet"


@dataclass(frozen=True)
class ControlNetTarget:
    """The pipeline's ControlNet, its adapter and the recipe it is quantized with."""

    module: nn.Module
    adapter: DenoiserAdapter
    config: QuantConfig


def controlnet_target(pipe, spec: bool | str | Path | dict | QuantConfig | None, denoiser_config: QuantConfig,
                      with_calibration_data: bool) -> ControlNetTarget | None:
    """The ControlNet to quantize for ``quantize``'s ``controlnet=`` argument: ``False`` / ``None`` none;
    ``True`` the denoiser's recipe; a recipe (name, YAML path, dict, QuantConfig) one of its own."""
    if spec is None or spec is False:
        return None
    module = getattr(pipe, CONTROLNET_ATTRIBUTE, None)
    if not isinstance(module, nn.Module):
        raise DMQuantError(f"{type(pipe).__name__} has no ControlNet: pass controlnet=True only for a ControlNet "
                           "pipeline (e.g. StableDiffusionControlNetPipeline, FluxControlNetPipeline)")
    if type(module).__name__.endswith("MultiControlNetModel"):
        raise DMQuantError("the pipeline has several ControlNets (MultiControlNetModel): dmquant quantizes a single "
                           "ControlNet; drop controlnet= to quantize the denoiser only")
    if with_calibration_data:
        raise DMQuantError("controlnet= calibrates the ControlNet on the pipeline's own calibration runs: pass prompts "
                           "(and the conditioning images) instead of calibration_data, or quantize the bare module "
                           "with quantize(pipe.controlnet, recipe, calibration_data=[...])")
    # the ControlNet's calls come from the denoiser's calibration runs: its recipe records their settings
    config = replace(denoiser_config if spec is True else load_recipe(spec), calibration=denoiser_config.calibration)
    if config.mixed_precision is not None or config.correction is not None:
        raise DMQuantError(f"the ControlNet's recipe {config.name!r} has a 'mixed_precision' or 'correction' section, "
                           "which only a denoiser can use: give the ControlNet a recipe of its own, e.g. "
                           "controlnet='w8a8'")
    return ControlNetTarget(module, adapter_for(module), config)
