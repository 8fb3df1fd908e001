"""``torch.compile(denoiser, fullgraph=True)`` on frozen models of every recipe (CPU, tiny models).

For each recipe and each denoiser family (a one-level UNet with cross-attention and skip
concatenations, a one-block DiT of width 64), the frozen model is compiled with ``fullgraph=True``
and its outputs are compared with the eager frozen model's at three timesteps of the calibrated
schedule; after the first call no further graph is compiled (``error_on_recompile``): time-table
recipes change their scales per step inside one graph, and so does PTQD's output correction (a
forward hook of the denoiser, traced with it).

Speed: inductor on two CPU cores takes about a minute per model, so most recipes compile with
``backend="aot_eager"`` (dynamo and AOT autograd: the same graph capture, no code generation) and a
representative few (``INDUCTOR``) with ``backend="inductor"``.

The eager reference runs the ``reference`` backend: a compiled model cannot run the oneDNN int8
kernels (opaque packed weights, a grid read as Python numbers), so it takes the reference backend,
which computes the same quantized model in float arithmetic. Against it, ``aot_eager`` agrees bit for
bit. Inductor's kernels round differently in the last bit (fused norms, activations, its own sums),
and an activation lying on a rounding boundary of its 8-bit grid then takes the neighbouring code;
that one step travels through the later layers (the eager oneDNN backend does the same against the
reference one: 40-130 dB). So an inductor model is held to what matters: at each step its SQNR
against the full-precision denoiser is the eager model's within 0.5 dB, and it is at least 30 dB from
the eager model (mostly above 120 dB: equal to float rounding).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from torch._dynamo.testing import CompileCounterWithBackend

import dmquant
from dmquant.config import list_recipes, load_recipe
from dmquant.diffusers_io import scheduler_timesteps
from dmquant.errors import DMQuantError
from dmquant.models.adapters import find_denoiser
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_sd_pipeline
from dmquant.nn.wrap import quant_layers, time_table
from dmquant.quantizers.affine import sqnr_db

STEPS = 4
INDUCTOR = {("unet", "w8a8-time"), ("dit", "w4a4")}  # the others: aot_eager (see the module docstring)


def tiny_unet_pipeline():
    """The tiny SD pipeline with a one-level UNet (a cross-attention down block, an up block whose resnets
    read the skip concatenations, no mid block): every quantized op kind in a small graph."""
    pipe = build_tiny_sd_pipeline()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("UpBlock2D",), mid_block_type=None,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    pipe.register_modules(unet=unet)
    return pipe


def tiny_dit_pipeline():
    """The tiny DiT pipeline with one block of width 64 (so that w4a4-g64's groups of 64 fit)."""
    pipe = build_tiny_dit_pipeline(attention_head_dim=32)
    torch.manual_seed(1)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    pipe.register_modules(transformer=transformer)
    return pipe


def fast_recipe(name: str):
    """The recipe with its slow parts shortened (the graph is the same; the quality is not tested here)."""
    config = load_recipe(name)
    if config.reconstruction is not None:
        config = dataclasses.replace(config, reconstruction=dataclasses.replace(
            config.reconstruction, iterations=2, num_samples=4))
    if config.correction is not None:
        config = dataclasses.replace(config, correction=dataclasses.replace(config.correction, num_prompts=2,
                                                                            batch_size=2))
    return config


def frozen_pipeline(kind: str, recipe: str):
    """The frozen pipeline and a full-precision copy of its denoiser."""
    if kind == "unet":
        pipe, prompts, kw = tiny_unet_pipeline(), ["a red circle", "a blue square"], {"height": 16, "width": 16}
    else:
        pipe, prompts, kw = tiny_dit_pipeline(), [1, 2], {}
    full_precision = copy.deepcopy(find_denoiser(pipe)[1])
    dmquant.quantize(pipe, fast_recipe(recipe), prompts=prompts, num_inference_steps=STEPS, num_timesteps=STEPS,
                     progress=False, **kw)
    return dmquant.freeze(pipe), full_precision


def denoiser_call(kind: str, denoiser):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    if kind == "unet":
        context = torch.randn(2, 6, 32, generator=g)
        return lambda model, t: model(x, t, encoder_hidden_states=context).sample
    labels = torch.tensor([1, 2])
    return lambda model, t: model(x, timestep=t.expand(2), class_labels=labels).sample


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("recipe", list_recipes())
def test_compiled_frozen_denoiser_matches_eager(kind, recipe):
    if kind == "unet" and recipe == "w4a4-g64":
        with pytest.raises(DMQuantError, match="group"):  # 32-channel UNet: the clear error, before any work
            frozen_pipeline(kind, recipe)
        return
    pipe, full_precision = frozen_pipeline(kind, recipe)
    _, denoiser, _ = find_denoiser(pipe)
    layers = [layer for _, layer in quant_layers(denoiser)]
    assert layers and all(layer.frozen for layer in layers)
    for layer in layers:
        layer.backend = "reference"  # what the compiled model runs (the oneDNN kernels do not trace)
    timesteps = scheduler_timesteps(pipe.scheduler, STEPS)[:3]
    table = time_table(denoiser)
    if table is not None:  # the time tables are in use: the three steps are three different entries
        assert len({table.lookup(t) for t in timesteps}) == 3
    call = denoiser_call(kind, denoiser)
    with torch.no_grad():
        eager = [call(denoiser, t) for t in timesteps]
        reference = [call(full_precision, t) for t in timesteps]

        torch._dynamo.reset()
        backend = "inductor" if (kind, recipe) in INDUCTOR else "aot_eager"
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(denoiser, fullgraph=True, backend=counter)
        outputs = [call(compiled, timesteps[0])]
        graphs = counter.frame_count
        assert graphs >= 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            outputs += [call(compiled, t) for t in timesteps[1:]]
    assert counter.frame_count == graphs  # one graph (per traced function) serves every timestep
    for t, e, o in zip(timesteps, eager, outputs):
        if backend == "aot_eager":
            assert torch.equal(e, o), f"step {int(t)}: {sqnr_db(e, o):.1f} dB"
        else:
            assert sqnr_db(e, o) >= 30.0, f"step {int(t)}: {sqnr_db(e, o):.1f} dB"
    for t, r, e, o in zip(timesteps, reference, eager, outputs):
        assert abs(sqnr_db(r, o) - sqnr_db(r, e)) <= 0.5, f"step {int(t)}: {sqnr_db(r, o):.1f} vs {sqnr_db(r, e):.1f} dB"
