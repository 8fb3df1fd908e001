"""The backend registry: the first backend whose ``supports`` holds computes a call, in registry order;
``layer.backend`` forces one by name; backends with a ``prepare`` step are prepared when a layer freezes."""

import pytest
import torch
from torch import nn

from dmquant.config import ActQuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.kernels import cpu_int8
from dmquant.nn import backend_registry, backends
from dmquant.nn.layers import QuantConv2d, QuantLinear
from dmquant.nn.wrap import input_quantizers, set_activation_mode, weight_quantizers
from dmquant.quantizers.affine import sqnr_db

ONEDNN = pytest.mark.skipif(not cpu_int8.onednn_available(), reason="PyTorch's x86 oneDNN engine is missing")


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry for tests that register backends."""
    monkeypatch.setattr(backend_registry, "_REGISTRY", list(backend_registry._REGISTRY))
    return backends


W8, A8 = WeightQuantConfig(bits=8), ActQuantConfig(bits=8)


def calibrated(layer, wcfg=W8, acfg=A8, x=None):
    cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
    q = cls.wrap(layer, weight_quantizers(wcfg), input_quantizers(acfg, None, None))
    q.calibrate_weight()
    set_activation_mode(q, "observe")
    with torch.no_grad():
        q(x)
    for a in q.input_quantizers:
        a.finalize()
    set_activation_mode(q, "quant")
    return q


def linear_case():
    torch.manual_seed(0)
    x = torch.randn(4, 12, 32)
    return calibrated(nn.Linear(32, 16), x=x), x


def run(layer, x, backend):
    layer.backend = backend
    with torch.no_grad():
        return layer(x)


def test_registry_order():
    names = backends.names()
    assert names[-3:] == ["fused-int4", "onednn-int8", "reference"]  # the CPU paths, then the fallback
    assert "cuda-int8" in names and len(set(names)) == len(names)


@ONEDNN
def test_auto_takes_the_first_supporting_backend_and_a_name_forces_one():
    sim, x = linear_case()
    assert backends.choose(sim, x).name == "reference"  # a simulated layer has no integer weights
    frozen = sim.frozen_copy()
    frozen.prepare_kernels()
    assert set(frozen.kernels) == {"onednn-int8", "cuda-int8"}  # both could run it (CPU / CUDA)
    assert backends.choose(frozen, x).name == "onednn-int8"
    reference = run(frozen, x, "reference")
    assert backends.choose(frozen, x).name == "reference"
    assert torch.equal(reference, run(sim, x, "auto"))
    integer = run(frozen, x, "onednn-int8")
    assert not torch.equal(integer, reference) and torch.allclose(integer, reference, atol=1e-4)
    assert torch.equal(run(frozen, x, "auto"), integer)


@ONEDNN
def test_a_forced_backend_runs_even_where_auto_would_not_choose_it():
    sim, x = linear_case()
    frozen = sim.frozen_copy()  # not prepared
    with pytest.raises(DMQuantError, match="call prepare_kernels"):
        run(frozen, x, "onednn-int8")
    with pytest.raises(DMQuantError, match="'fused-int4' cannot compute this layer"):
        run(frozen, x, "fused-int4")


def test_unknown_backend_name_is_a_clear_error():
    sim, x = linear_case()
    with pytest.raises(DMQuantError, match="unknown backend 'cuda-magic': use 'auto' or one of .*fused-int4, "
                                           "onednn-int8, reference"):
        run(sim, x, "cuda-magic")


@pytest.mark.parametrize("case", ["dynamic", "group", "asymmetric", "reflect", "unquantized-input"])
def test_onednn_takes_only_static_inputs_and_per_channel_symmetric_weights(case):
    torch.manual_seed(0)
    acfg = {"dynamic": ActQuantConfig(bits=8, granularity="token"), "unquantized-input": None}.get(case, A8)
    wcfg = {"group": WeightQuantConfig(bits=4, granularity="group", group_size=16),
            "asymmetric": WeightQuantConfig(bits=8, symmetric=False)}.get(case, W8)
    if case == "reflect":
        layer, x = nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"), torch.randn(1, 16, 6, 6)
    else:
        layer, x = nn.Linear(32, 16), torch.randn(4, 32)
    frozen = calibrated(layer, wcfg, acfg, x).freeze()
    assert "onednn-int8" not in frozen.kernels
    # per-token inputs of a linear layer take torch._int_mm (cpu-int8-token); the others the reference path
    assert backends.choose(frozen, x).name == ("cpu-int8-token" if case == "dynamic" else "reference")


@ONEDNN
@pytest.mark.parametrize("kind", ["conv", "linear", "conv-symmetric"])
def test_onednn_runs_inputs_quantized_per_sample_with_each_samples_own_range(kind):
    """``granularity: sample`` (dynamic, one range per batch element): oneDNN computes it with one call per
    sample and that sample's scale and zero point, and matches the simulation (the same codes, integer sums)."""
    torch.manual_seed(0)
    acfg = ActQuantConfig(bits=8, granularity="sample", symmetric=kind.endswith("symmetric"))
    if kind == "linear":
        layer, x = nn.Linear(32, 16), torch.randn(3, 12, 32)
    else:
        layer, x = nn.Conv2d(16, 8, 3, padding=1), torch.randn(3, 16, 6, 6)
    x[1] *= 20.0  # the samples' ranges differ 20x: one range for the batch would zero most of sample 0's codes
    x[2] = x[2].abs()  # a non-negative sample: asymmetric grids use all their levels on it
    sim = calibrated(layer, W8, acfg, x)
    frozen = sim.frozen_copy()
    frozen.prepare_kernels()
    assert "onednn-int8" in frozen.kernels and backends.choose(frozen, x).name == "onednn-int8"
    with torch.no_grad():
        simulated, integer, reference = sim(x), run(frozen, x, "onednn-int8"), run(frozen, x, "reference")
        exact = layer(x)
    assert torch.equal(simulated, reference)
    for b in range(3):  # each sample within float rounding of the simulation, and quantized (not exact)
        scale = float(simulated[b].abs().max())
        assert float((integer[b] - simulated[b]).abs().max()) < 1e-5 * scale
        assert 30.0 < float(sqnr_db(exact[b], integer[b])) < 70.0


def test_registered_backends_go_ahead_of_reference_or_before_a_named_one(registry):
    sim, x = linear_case()
    calls = []

    def record(name):
        return backends.Backend(name, lambda layer, x: True, lambda layer, x: calls.append(name) or x,
                                prepare=lambda layer: name + "-prepared")

    registry.register(record("mine"))
    assert registry.names()[-4:] == ["fused-int4", "onednn-int8", "mine", "reference"]
    head = registry.names()[0]
    registry.register(record("first"), before=head)
    assert registry.names()[:2] == ["first", head]
    with pytest.raises(DMQuantError, match="a backend named 'mine' is registered already"):
        registry.register(record("mine"))
    assert torch.equal(run(sim, x, "auto"), x) and calls == ["first"]
    assert torch.equal(run(sim, x, "mine"), x) and calls == ["first", "mine"]
    frozen = sim.frozen_copy()
    frozen.prepare_kernels()
    assert frozen.kernels["mine"] == "mine-prepared" and frozen.kernels["first"] == "first-prepared"
