"""The float8 e4m3 format: codes are exactly the cast to ``torch.float8_e4m3fn``, the quantizers and the
frozen weight agree with it bit for bit, the config checks it, and a saved model round-trips F8_E4M3."""

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, QuantConfig, WeightQuantConfig, load_recipe
from dmquant.errors import DMQuantError
from dmquant.formats import FloatFormat, format_named
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.quantizers.activation import ActQuantizer
from dmquant.quantizers.affine import fake_quant, qparams_from_range, quantize, sqnr_db
from dmquant.quantizers.qtensor import QuantizedTensor
from dmquant.quantizers.weight import WeightQuantizer

FP8 = FloatFormat("e4m3")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cast(x, scale):
    """The definition: ``float8(clamp(x / s, -448, 448))`` with the division in float32."""
    return (x.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)


def test_the_format_is_e4m3():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = every[torch.isfinite(every)]
    assert (FP8.max, FP8.bits, FP8.dtype) == (float(finite.max()), 8, torch.float8_e4m3fn) == (448.0, 8, FP8.dtype)
    assert FP8.levels == torch.unique(finite).numel() == 253
    with pytest.raises(DMQuantError, match="use one of e4m3"):
        FloatFormat("e5m2x")
    with pytest.raises(DMQuantError, match="set bits=8"):
        format_named("fp8_e4m3", bits=4)
    with pytest.raises(DMQuantError, match="use one of int, fp8_e4m3"):
        format_named("fp4")


@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_are_the_cast_and_grid_values_are_kept(dtype):
    torch.manual_seed(0)
    x = (torch.randn(8, 64) * torch.logspace(-3, 2, 8)[:, None]).to(dtype)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    scale, zero = qparams_from_range(lo, hi, FP8, True)
    assert scale.dtype == torch.float32 and not zero.any()
    assert torch.equal(scale, x.float().abs().amax(dim=1) / 448)
    codes = quantize(x, scale[:, None], zero[:, None], FP8)
    assert codes.dtype == dtype and torch.equal(codes, cast(x, scale[:, None]).to(dtype))
    fq = fake_quant(x, scale[:, None], zero[:, None], FP8)
    assert torch.equal(fq, (cast(x, scale[:, None]).float() * scale[:, None]).to(dtype))
    assert torch.equal(fake_quant(fq, scale[:, None], zero[:, None], FP8), fq)  # on the grid: unchanged
    # the row maximum maps to 448 exactly; beyond the range clamps
    assert torch.equal(cast(x, scale[:, None]).float().abs().amax(dim=1), torch.full((8,), 448.0))
    one = torch.ones(())
    assert float(fake_quant(torch.tensor([1000.0]), one, 0 * one, FP8)) == 448.0


def test_straight_through_gradient():
    x = torch.tensor([0.3, -1.7, 500.0, -600.0], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    y = fake_quant(x, scale, torch.zeros(()), FP8)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.tensor([0.3, -1.75, 448.0, -448.0]).to(torch.float8_e4m3fn).float())
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # through the cast inside the range, zero where clamped
    # LSQ: d/ds of code(x/s) * s is code - x/s inside the range, +-448 where clamped (which cancel here)
    assert scale.grad.item() == pytest.approx((y[0] - 0.3).item() + (y[1] + 1.7).item() + 448 - 448, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_quantizer_per_channel(dtype):
    torch.manual_seed(1)
    w = (torch.randn(32, 64) * torch.rand(32, 1) * 3).to(dtype)
    q = WeightQuantizer(8, True, "channel", number_format="fp8_e4m3")
    q.calibrate(w)
    expected_scale = (w.float().abs().amax(dim=1) / 448).to(dtype)
    assert torch.equal(q.scale, expected_scale)
    codes = q.codes(w)
    assert codes.dtype == torch.float8_e4m3fn and torch.equal(codes.view(torch.uint8),
                                                             cast(w, q.scale[:, None]).view(torch.uint8))
    assert torch.equal(q(w), codes.to(dtype) * q.scale[:, None])
    assert sqnr_db(w.float(), q(w).float()) > 30.0  # e4m3: 3 mantissa bits, ~31 dB on Gaussian weights
    with pytest.raises(DMQuantError, match="AdaRound"):
        q.start_rounding(w)
    with pytest.raises(DMQuantError, match="symmetric"):
        WeightQuantizer(8, False, number_format="fp8_e4m3")


def test_activation_quantizer_token_and_tensor():
    torch.manual_seed(2)
    x = torch.randn(2, 10, 64) * torch.logspace(-2, 1, 10)[None, :, None]
    dynamic = ActQuantizer(8, symmetric=True, granularity="token", number_format="fp8_e4m3")
    dynamic.set_mode("quant")
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    assert torch.equal(dynamic(x), cast(x, scale).float() * scale)
    assert sqnr_db(x, dynamic(x)) > 30.0
    static = ActQuantizer(8, symmetric=True, granularity="tensor", number_format="fp8_e4m3")
    static.set_mode("observe")
    static(x)
    static.finalize()
    static.set_mode("quant")
    assert torch.equal(static.scale, x.abs().amax() / 448) and static.scale.dtype == torch.float32
    assert torch.equal(static(x), cast(x, static.scale).float() * static.scale)
    # one scale for every token, yet tokens 1000x smaller than the largest keep their precision: the float
    # grid's exponent covers them (an int8 grid would leave them a few levels)
    assert sqnr_db(x[:, :2], static(x)[:, :2]) > 30.0
    spec = static.spec()
    assert spec["format"] == "fp8_e4m3" and ActQuantizer.from_spec(spec, None).fmt == FP8
    assert ActQuantizer.from_spec({k: v for k, v in spec.items() if k != "format"}, None).number_format == "int"


def test_config_format_sections_and_errors():
    c = QuantConfig.from_dict({"weights": {"format": "fp8_e4m3", "granularity": "channel"},
                               "activations": {"format": "fp8_e4m3", "granularity": "token"}})
    assert c.activations.symmetric is True and c.weights.format == "fp8_e4m3" and c.tag == "W8A8-FP8"
    assert ActQuantConfig().symmetric is False and QuantConfig().tag == "W8A8"  # int defaults unchanged
    assert QuantConfig.from_dict(c.to_dict()) == c
    recipe = load_recipe("w8a8-fp8")
    assert recipe.weights.format == recipe.activations.format == "fp8_e4m3" and recipe.description
    bad = [({"weights": {"format": "fp8_e4m3", "bits": 4}}, "set weights.bits=8"),
           ({"weights": {"format": "fp8_e4m3", "symmetric": False}}, "set weights.symmetric=true"),
           ({"activations": {"format": "fp8_e4m3", "symmetric": False}}, "set activations.symmetric=true"),
           ({"weights": {"format": "fp8"}}, "weights.format='fp8' is not known: use one of int, fp8_e4m3"),
           ({"activations": {"format": "fp8_e4m3"}}, "give both the same format"),
           ({"weights": {"format": "fp8_e4m3"}, "activations": {"format": "fp8_e4m3"},
             "reconstruction": {}}, "drop 'reconstruction'")]
    for data, message in bad:
        with pytest.raises(DMQuantError, match=message) as err:
            QuantConfig.from_dict(data)
        assert "\n" not in str(err.value)
    with pytest.raises(DMQuantError, match="bits=8"):
        WeightQuantConfig(bits=4, format="fp8_e4m3")


def make_layer(kind, dtype, granularity="token"):
    torch.manual_seed(3)
    float_layer = (nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 32, 3, padding=1)).to(dtype)
    cls = QuantLinear if kind == "linear" else QuantConv2d
    layer = cls.wrap(float_layer, lambda: WeightQuantizer(8, True, "channel", number_format="fp8_e4m3"),
                     lambda cd: ActQuantizer(8, symmetric=True, granularity=granularity, channel_dim=cd,
                                             number_format="fp8_e4m3"))
    layer.calibrate_weight()
    x = (torch.randn(3, 7, 64) if kind == "linear" else torch.randn(2, 16, 6, 6)).to(dtype)
    a = layer.input_quantizers[0]
    if a.static:
        a.set_mode("observe")
        layer(x)
        a.finalize()
    a.set_mode("quant")
    return float_layer, layer, x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, granularity", [("linear", "token"), ("linear", "tensor"), ("conv2d", "tensor")])
def test_frozen_layer_is_the_simulation_bit_for_bit(kind, granularity, dtype):
    float_layer, layer, x = make_layer(kind, dtype, granularity)
    simulated = layer(x)
    frozen = layer.frozen_copy()
    qw = frozen.qweights[0]
    assert qw.packing == "fp8_e4m3" and qw.qdata.dtype == torch.float8_e4m3fn and qw.spec()["packing"] == "fp8_e4m3"
    assert not qw.per_channel_symmetric and qw.float8_per_channel  # the integer backends do not take it
    assert torch.equal(qw.dequantize(dtype), layer.effective_weight(dtype))
    with torch.no_grad():
        assert torch.equal(frozen(x), simulated)  # CPU: the reference backend
        assert sqnr_db(float_layer(x).float(), simulated.float()) > 25.0
    frozen.prepare_kernels()
    assert set(frozen.kernels) == ({"cuda-fp8"} if kind == "linear" else set())
    assert qw.nbytes() == qw.qdata.numel() + 4 * qw.scale.numel()
    with pytest.raises(DMQuantError, match="no integer codes"):
        qw.int8()


def test_quantized_tensor_spec_and_dtype_moves():
    _, layer, _ = make_layer("linear", torch.float32)
    qw = layer.frozen_copy().qweights[0]
    empty = QuantizedTensor.from_spec(qw.spec(), device="cpu")
    assert empty.qdata.dtype == torch.float8_e4m3fn and empty.qdata.shape == qw.qdata.shape
    codes = qw.qdata.clone()
    qw.to(torch.float16)  # module.to casts floating buffers; float8 codes are cast back, exactly
    assert qw.qdata.dtype == torch.float8_e4m3fn and torch.equal(qw.qdata.view(torch.uint8), codes.view(torch.uint8))
    assert qw.scale.dtype == torch.float16


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_save_and_load_round_trip_bit_for_bit(tmp_path, granularity):
    from safetensors import safe_open

    import dmquant
    from dmquant.models.tiny import build_tiny_dit_pipeline
    from dmquant.nn.wrap import quant_layers

    recipe = {"weights": {"format": "fp8_e4m3"}, "activations": {"format": "fp8_e4m3", "granularity": granularity},
              "attention": None}
    pipe = build_tiny_dit_pipeline()
    dmquant.quantize(pipe, recipe, prompts=[1, 2, 3], num_inference_steps=4, num_timesteps=2, progress=False)
    pipe.save_pretrained(tmp_path / "q")
    dmquant.freeze(pipe)
    loaded = dmquant.load_quantized_pipeline(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "transformer" / "dmquant_weights.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("qdata")}
    assert dtypes == {"F8_E4M3"}
    before = dict(pipe.transformer.state_dict())
    after = loaded.transformer.state_dict()
    fp8_keys = [k for k, v in before.items() if v.dtype == torch.float8_e4m3fn]
    assert len(fp8_keys) == len(quant_layers(pipe.transformer)) > 5
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in fp8_keys)
    torch.manual_seed(0)
    latents, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        a = pipe.transformer(latents, timestep=t, class_labels=labels).sample
        b = loaded.transformer(latents, timestep=t, class_labels=labels).sample
    assert torch.equal(a, b)
