"""The outlier branch inside wrapped layers: smoothing, rotation and the low-rank branch (issue 5)."""

import math

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import full_precision, input_quantizers, set_activation_mode, weight_quantizers
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.outliers import smoothing_factors

W4 = WeightQuantConfig(bits=4, granularity="channel")


def sqnr(ref, out):
    ref, out = ref.detach(), out.detach()
    return 10 * math.log10(float(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def outlier_inputs(n, channels, seed, hot=(3, 17), gain=40.0):
    """``[n, channels]`` Gaussian inputs whose ``hot`` channels are ``gain`` times larger."""
    x = torch.randn(n, channels, generator=torch.Generator().manual_seed(seed))
    x[:, list(hot)] *= gain
    return x


def linear(seed=0, inp=64, out=48):
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


def conv(seed=0, inp=16, out=24, k=3):
    torch.manual_seed(seed)
    return nn.Conv2d(inp, out, k, padding=1, stride=1)


def with_branch(layer, smooth=None, rotation_seed=None, rank=0, acts=None, weights=W4):
    cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
    twin = cls.wrap(layer, weight_quantizers(weights), input_quantizers(acts, None, None))
    w = twin.weight
    branch = OutlierBranch(w.shape[1], w.shape[0], twin.branch_geometry(), smooth=smooth is not None,
                           rotation_seed=rotation_seed, rank=rank)
    if smooth is not None:
        branch.smooth.copy_(smooth)
    twin.attach_outlier_branch(branch, layer.weight)
    twin.calibrate_weight()
    return twin


@pytest.mark.parametrize("make", [linear, conv])
@pytest.mark.parametrize("parts", ["smooth", "rotation", "low_rank", "all"])
def test_branch_leaves_the_full_precision_output_unchanged(make, parts):
    layer = make()
    channels = layer.weight.shape[1]
    x = torch.randn(4, channels) if isinstance(layer, nn.Linear) else torch.randn(2, channels, 8, 8)
    ref = layer(x)
    smooth = torch.rand(channels) * 4 + 0.1 if parts in ("smooth", "all") else None
    twin = with_branch(layer, smooth=smooth, rotation_seed=3 if parts in ("rotation", "all") else None,
                       rank=8 if parts in ("low_rank", "all") else 0)
    with full_precision(twin):
        out = twin(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), float((out - ref).abs().max())
    assert twin.outlier.rank == (8 if parts in ("low_rank", "all") else 0)


def test_low_rank_branch_is_stored_in_16_bit_and_the_residual_absorbs_its_rounding():
    layer = linear()
    original = layer.weight.detach().clone()
    twin = with_branch(layer, rank=16)
    assert twin.weight is not layer.weight and torch.equal(layer.weight, original)  # the FP layer is untouched
    assert twin.outlier.lora_up.dtype == torch.float16 and twin.outlier.lora_down.dtype == torch.float16
    dense = twin.weight.double() + twin.outlier.low_rank_weight()
    assert torch.allclose(dense, layer.weight.double(), atol=1e-6)


def test_low_rank_branch_lowers_the_4bit_layer_error_on_held_out_inputs():
    # A weight with a few dominant directions (as trained layers have), quantized to 4 bits per channel.
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    u, v = torch.randn(64, 4), torch.randn(4, 64)
    layer.weight.data = 0.05 * torch.randn(64, 64) + u @ v / 4
    held_out = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    ref = layer(held_out)
    acts = ActQuantConfig(bits=8, symmetric=True, granularity="token")
    plain = with_branch(layer, acts=acts)
    low_rank = with_branch(layer, rank=8, acts=acts)
    for twin in (plain, low_rank):
        set_activation_mode(twin, "quant")
    gain = sqnr(ref, low_rank(held_out)) - sqnr(ref, plain(held_out))
    assert gain > 6.0, gain


def test_smoothing_lowers_the_error_of_static_activations_with_outlier_channels():
    layer = linear()
    calib, held_out = outlier_inputs(512, 64, 0), outlier_inputs(256, 64, 1)
    ref = layer(held_out)
    acts = ActQuantConfig(bits=8, symmetric=False, granularity="tensor")
    errors = {}
    for name, smooth in (("plain", None), ("smooth", smoothing_factors(calib.abs().amax(0), layer.weight, 0.5))):
        twin = with_branch(layer, smooth=smooth, acts=acts, weights=WeightQuantConfig(bits=8))
        set_activation_mode(twin, "observe")
        twin(calib)
        twin.input_quantizers[0].finalize()
        set_activation_mode(twin, "quant")
        errors[name] = sqnr(ref, twin(held_out))
    assert errors["smooth"] - errors["plain"] > 6.0, errors


def test_rotation_lowers_the_error_of_4bit_per_token_activations_with_outliers():
    layer = linear()
    held_out = outlier_inputs(256, 64, 1)
    ref = layer(held_out)
    acts = ActQuantConfig(bits=4, symmetric=True, granularity="token")
    w8 = WeightQuantConfig(bits=8)  # the activations' error dominates
    plain, rotated = with_branch(layer, acts=acts, weights=w8), with_branch(layer, rotation_seed=0, acts=acts, weights=w8)
    for twin in (plain, rotated):
        set_activation_mode(twin, "quant")
    assert sqnr(ref, rotated(held_out)) - sqnr(ref, plain(held_out)) > 3.0


@pytest.mark.parametrize("make", [linear, conv])
def test_frozen_layer_computes_what_the_simulation_computes(make):
    layer = make()
    channels = layer.weight.shape[1]
    x = outlier_inputs(8, channels, 2) if isinstance(layer, nn.Linear) else torch.randn(2, channels, 8, 8)
    acts = ActQuantConfig(bits=4, symmetric=True, granularity="group", group_size=8)
    twin = with_branch(layer, smooth=torch.rand(channels) + 0.5, rotation_seed=1, rank=4, acts=acts)
    set_activation_mode(twin, "quant")
    with torch.no_grad():
        expected = twin(x)
        frozen = twin.frozen_copy()
        frozen.prepare_kernels()
        assert frozen.outlier is not None and frozen.outlier is not twin.outlier
        assert torch.equal(frozen(x), expected)  # reference backend: the simulation's arithmetic
    packed = frozen.qweights[0].nbytes()
    assert frozen.weight_nbytes() == packed + 4 * channels + 2 * 4 * (twin.weight[0].numel() + twin.weight.shape[0])


def test_rotation_of_an_odd_channel_count_and_grouped_convs_are_refused_or_reported():
    with pytest.raises(DMQuantError, match="even number of input channels"):
        OutlierBranch(15, 8, rotation_seed=0)
    assert QuantLinear.wrap(nn.Linear(8, 8), weight_quantizers(W4), None).can_take_branch
    assert QuantConv2d.wrap(nn.Conv2d(8, 8, 3), weight_quantizers(W4), None).can_take_branch
    twin = QuantConv2d.wrap(nn.Conv2d(8, 8, 3, groups=2), weight_quantizers(W4), None)
    assert not twin.can_take_branch
    reflect = QuantConv2d.wrap(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), weight_quantizers(W4), None)
    assert not reflect.can_take_branch


def test_dynamic_group_activations_quantize_each_group_of_each_token():
    x = torch.randn(3, 5, 16)
    x[..., 0] *= 100  # an outlier in the first group only
    q = ActQuantizer(4, symmetric=True, granularity="group", group_size=8)
    q.set_mode("quant")
    out = q(x)
    expected = torch.cat([_token_quant(x[..., i:i + 8]) for i in (0, 8)], dim=-1)
    assert torch.equal(out, expected)
    # the second group does not see the outlier: its error stays small
    assert float((out[..., 8:] - x[..., 8:]).abs().max()) < float(x[..., 8:].abs().max()) / 7 + 1e-6


def _token_quant(x):
    q = ActQuantizer(4, symmetric=True, granularity="token")
    q.set_mode("quant")
    return q(x)
