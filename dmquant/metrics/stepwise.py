"""The denoiser's output at every step of a pipeline run, held on a reference run's trajectory.

``denoiser_outputs(pipe, call, reference_latents)`` runs ``pipe(**call)`` and returns what its denoiser
returned at each step; with ``reference_latents`` (the latents after each step of another run, e.g. the
full-precision one) every step starts from the reference's latents (``callback_on_step_end`` puts them
back), so the outputs of a quantized pipeline differ from the reference's only by what quantization
changes within that step (the denoiser's, and a ControlNet's residuals), not by a trajectory that drifted.
"""

from __future__ import annotations

import torch

from dmquant.models.adapters import find_denoiser
from dmquant.quantizers.affine import sqnr_db


def denoiser_outputs(pipe, call: dict, reference_latents: list[torch.Tensor] | None = None, seed: int = 0
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(denoiser output of each call, latents after each step)`` of ``pipe(**call)`` (latent output; the
    initial noise from a CPU generator seeded with ``seed``)."""
    outputs, latents = [], []
    _, denoiser, _ = find_denoiser(pipe)

    def keep_output(_module, _args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())

    def on_step_end(_pipe, step, _timestep, tensors):
        latents.append(tensors["latents"].detach().clone())
        return {} if reference_latents is None else {"latents": reference_latents[step].clone()}

    handle = denoiser.register_forward_hook(keep_output)
    try:
        with torch.no_grad():
            pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="latent", callback_on_step_end=on_step_end,
                 callback_on_step_end_tensor_inputs=["latents"])
    finally:
        handle.remove()
    return outputs, latents


def stepwise_sqnr(pipe, call: dict, reference_outputs: list[torch.Tensor],
                  reference_latents: list[torch.Tensor], seed: int = 0) -> float:
    """SQNR (dB) of ``pipe``'s denoiser outputs, every step started from the reference's latents, against the
    reference's outputs (all steps pooled)."""
    outputs, _ = denoiser_outputs(pipe, call, reference_latents, seed)
    return sqnr_db(torch.cat([o.flatten() for o in reference_outputs]), torch.cat([o.flatten() for o in outputs]))
