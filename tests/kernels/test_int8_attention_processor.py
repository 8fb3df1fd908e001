import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from dmquant.nn.attention import QuantAttention, key_bias_from_mask  # noqa: E402


def Int8AttnProcessor(backend="auto"):  # noqa: N802
    return QuantAttention(AttnProcessor2_0(), kernel="int8", backend=backend)


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _run(attn, processor, *args, **kwargs):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(*args, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_self_attention_on_feature_map(backend):
    torch.manual_seed(0)
    attn = Attention(query_dim=80, heads=2, dim_head=40, residual_connection=True).eval()
    x = torch.randn(2, 80, 10, 13)  # a UNet feature map, 130 tokens
    expected = _run(attn, AttnProcessor2_0(), x)
    got = _run(attn, Int8AttnProcessor(backend=backend), x)
    assert got.shape == expected.shape
    assert _cos(got - x, expected - x) >= 0.999


def test_cross_attention_with_key_padding_mask():
    torch.manual_seed(1)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32).eval()
    x, context = torch.randn(2, 70, 64), torch.randn(2, 20, 32)
    keep = torch.ones(2, 20)
    keep[1, 12:] = 0
    mask = ((1 - keep) * -10000.0)[:, None, :]  # how PixArt passes its text mask
    expected = _run(attn, AttnProcessor2_0(), x, encoder_hidden_states=context, attention_mask=mask)
    got = _run(attn, Int8AttnProcessor(backend="triton"), x, encoder_hidden_states=context, attention_mask=mask)
    assert _cos(got, expected) >= 0.999


def test_key_bias_from_mask_rejects_per_query_masks():
    assert key_bias_from_mask(torch.zeros(2, 3, 5, 7), 2, 7) is None
    keep = torch.tensor([[True, False, True]])
    bias = key_bias_from_mask(keep[:, None, None, :].expand(1, 4, 1, 3), 1, 3)
    assert bias.tolist() == [[0.0, float("-inf"), 0.0]]


def test_set_attention_gives_the_int8_kernel_or_fake_quant_processor():
    from dmquant.config import AttentionQuantConfig
    from dmquant.nn.wrap import attention_modules, attention_quantizers, set_attention

    model = torch.nn.ModuleList([Attention(query_dim=32, heads=1, dim_head=32),
                                 Attention(query_dim=32, heads=1, dim_head=32)])
    assert [name for name, _ in attention_modules(model)] == ["0", "1"]
    set_attention(model[0], "int8", None)
    quantizers = attention_quantizers(AttentionQuantConfig(bits=8, probs_bits=None), None, None)()
    set_attention(model[1], "fake-quant", quantizers)
    assert model[0].processor.kernel == "int8" and not hasattr(model[0], "dmq_quant")
    assert model[1].processor.kernel == "fake-quant" and model[1].dmq_quant is quantizers
    assert all(isinstance(m.processor.processor, AttnProcessor2_0) for m in model)  # diffusers' own, wrapped
    assert quantizers.probs is None and len(quantizers.quantizers()) == 3
    x = torch.randn(1, 70, 32)
    with torch.no_grad():
        expected = _run(model[0], AttnProcessor2_0(), x)
        model[0].set_processor(Int8AttnProcessor())
        assert _cos(model[0](x), expected) >= 0.999
        assert torch.allclose(model[1](x), _run(model[1], AttnProcessor2_0(), x), atol=1e-5)  # quantizers off
