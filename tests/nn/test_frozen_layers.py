"""``freeze()`` switches a layer to integer storage: on the reference backend it computes the simulation's
outputs bit for bit (same float arithmetic); on the oneDNN int8 backend the same integers, float rounding
apart. ``spec()`` and ``layer_from_spec`` rebuild a frozen layer from its description and state dict."""

import json
import math

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, TimeConditioningConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.kernels import cpu_int8
from dmquant.nn import backends
from dmquant.nn.layers import QuantConv2d, QuantLinear, layer_from_spec
from dmquant.nn.outlier import OutlierBranch
from dmquant.nn.wrap import input_quantizers, set_activation_mode, weight_quantizers
from dmquant.quantizers.affine import sqnr_db
from dmquant.quantizers.timetable import TimeTable

RECIPES = {
    "w8a8": (WeightQuantConfig(bits=8), ActQuantConfig(bits=8)),
    "w4a8": (WeightQuantConfig(bits=4, method="mse"), ActQuantConfig(bits=8, method="mse")),
    "w8a8-signed": (WeightQuantConfig(bits=8), ActQuantConfig(bits=8, symmetric=True)),
    "w4a6": (WeightQuantConfig(bits=4), ActQuantConfig(bits=6)),
    "w4a16-group": (WeightQuantConfig(bits=4, granularity="group", group_size=16), None),
    "w8a8-token": (WeightQuantConfig(bits=8), ActQuantConfig(bits=8, granularity="token")),
    "w8a8-asym-weights": (WeightQuantConfig(bits=8, symmetric=False), ActQuantConfig(bits=8)),
}


def wrapped(layer, wcfg, acfg, table=None):
    cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
    time = None if table is None else TimeConditioningConfig()
    return cls.wrap(layer, weight_quantizers(wcfg), input_quantizers(acfg, table, time))


def calibrate(q, *xs):
    """Weights, then activation ranges observed on ``xs``; the layer is left in the quant state."""
    q.calibrate_weight()
    set_activation_mode(q, "observe")
    with torch.no_grad():
        for x in xs:
            q(x)
    for a in q.input_quantizers:
        a.finalize()
    set_activation_mode(q, "quant")
    return q


def outputs(layer, x, backend):
    layer.backend = backend
    with torch.no_grad():
        return layer(x)


def check_frozen(sim, x, integer_path, auto_name=None):
    """The frozen copy equals the simulation bit for bit on the reference backend; ``auto`` picks oneDNN
    exactly when the layer has an integer path (or ``auto_name``), and stays within float rounding of the
    simulation."""
    expected = outputs(sim, x, "auto")
    frozen = sim.frozen_copy()
    frozen.prepare_kernels()
    assert frozen.frozen and not sim.frozen and sim.weight is not None  # the copy, not the layer, froze
    assert torch.equal(outputs(frozen, x, "reference"), expected)
    frozen.backend = "auto"
    assert backends.choose(frozen, x).name == (auto_name or ("onednn-int8" if integer_path else "reference"))
    assert ("onednn-int8" in frozen.kernels) == integer_path
    out = outputs(frozen, x, "auto")
    assert sqnr_db(expected, out) > 60.0
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    return frozen


def inputs(kind, channels):
    return torch.randn(3, 20, channels) if kind == "linear" else torch.randn(2, channels, 8, 8)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_frozen_layer_matches_simulation(recipe, kind):
    torch.manual_seed(0)
    wcfg, acfg = RECIPES[recipe]
    layer = nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    x = inputs(kind, layer.weight.shape[1])
    sim = calibrate(wrapped(layer, wcfg, acfg), x)
    integer_path = (acfg is not None and acfg.static and wcfg.symmetric and wcfg.granularity != "group"
                    and cpu_int8.onednn_available())
    per_token_int8 = (kind == "linear" and acfg is not None and acfg.granularity == "token" and acfg.bits == 8
                      and wcfg.bits == 8 and wcfg.symmetric and wcfg.granularity == "channel")
    frozen = check_frozen(sim, x, integer_path, "cpu-int8-token" if per_token_int8 else None)
    storage_bits = wcfg.bits  # int8, two int4 codes per byte, or 2/3/5/6/7-bit codes packed densely
    qw = frozen.qweights[0]
    qparams = qw.scale.numel() + (0 if qw.zero_point is None else qw.zero_point.numel())
    assert frozen.weight_nbytes() == layer.weight.numel() * storage_bits // 8 + qparams * 4
    assert qw.packing == {4: "int4x2", 8: "int8"}.get(wcfg.bits, "bitpack")


def test_freeze_drops_calibration_state_in_place():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(8, 32)
    q = calibrate(wrapped(layer, WeightQuantConfig(bits=8), ActQuantConfig(bits=8)), x)
    with pytest.raises(DMQuantError, match="only a frozen layer"):
        q.spec()
    expected = outputs(q, x, "reference")
    assert q.freeze() is q and q.freeze() is q  # idempotent
    assert q.frozen and q.weight is None and len(q.weight_quantizers) == 0 and q.qdq_weight is None
    assert q.input_quantizers[0].mode == "quant" and q.input_quantizers[0].observers == []
    assert not q.bias.requires_grad and q.bias is not layer.bias
    assert "weight" not in q.state_dict() and "qweights.0.qdata" in q.state_dict()
    assert torch.equal(outputs(q, x, "reference"), expected)


def test_uncalibrated_activations_cannot_freeze():
    q = wrapped(nn.Linear(8, 4), WeightQuantConfig(bits=8), ActQuantConfig(bits=8))
    q.calibrate_weight()
    with pytest.raises(DMQuantError, match="has no range"):
        q.freeze()


@pytest.mark.parametrize("parts", ["weights", "activations", "both"])
def test_frozen_split_layer_matches_simulation(parts):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.cat([torch.randn(2, 6, 6, 6) * 5, torch.randn(2, 10, 6, 6) * 0.1], dim=1)
    wcfg, acfg = WeightQuantConfig(bits=4), ActQuantConfig(bits=8)
    q = wrapped(conv, wcfg, acfg)
    q.split_quantizers(6, weight_quantizers(wcfg) if parts != "activations" else None,
                       input_quantizers(acfg, None, None) if parts != "weights" else None)
    calibrate(q, x)
    assert len(q.weight_quantizers) == (1 if parts == "activations" else 2)
    assert len(q.input_quantizers) == (1 if parts == "weights" else 2)
    frozen = check_frozen(q, x, cpu_int8.onednn_available())
    assert len(frozen.qweights) == 2 and [w.shape[1] for w in frozen.qweights] == [6, 10]
    assert frozen.spec()["split"] == 6


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_frozen_outlier_layer_matches_simulation(kind):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    channels = layer.weight.shape[1]
    x = inputs(kind, channels)
    q = wrapped(layer, WeightQuantConfig(bits=4), ActQuantConfig(bits=8))
    branch = OutlierBranch(channels, layer.weight.shape[0], q.branch_geometry(), smooth=True, rotation_seed=1,
                           rank=4)
    branch.smooth.copy_(torch.rand(channels) + 0.5)
    q.attach_outlier_branch(branch, layer.weight)
    calibrate(q, x)
    frozen = check_frozen(q, x, cpu_int8.onednn_available())
    assert frozen.spec()["outlier"] == branch.spec()


def test_frozen_layer_with_a_time_table_uses_the_current_timestep():
    torch.manual_seed(0)
    table = TimeTable([801.0, 401.0, 1.0])
    conv = nn.Conv2d(8, 8, 3, padding=1)
    q = wrapped(conv, WeightQuantConfig(bits=8), ActQuantConfig(bits=8), table)
    q.calibrate_weight()
    set_activation_mode(q, "observe")
    xs = {801.0: torch.randn(1, 8, 6, 6) * 8, 401.0: torch.randn(1, 8, 6, 6) * 2, 1.0: torch.randn(1, 8, 6, 6)}
    with torch.no_grad():
        for t, x in xs.items():
            table.set_timestep(t)
            q(x)
    q.input_quantizers[0].finalize()
    set_activation_mode(q, "quant")
    assert q.input_quantizers[0].scale.shape == (3,)
    frozen = q.frozen_copy()
    frozen.prepare_kernels()
    for t, x in xs.items():
        table.set_timestep(t)
        expected = outputs(q, x, "auto")
        assert torch.equal(outputs(frozen, x, "reference"), expected)
        assert sqnr_db(expected, outputs(frozen, x, "auto")) > 60.0
    if cpu_int8.onednn_available():
        assert len(frozen.kernels["onednn-int8"][0]) == 3  # one packed conv per table entry


def test_learned_rounding_is_frozen_as_its_codes():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(8, 32)
    q = wrapped(layer, WeightQuantConfig(bits=4), None)
    q.calibrate_weight()
    wq = q.weight_quantizers[0]
    nearest = wq.codes(layer.weight)
    v = wq.start_rounding(layer.weight)
    with torch.no_grad():
        v.copy_(torch.randn_like(v) * 3)
    wq.harden_rounding(layer.weight)
    q.refresh_weight()
    assert not torch.equal(wq.codes(layer.weight), nearest)
    frozen = check_frozen(q, x, integer_path=False)
    assert torch.equal(frozen.qweights[0].int8(), wq.codes(layer.weight))


@pytest.mark.parametrize("case", ["linear", "conv-split", "outlier", "time", "token"])
def test_spec_and_state_dict_rebuild_the_frozen_layer(case):
    torch.manual_seed(0)
    table = TimeTable([500.0, 1.0]) if case == "time" else None
    acfg = ActQuantConfig(bits=8, granularity="token") if case == "token" else ActQuantConfig(bits=8)
    layer = nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect") if case == "conv-split" else nn.Linear(64, 32)
    x = inputs("conv" if case == "conv-split" else "linear", layer.weight.shape[1])
    q = wrapped(layer, WeightQuantConfig(bits=4, symmetric=case != "outlier"), acfg, table)
    if case == "conv-split":
        q.split_quantizers(6, weight_quantizers(WeightQuantConfig(bits=4)), input_quantizers(acfg, None, None))
    if case == "outlier":
        branch = OutlierBranch(64, 32, smooth=True, rotation_seed=2, rank=8)
        branch.smooth.copy_(torch.rand(64) + 0.5)
        q.attach_outlier_branch(branch, layer.weight)
    if table is not None:
        table.set_timestep(500)
    calibrate(q, x)
    frozen = q.frozen_copy()
    frozen.prepare_kernels()
    spec = json.loads(json.dumps(frozen.spec()))  # it is plain JSON
    rebuilt = layer_from_spec(spec, table)
    assert all(t.is_meta for t in rebuilt.state_dict().values())
    rebuilt.load_state_dict(frozen.state_dict(), strict=True, assign=True)
    rebuilt.prepare_kernels()
    assert rebuilt.spec() == frozen.spec()
    assert rebuilt.weight_nbytes() == frozen.weight_nbytes()
    for backend in ("reference", "auto"):
        assert torch.equal(outputs(rebuilt, x, backend), outputs(frozen, x, backend))
    assert backends.choose(rebuilt, x).name == backends.choose(frozen, x).name


def test_unknown_layer_kind_and_damaged_specs_are_clear_errors():
    with pytest.raises(DMQuantError, match="unknown layer kind 'lstm'"):
        layer_from_spec({"kind": "lstm"}, None)
    torch.manual_seed(0)
    q = calibrate(wrapped(nn.Linear(8, 4), WeightQuantConfig(bits=8), ActQuantConfig(bits=8)), torch.randn(2, 8))
    spec = q.frozen_copy().spec()
    del spec["weights"][0]["packing"]
    with pytest.raises(DMQuantError, match="lacks \\['packing'\\]"):
        layer_from_spec(spec, None)
    spec = wrapped(nn.Linear(8, 4), WeightQuantConfig(bits=8), ActQuantConfig(bits=8), TimeTable([1.0]))
    spec.calibrate_weight()
    spec.input_quantizers[0].scale = torch.ones(1)
    spec.input_quantizers[0].zero_point = torch.zeros(1)
    with pytest.raises(DMQuantError, match="no timestep keys"):
        layer_from_spec(spec.frozen_copy().spec(), None)


@pytest.mark.parametrize("case", ["linear", "conv", "split-conv", "int4-group-linear", "grouped-conv"])
def test_frozen_layer_computes_in_slices_of_output_channels(monkeypatch, case):
    """On the CPU a frozen layer whose weight exceeds ``DEQUANT_CHUNK`` values dequantizes and computes a slice of
    output channels at a time (so the float weight is never a fresh allocation of the whole): the same result."""
    from dmquant.nn import layers

    torch.manual_seed(0)
    wcfg = WeightQuantConfig(bits=4, granularity="group", group_size=16) if case.startswith("int4") else \
        WeightQuantConfig(bits=8)
    layer = nn.Linear(64, 40) if "linear" in case else nn.Conv2d(16, 24, 3, padding=1,
                                                                 groups=2 if case == "grouped-conv" else 1)
    x = inputs("linear" if "linear" in case else "conv", 64 if "linear" in case else 16)
    sim = wrapped(layer, wcfg, None)
    if case == "split-conv":
        sim.split_quantizers(6, weight_quantizers(wcfg), None)
    frozen = calibrate(sim, x).frozen_copy()
    whole = outputs(frozen, x, "reference")
    per_row = sum(math.prod(q.shape[1:]) for q in frozen.qweights)
    monkeypatch.setattr(layers, "DEQUANT_CHUNK", per_row * 7)  # slices of 7 output channels, the last one shorter
    assert frozen._rows_per_chunk(x) == (0 if case == "grouped-conv" else 7)
    calls, op = [], type(frozen).op
    monkeypatch.setattr(type(frozen), "op", lambda self, x, w, b: calls.append(w.shape[0]) or op(self, x, w, b))
    sliced = outputs(frozen, x, "reference")
    assert calls == ([24] if case == "grouped-conv" else [7] * (layer.weight.shape[0] // 7) + [layer.weight.shape[0] % 7])
    assert sliced.shape == whole.shape and sqnr_db(whole, sliced) > 120.0
    assert frozen._rows_per_chunk(x.to("meta")) == 0  # not on other devices (nor under torch.compile)
