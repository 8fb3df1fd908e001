"""A frozen W4A4 layer with smoothing and a low-rank branch runs as one fused GEMM call (issues 5, 7)."""

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.nn.int_layers import IntOutlierLayer, freeze_layer, fused_int4_supported
from dmquant.nn.layers import QuantLinear
from dmquant.nn.outlier import OutlierBranch


def frozen_layer(act_group=64, rotation=None, weight_group=64):
    torch.manual_seed(0)
    layer = nn.Linear(128, 96)
    acts = ActQuantConfig(bits=4, symmetric=True, granularity="group" if act_group else "token", group_size=act_group)
    twin = QuantLinear(layer, WeightQuantConfig(bits=4, granularity="group", group_size=weight_group), acts)
    branch = OutlierBranch(128, 96, smooth=True, rotation_seed=rotation, rank=8)
    branch.smooth.copy_(torch.rand(128) + 0.5)
    twin.attach_outlier_branch(branch)
    twin.calibrate_weight()
    twin.set_act_mode("quant")
    return twin, freeze_layer(twin)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("act_group", [64, None])
def test_fused_kernel_computes_the_frozen_layer(backend, act_group):
    twin, frozen = frozen_layer(act_group)
    assert isinstance(frozen, IntOutlierLayer) and fused_int4_supported(frozen.inner, frozen.branch)
    x = torch.randn(3, 37, 128)  # 111 tokens: not a multiple of the kernel's block
    x[..., 5] *= 30
    with torch.no_grad():
        expected = twin(x)
        frozen.fused_backend = backend
        out = frozen(x)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
    rel = float((out - expected).abs().sum() / expected.abs().sum())
    assert cos > 0.9999 and rel < 0.01, (float(cos), rel)


def test_layers_the_kernel_cannot_take_keep_the_unfused_path():
    _, rotated = frozen_layer(rotation=0)
    _, group32 = frozen_layer(act_group=32, weight_group=32)
    assert not fused_int4_supported(rotated.inner, rotated.branch)
    assert not fused_int4_supported(group32.inner, group32.branch)
