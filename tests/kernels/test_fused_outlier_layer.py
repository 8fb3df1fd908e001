"""A frozen W4A4 layer with smoothing and a low-rank branch runs as one fused GEMM call (issues 5, 7)."""

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.nn import backends
from dmquant.nn.backends import fused_int4_supported
from dmquant.nn.layers import QuantLinear
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import input_quantizers, set_activation_mode, weight_quantizers


def frozen_layer(act_group=64, rotation=None, weight_group=64, act_bits=4):
    torch.manual_seed(0)
    layer = nn.Linear(128, 96)
    acts = ActQuantConfig(bits=act_bits, symmetric=True, granularity="group" if act_group else "token",
                          group_size=act_group)
    twin = QuantLinear.wrap(layer, weight_quantizers(WeightQuantConfig(bits=4, granularity="group",
                                                                       group_size=weight_group)),
                            input_quantizers(acts, None, None))
    branch = OutlierBranch(128, 96, smooth=True, rotation_seed=rotation, rank=8)
    branch.smooth.copy_(torch.rand(128) + 0.5)
    twin.attach_outlier_branch(branch, layer.weight)
    twin.calibrate_weight()
    set_activation_mode(twin, "quant")
    frozen = twin.frozen_copy()
    frozen.prepare_kernels()
    return twin, frozen


def inputs():
    x = torch.randn(3, 37, 128, generator=torch.Generator().manual_seed(1))  # 111 tokens: not a block multiple
    x[..., 5] *= 30
    return x


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("act_group, act_bits", [(64, 4), (None, 4), (64, 8)])
def test_fused_kernel_computes_the_frozen_layer(kernel, act_group, act_bits):
    twin, frozen = frozen_layer(act_group, act_bits=act_bits)
    assert fused_int4_supported(frozen) and not fused_int4_supported(twin)  # only the frozen state
    x = inputs()
    with torch.no_grad():
        expected = twin(x)
        frozen.backend, frozen.kernel = "fused-int4", kernel
        out = frozen(x)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
    rel = float((out - expected).abs().sum() / expected.abs().sum())
    assert cos > 0.9999 and rel < 0.01, (float(cos), rel)


def test_on_the_cpu_auto_keeps_the_reference_backend():
    twin, frozen = frozen_layer()
    x = inputs()
    assert backends.choose(frozen, x).name == "reference"  # the fused kernel is chosen for CUDA inputs only
    with torch.no_grad():
        assert torch.equal(frozen(x), twin(x))


def test_layers_the_kernel_cannot_take_keep_the_unfused_path():
    _, rotated = frozen_layer(rotation=0)
    _, group32 = frozen_layer(act_group=32, weight_group=32)
    assert not fused_int4_supported(rotated)
    assert not fused_int4_supported(group32)
    rotated.backend = "fused-int4"
    with pytest.raises(DMQuantError, match="cannot compute this layer"):
        rotated(inputs())
