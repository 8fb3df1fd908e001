"""Frozen integer layers compute what the simulation computes (same integers, float rounding apart)."""

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.nn.int_layers import freeze_layer
from dmquant.nn.layers import QuantConv2d, QuantLinear

RECIPES = {
    "w8a8": (WeightQuantConfig(bits=8), ActQuantConfig(bits=8)),
    "w4a8": (WeightQuantConfig(bits=4, method="mse"), ActQuantConfig(bits=8, method="mse")),
    "w8a8-signed": (WeightQuantConfig(bits=8), ActQuantConfig(bits=8, symmetric=True)),
    "w4a6": (WeightQuantConfig(bits=4), ActQuantConfig(bits=6)),
    "w4a16-group": (WeightQuantConfig(bits=4, granularity="group", group_size=16), None),
    "w8a8-token": (WeightQuantConfig(bits=8), ActQuantConfig(bits=8, granularity="token")),
}


def calibrated(layer, wcfg, acfg, x):
    q = (QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d)(layer, wcfg, acfg)
    q.calibrate_weight()
    q.set_act_mode("observe")
    q(x)
    if q.input_quantizer is not None:
        q.input_quantizer.finalize()
    q.set_act_mode("quant")
    return q


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_frozen_layer_matches_simulation(recipe, kind):
    torch.manual_seed(0)
    wcfg, acfg = RECIPES[recipe]
    layer = nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(3, 20, 64) if kind == "linear" else torch.randn(2, 16, 8, 8)
    sim = calibrated(layer, wcfg, acfg, x)
    frozen = freeze_layer(sim)
    expect_integer = acfg is not None and acfg.static
    assert frozen.integer_path == expect_integer
    with torch.no_grad():
        a, b = sim(x), frozen(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    storage_bits = 8 if wcfg.bits > 4 else 4  # int8, or two int4 codes per byte
    expected = layer.weight.numel() * storage_bits // 8 + frozen.qweight.scale.numel() * 4
    assert frozen.weight_nbytes() == expected
