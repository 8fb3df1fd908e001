import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmquant.config import ActQuantConfig, AttentionQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.nn.attention import QuantAttention
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.nn.wrap import attention_quantizers, full_precision, input_quantizers, weight_quantizers
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.weight import WeightQuantizer


def test_quant_linear_matches_reference_math():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    q = QuantLinear.wrap(layer, lambda: WeightQuantizer(4),
                         lambda dim: ActQuantizer(8, granularity="token", channel_dim=dim))
    q.calibrate_weight()
    q.input_quantizers[0].set_mode("quant")
    x = torch.randn(5, 64)
    expected = F.linear(q.input_quantizers[0](x), q.weight_quantizers[0](layer.weight), layer.bias)
    with torch.no_grad():
        assert torch.equal(q(x), expected)
        assert 14.0 < sqnr_db(layer(x), q(x)) < 30.0  # 4-bit weights: a real, bounded error


def test_quant_conv_keeps_geometry_and_is_accurate_at_8_bits():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    q = QuantConv2d.wrap(conv, weight_quantizers(WeightQuantConfig(bits=8)), None)
    q.calibrate_weight()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert q(x).shape == conv(x).shape == (2, 16, 5, 5)
        assert sqnr_db(conv(x), q(x)) > 38.0


def test_wrapped_layer_shares_the_float_parameters_and_full_precision_turns_quantization_off():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    q = QuantLinear.wrap(layer, weight_quantizers(WeightQuantConfig(bits=4)),
                         input_quantizers(ActQuantConfig(bits=4, granularity="token"), None, None))
    assert q.weight is layer.weight and q.bias is layer.bias and not q.frozen
    assert q.input_quantizers[0].channel_dim == -1
    q.calibrate_weight()
    q.input_quantizers[0].set_mode("quant")
    x = torch.randn(6, 32)
    with torch.no_grad():
        quantized = q(x)
        with full_precision(q):
            assert torch.equal(q(x), layer(x))
        assert torch.equal(q(x), quantized)  # modes and weight quantization come back after the block
    assert sqnr_db(layer(x), quantized) < 25.0


def test_the_cached_fake_weight_follows_recalibration_and_gradients_flow_by_ste():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    q = QuantLinear.wrap(layer, lambda: WeightQuantizer(4), None)
    with pytest.raises(DMQuantError, match="before calibration"):
        q(torch.randn(2, 16))
    q.calibrate_weight()
    assert torch.equal(q.qdq_weight, q.weight_quantizers[0](layer.weight.detach()))
    with torch.no_grad():
        layer.weight.mul_(2)
    q.calibrate_weight()
    assert torch.equal(q.qdq_weight, q.weight_quantizers[0](layer.weight.detach()))
    x = torch.randn(3, 16)
    q(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_conv_with_string_padding_is_refused():
    with pytest.raises(DMQuantError, match="padding='same'"):
        QuantConv2d.wrap(nn.Conv2d(4, 4, 3, padding="same"), lambda: WeightQuantizer(8), None)


def test_attention_processors_match_diffusers():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx)
        attn.dmq_quant = attention_quantizers(AttentionQuantConfig(bits=8, probs_bits=8), None, None)()
        attn.set_processor(QuantAttention(attn.processor))
        assert torch.allclose(attn(x, encoder_hidden_states=ctx), ref, atol=1e-5)  # quantizers off: exact math
        assert attn.processor.routed == 1  # the classic processor's SDPA call went through dmquant
        out8 = _calibrated_output(attn, 8, x, ctx)
        assert 30.0 < sqnr_db(ref, out8) < 60.0
        assert sqnr_db(ref, _calibrated_output(attn, 4, x, ctx)) < sqnr_db(ref, out8) - 10.0


def _calibrated_output(attn, bits: int, x, ctx):
    """The attention's output with fresh ``bits``-bit Q/K/V/probability quantizers calibrated on ``x``."""
    attn.dmq_quant = attention_quantizers(AttentionQuantConfig(bits=bits, probs_bits=bits), None, None)()
    for q in attn.dmq_quant.quantizers():
        q.set_mode("observe")
    attn(x, encoder_hidden_states=ctx)
    for q in attn.dmq_quant.quantizers():
        q.finalize()
        q.set_mode("quant")
    return attn(x, encoder_hidden_states=ctx)
