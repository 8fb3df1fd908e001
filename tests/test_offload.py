"""Quantized pipelines under diffusers' CPU offload (``enable_model_cpu_offload``,
``enable_sequential_cpu_offload``), on the CPU.

Without a GPU the execution device is the CPU (``device="cpu"``; sequential offload is applied to the
denoiser with accelerate's ``cpu_offload``, as the pipeline method does per component), and the facts that matter still show:
accelerate's hooks run around every call, sequential offload really moves the float parameters to the
``meta`` device between calls and back onto the execution device for each module's call (a tensor left
behind would fail), and ``.to()`` moves every tensor of a frozen layer, its prepared kernels (a plain
attribute) included. The quantized weights are never materialised in full precision.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload

import dmquant
from dmquant.models.adapters import find_denoiser
from dmquant.models.tiny import build_tiny_sd_pipeline
from dmquant.nn import backends
from dmquant.nn.layers import QuantLayer
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import quant_layers

CALL = {"num_inference_steps": 3, "height": 16, "width": 16, "output_type": "np"}
BRANCH = ("lora_down", "lora_up")


def frozen_sd(recipe):
    pipe = build_tiny_sd_pipeline()
    dmquant.quantize(pipe, recipe, prompts=["a red circle", "a blue square"], num_inference_steps=4,
                     num_timesteps=4, progress=False, height=16, width=16)
    return dmquant.freeze(pipe)


def images(pipe):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALL).images


def assert_no_float_weight(denoiser):
    """Frozen layers hold codes: no float weight, and their float parameters are the bias and the 16-bit
    low-rank factors only."""
    layers = quant_layers(denoiser)
    assert layers
    for _, layer in layers:
        assert layer.frozen and layer.weight is None and layer.qdq_weight is None
        floats = [n for n, p in layer.named_parameters() if p.is_floating_point()]
        assert all(n == "bias" or n.endswith(BRANCH) for n in floats), floats
        assert all(not q.qdata.is_floating_point() for q in layer.qweights)


@pytest.mark.parametrize("recipe", ["w8a8-time", "w4a4"])
def test_model_cpu_offload(recipe, fast_recipe):
    pipe = frozen_sd(fast_recipe(recipe))
    expected = images(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    _, unet, _ = find_denoiser(pipe)
    assert pipe._offload_device == torch.device("cpu:0") and hasattr(unet, "_hf_hook")
    assert_no_float_weight(unet)
    assert "onednn-int8" in str([layer.kernels.keys() for _, layer in quant_layers(unet)]) or recipe == "w4a4"
    assert (images(pipe) == expected).all()
    assert (images(pipe) == expected).all()  # the hooks moved the models back and forth: same again


@pytest.mark.parametrize("recipe", ["w8a8-time", "w4a4"])
def test_sequential_cpu_offload_loads_each_layer_for_its_call(recipe, monkeypatch, fast_recipe):
    pipe = frozen_sd(fast_recipe(recipe))
    expected = images(pipe)
    _, unet, _ = find_denoiser(pipe)
    # what enable_sequential_cpu_offload does to each component; called directly with the device "cpu":
    # given "cpu:0" (what the pipeline method makes of device="cpu"), accelerate 1.15 turns parameters
    # into plain tensors after their first call and fails, full-precision pipelines alike
    cpu_offload(unet, torch.device("cpu"), offload_buffers=len(unet._parameters) > 0)
    assert {p.device.type for p in unet.parameters()} == {"meta"}  # offloaded between calls (bias, low-rank)
    assert_no_float_weight(unet)
    layer_devices, branch_devices = [], []
    run, low_rank = backends.run, OutlierBranch.low_rank

    def recording_run(layer, x):  # inside the layer's call: after accelerate's hook loaded its tensors
        own = [p for n, p in layer.named_parameters() if not n.startswith("outlier.")]
        own += [b for n, b in layer.named_buffers() if not n.startswith("outlier.")]
        layer_devices.append({t.device.type for t in own})
        return run(layer, x)

    def recording_low_rank(branch, x):  # inside the branch's call: its low-rank factors loaded
        branch_devices.append({p.device.type for p in branch.parameters()})
        return low_rank(branch, x)

    monkeypatch.setattr(backends, "run", recording_run)
    monkeypatch.setattr(OutlierBranch, "low_rank", recording_low_rank)
    out = images(pipe)
    assert (out == expected).all()
    assert layer_devices and all(devices == {"cpu"} for devices in layer_devices)
    assert all(devices == {"cpu"} for devices in branch_devices)
    assert bool(branch_devices) == (recipe == "w4a4")
    assert {p.device.type for p in unet.parameters()} == {"meta"}  # offloaded again after the run


def test_to_moves_every_tensor_and_the_prepared_kernels():
    pipe = frozen_sd("w8a8-time")
    _, unet, _ = find_denoiser(pipe)
    layers = [layer for _, layer in quant_layers(unet)]
    assert any("onednn-int8" in layer.kernels for layer in layers)  # packed CPU weights, a plain attribute
    unet.to("meta")
    assert {t.device.type for t in list(unet.parameters()) + list(unet.buffers())} == {"meta"}
    for layer in layers:
        assert layer.kernels_device == torch.device("meta") and not layer.kernels_stale()
        assert "onednn-int8" not in layer.kernels  # prepared again for the new device: no stale CPU copy
        assert all(t.device.type == "meta" for t in _tensors(layer.kernels))
    assert_no_float_weight(unet)


def test_kernels_prepared_for_another_device_are_passed_over():
    """Codes moved tensor by tensor (accelerate's hooks do not call ``.to()``): the prepared kernels are
    stale, the layer computes with a backend that needs none (the reference), never with stale kernels."""
    pipe = frozen_sd("w8a8-static")
    _, unet, _ = find_denoiser(pipe)
    layer = next(layer for _, layer in quant_layers(unet) if "onednn-int8" in layer.kernels)
    x = torch.randn(2, 3, layer.geometry["in_features"]) if layer.kind == "linear" else None
    if x is None:
        x = torch.randn(1, layer.geometry["in_channels"], 4, 4)
    if layer.input_quantizers[0].table is not None:
        layer.input_quantizers[0].table.set_timestep(501)
    assert backends.choose(layer, x).name == "onednn-int8"
    layer.kernels_device = torch.device("meta")  # as if the codes had moved since the kernels were prepared
    assert layer.kernels_stale() and backends.choose(layer, x).name == "reference"
    layer.backend = "reference"
    expected = layer(x)
    layer.backend = "auto"
    assert torch.equal(layer(x), expected)
    assert isinstance(layer, QuantLayer)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
