"""ControlNet pipelines (SD, SDXL, FLUX; tiny random weights): what quantizing the denoiser and the ControlNet
costs, and what quantizing the layers a ControlNet keeps in full precision would cost.

Each pipeline is calibrated on 4 prompts with 4 conditioning images of their own (4 steps, batches of 2),
then measured on 2 held-out prompts with other conditioning images and another seed. Columns (dB):

    denoiser      SQNR of the denoiser's output at every step (each step started from the FP run's latents,
                  all steps pooled), ControlNet in full precision
    + controlnet  the same with the ControlNet quantized too (its default exclusions)
    + all layers  the ControlNet with the layers it keeps in full precision by default quantized as well (the
                  adapters' *_FULL_PRECISION: the first conv on the conditioning image, the zero-convs /
                  controlnet blocks that make its residuals)
    controlnet    SQNR of the ControlNet's residuals alone (default exclusions; all layers quantized)
    latents       final latents of a free run, denoiser and ControlNet quantized (default exclusions)

    OMP_NUM_THREADS=1 python eval/controlnet_sqnr.py --recipes w8a8,w8a8-time
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import dmquant
from dmquant.config import QuantConfig
from dmquant.diffusers_io import conditioning_image_argument
from dmquant.metrics.stepwise import denoiser_outputs, stepwise_sqnr
from dmquant.models.adapters import CONTROLNET_FULL_PRECISION, FLUX_CONTROLNET_FULL_PRECISION, adapter_for
from dmquant.models.tiny_control import (
    TINY_CONTROL_NAMES,
    build_tiny_controlnet_pipeline,
    conditioning_images,
)
from dmquant.nn.wrap import full_precision
from dmquant.quantizers.affine import sqnr_db

CALIBRATION = ["a yellow star", "big purple circle at the left", "green square at the bottom", "small white disk"]
HELD_OUT = ["a red circle", "blue square at the top"]
STEPS, SIZE = 4, {"height": 16, "width": 16}


def all_layers_recipe(recipe: str, controlnet) -> QuantConfig:
    """``recipe`` with the ControlNet's full-precision layers quantized (the family's embedders still excluded)."""
    config = dmquant.load_recipe(recipe)
    own = FLUX_CONTROLNET_FULL_PRECISION if "Flux" in type(controlnet).__name__ else CONTROLNET_FULL_PRECISION
    kept = tuple(p for p in adapter_for(controlnet).default_exclude if p not in own)
    return replace(config, name=f"{config.name}+all", use_default_excludes=False, exclude=config.exclude + kept)


class ResidualRecorder:
    """The ControlNet's outputs (all residual tensors, flattened) over a run."""

    def __init__(self, controlnet):
        self.values: list[torch.Tensor] = []
        self.handle = controlnet.register_forward_hook(lambda _m, _a, out: self.values.append(_flat(out)))

    def flat(self) -> torch.Tensor:
        self.handle.remove()
        return torch.cat(self.values)


def _flat(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().flatten()
    parts = [_flat(v) for v in (value.to_tuple() if hasattr(value, "to_tuple") else value) if v is not None]
    return torch.cat(parts) if parts else torch.zeros(0)


def measure(name: str, recipe: str, all_layers: bool) -> dict[str, float]:
    pipe = build_tiny_controlnet_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    arg = conditioning_image_argument(pipe)
    call = {"prompt": HELD_OUT, arg: conditioning_images(len(HELD_OUT), seed=100), "num_inference_steps": STEPS, **SIZE}
    recorder = ResidualRecorder(pipe.controlnet)
    ref_out, ref_latents = denoiser_outputs(pipe, call, seed=123)
    ref_residuals = recorder.flat()
    controlnet = all_layers_recipe(recipe, pipe.controlnet) if all_layers else True
    dmquant.quantize(pipe, recipe, CALIBRATION, **{arg: conditioning_images(len(CALIBRATION), seed=7)},
                     num_inference_steps=STEPS, batch_size=2, progress=False, controlnet=controlnet, **SIZE)
    with full_precision(pipe.controlnet):
        denoiser = stepwise_sqnr(pipe, call, ref_out, ref_latents, seed=123)
    recorder = ResidualRecorder(pipe.controlnet)
    both = stepwise_sqnr(pipe, call, ref_out, ref_latents, seed=123)
    residuals = sqnr_db(ref_residuals, recorder.flat())
    free = denoiser_outputs(pipe, call, seed=123)[1][-1]
    return {"denoiser": denoiser, "both": both, "controlnet": residuals, "latents": sqnr_db(ref_latents[-1], free)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="w8a8,w8a8-time")
    p.add_argument("--models", default=",".join(TINY_CONTROL_NAMES))
    args = p.parse_args()
    print("| model | recipe | denoiser | + controlnet | + all layers | controlnet | controlnet, all layers | latents |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for recipe in args.recipes.split(","):
            default, every = measure(name, recipe, False), measure(name, recipe, True)
            print(f"| {name} | {recipe} | {default['denoiser']:.1f} | {default['both']:.1f} | {every['both']:.1f} | "
                  f"{default['controlnet']:.1f} | {every['controlnet']:.1f} | {default['latents']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
