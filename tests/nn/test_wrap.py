"""Layer selection by kind in recipes (``conv:*``, ``linear:*``) and weight-only layers in a W8A8 recipe."""

from __future__ import annotations

import torch

import dmquant
from dmquant.config import QuantConfig
from dmquant.models.adapters import find_denoiser
from dmquant.models.tiny import build_tiny_sd_pipeline
from dmquant.nn.wrap import quant_layers
from dmquant.quantizers.affine import sqnr_db


def test_conv_weight_only_and_linear_per_token_follow_the_layer_kind():
    pipe = build_tiny_sd_pipeline()
    _, unet, _ = find_denoiser(pipe)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=text).sample
    config = QuantConfig.from_dict({
        "weights": {"bits": 8, "granularity": "channel"},
        "activations": {"bits": 8, "granularity": "token", "symmetric": False},
        "attention": None, "layers": {"conv:*": {"weight_only": True}}})
    dmquant.quantize(pipe, config, calibration_data=[((x, t), {"encoder_hidden_states": text})], progress=False)
    layers = dict(quant_layers(unet))
    convs = {n: m for n, m in layers.items() if isinstance(m, dmquant.nn.layers.QuantConv2d)}
    linears = {n: m for n, m in layers.items() if isinstance(m, dmquant.nn.layers.QuantLinear)}
    assert convs and linears
    assert all(not m.input_quantizers for m in convs.values())
    assert all(len(m.input_quantizers) == 1 and m.input_quantizers[0].granularity == "token"
               and not m.input_quantizers[0].symmetric for m in linears.values())
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=text).sample
    assert sqnr_db(ref, out) > 35.0, sqnr_db(ref, out)


def test_include_and_exclude_patterns_take_a_kind():
    pipe = build_tiny_sd_pipeline()
    _, unet, _ = find_denoiser(pipe)
    weight_only = {"weights": {"bits": 8}, "activations": None, "attention": None}
    dmquant.quantize(pipe, QuantConfig.from_dict({**weight_only, "include": ["conv:*"]}), progress=False)
    layers = dict(quant_layers(unet))
    assert layers and all(isinstance(m, dmquant.nn.layers.QuantConv2d) for m in layers.values())
    pipe = build_tiny_sd_pipeline()
    _, unet, _ = find_denoiser(pipe)
    dmquant.quantize(pipe, QuantConfig.from_dict({**weight_only, "exclude": ["conv:*", "linear:*.to_q"]}),
                     progress=False)
    layers = dict(quant_layers(unet))
    assert layers and all(isinstance(m, dmquant.nn.layers.QuantLinear) and not n.endswith("to_q")
                          for n, m in layers.items())
    assert any(n.endswith("to_k") for n in layers)
