import torch
import torch.nn.functional as F
from torch import nn

from dmquant.config import ActQuantConfig, AttentionQuantConfig, WeightQuantConfig
from dmquant.nn.attention import AttentionQuantizers, QuantAttnProcessor, SDPAProcessor
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.quantizers.affine import sqnr_db


def test_quant_linear_matches_reference_math():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    q = QuantLinear(layer, WeightQuantConfig(bits=4), ActQuantConfig(bits=8, granularity="token"))
    q.calibrate_weight()
    q.set_act_mode("quant")
    x = torch.randn(5, 64)
    expected = F.linear(q.input_quantizer(x), q.weight_quantizer(layer.weight), layer.bias)
    assert torch.equal(q(x), expected)
    assert 14.0 < sqnr_db(layer(x), q(x)) < 30.0  # 4-bit weights: a real, bounded error


def test_quant_conv_keeps_geometry_and_is_accurate_at_8_bits():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    q = QuantConv2d(conv, WeightQuantConfig(bits=8), None)
    q.calibrate_weight()
    x = torch.randn(2, 8, 9, 9)
    assert q(x).shape == conv(x).shape == (2, 16, 5, 5)
    assert sqnr_db(conv(x), q(x)) > 38.0


def test_attention_processors_match_diffusers():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    attn.set_processor(AttnProcessor2_0())
    ref = attn(x, encoder_hidden_states=ctx)
    attn.set_processor(SDPAProcessor())
    assert torch.allclose(attn(x, encoder_hidden_states=ctx), ref, atol=1e-6)
    attn.dmq_quant = AttentionQuantizers(AttentionQuantConfig(bits=8, probs_bits=8))
    attn.set_processor(QuantAttnProcessor())
    assert torch.allclose(attn(x, encoder_hidden_states=ctx), ref, atol=1e-5)  # quantizers off: exact math
    for q in attn.dmq_quant.quantizers():
        q.set_mode("observe")
    attn(x, encoder_hidden_states=ctx)
    for q in attn.dmq_quant.quantizers():
        q.finalize()
        q.set_mode("quant")
    out8 = attn(x, encoder_hidden_states=ctx)
    assert 30.0 < sqnr_db(ref, out8) < 60.0
    attn.dmq_quant = AttentionQuantizers(AttentionQuantConfig(bits=4, probs_bits=4))
    for q in attn.dmq_quant.quantizers():
        q.set_mode("observe")
    attn(x, encoder_hidden_states=ctx)
    for q in attn.dmq_quant.quantizers():
        q.finalize()
        q.set_mode("quant")
    assert sqnr_db(ref, attn(x, encoder_hidden_states=ctx)) < sqnr_db(ref, out8) - 10.0
