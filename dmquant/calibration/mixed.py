"""Automatic mixed precision (the recipe's ``mixed_precision`` section): measure, allocate, write the plan.

    candidates   weight formats: each of ``candidate_bits`` at the recipe's granularity, and each of
                 ``group_bits`` with one scale per group of each of ``group_sizes`` input weights (a
                 group size is a candidate of a layer only where it divides the rows of each of its
                 quantized parts and is shorter than them: a group as long as the row is the per-channel
                 format); the formats of ``asymmetric_bits`` also with a zero point per scale
    sensitivity  for each layer the recipe quantizes and each candidate format, the denoiser's output
                 error when only that layer's weight is fake-quantized (all others in full precision), on
                 ``num_samples`` recorded calibration calls spread over the run (every sampled step); the
                 layer's weight is swapped in place, nothing is wrapped. ``measure: sampled`` runs all the
                 calls for one format per layer and ``sampled_calls`` of them for the others (scaled by their
                 ratio to it there); ``anchored`` runs the calls for one format per layer and scales the
                 others by a weight-space proxy (:mod:`dmquant.calibration.proxy`)
    budget       ``target_bits`` per weight, ``max_weight_bytes`` for the whole denoiser, or the bytes of
                 the recipe's uniform ``weights`` format as written (its own scale dtype); costs are the
                 exact bytes the frozen layer will store (codes packed at their bit-width, scales in the
                 candidates' scale dtype, ``mixed_precision.scale_dtype``: one per output channel or per
                 group, both parts of a split layer)
    allocation   :func:`dmquant.calibration.allocation.allocate` minimises the summed sensitivity
    plan         the recipe (its ``weights`` in the candidates' scale dtype) with one ``layers`` override per
                 layer whose format differs from it and no ``mixed_precision`` section: a recipe anyone can
                 rerun without measuring again

Activations keep the recipe's settings (sensitivity is measured with full-precision activations). The
rest of the recipe (split, learned rounding, time tables) applies to every layer as before.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from dmquant.calibration.allocation import allocate, plan_cost, plan_error
from dmquant.calibration.proxy import record_input_moments, weight_proxy
from dmquant.calibration.reconstruct import cfg_paired, reconstruction_error
from dmquant.config import LayerOverrideConfig, MixedPrecisionConfig, QuantConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.models.adapters import DenoiserAdapter
from dmquant.nn.layers import FLOAT_TYPES, split_channels
from dmquant.nn.wrap import layer_kind, selected
from dmquant.quantizers.qtensor import weight_storage_bytes
from dmquant.quantizers.weight import WeightQuantizer

CURVE_BITS = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0)


@dataclass(frozen=True)
class Candidate:
    """One candidate weight format: ``bits`` at the recipe's granularity (``group_size`` None), or ``bits``
    with one scale per ``group_size`` consecutive input weights; ``asymmetric``: with a zero point per scale
    (an unshifted grid of ``2^bits`` levels) where the recipe's weights are symmetric."""

    bits: int
    group_size: int | None = None
    asymmetric: bool = False

    @property
    def label(self) -> str:
        """``"4"`` (the recipe's granularity), ``"3g64"`` (3 bits, groups of 64), ``"3a"`` / ``"3ag64"``
        (the same with zero points)."""
        return f"{self.bits}{'a' if self.asymmetric else ''}" + (f"g{self.group_size}" if self.group_size else "")

    def weights(self, base: WeightQuantConfig) -> WeightQuantConfig:
        c = dataclasses.replace(base, bits=self.bits, symmetric=base.symmetric and not self.asymmetric)
        if self.group_size is None:
            return c
        return dataclasses.replace(c, granularity="group", group_size=self.group_size)

    def override(self, base: WeightQuantConfig) -> dict | None:
        """The layer's ``weights`` override (None when the format is the recipe's own)."""
        c = self.weights(base)
        if c == base:
            return None
        found = {"bits": c.bits}
        if (c.granularity, c.group_size) != (base.granularity, base.group_size):
            found.update(granularity=c.granularity, group_size=c.group_size)
        if c.symmetric != base.symmetric:
            found["symmetric"] = c.symmetric
        return found


def candidate_base(config: QuantConfig) -> WeightQuantConfig:
    """The recipe's ``weights`` with the candidates' scale dtype: what every candidate format varies."""
    mp = config.mixed_precision
    if mp is None or mp.scale_dtype is None:
        return config.weights
    return dataclasses.replace(config.weights, scale_dtype=mp.scale_dtype)


def candidates(mp: MixedPrecisionConfig, base: WeightQuantConfig) -> list[Candidate]:
    """Every candidate format of the section (before checking which fit each layer)."""
    found = [Candidate(b) for b in mp.candidate_bits]
    for g in mp.group_sizes:
        if base.granularity == "group" and base.group_size == g:
            continue  # the recipe's own granularity: its bits are the candidate_bits
        found += [Candidate(b, g) for b in (mp.group_bits or mp.candidate_bits)]
    if base.symmetric:
        found += [dataclasses.replace(c, asymmetric=True) for c in found if c.bits in mp.asymmetric_bits]
    return found


def fits(candidate: Candidate, shape: tuple[int, ...], split: int | None, base: WeightQuantConfig) -> bool:
    """Whether ``candidate`` is a format of a weight of ``shape`` (split at ``split``): its groups divide the
    rows (input features x kernel) of each quantized part and are shorter than them."""
    if candidate.group_size is None:
        return True
    rows = [math.prod(s[1:]) for s in _part_shapes(shape, split)]
    g = candidate.group_size
    if any(r % g for r in rows):
        return False
    return not (base.granularity == "channel" and all(r == g for r in rows))


@dataclass
class LayerSensitivity:
    name: str
    numel: int
    split: int | None
    kind: str | None = None  # "linear" / "conv" (the recipe's ``layers`` patterns may name a kind)
    options: dict[str, tuple[int, float]] = field(default_factory=dict)  # format label -> (bytes, relative error)
    formats: dict[str, Candidate] = field(default_factory=dict)  # format label -> the format
    call_errors: dict[str, list[float]] = field(default_factory=dict)  # format label -> each call's output MSE


@dataclass
class MixedPlan:
    """The chosen plan and what it was chosen from."""

    config: QuantConfig  # the recipe with per-layer overrides, rerunnable
    formats: dict[str, str]  # layer -> format label ("4", "3g64")
    layers: list[LayerSensitivity]
    budget_bytes: int
    fixed_bytes: int  # the denoiser's bytes outside the quantized layers' weights
    seconds_sensitivity: float
    seconds_allocation: float
    calls: int
    weighting: str
    curve: list[dict] = field(default_factory=list)
    uniform: list[dict] = field(default_factory=list)

    @property
    def bits(self) -> dict[str, int]:
        return {layer.name: layer.formats[self.formats[layer.name]].bits for layer in self.layers}

    @property
    def plan_bytes(self) -> int:
        return sum(layer.options[self.formats[layer.name]][0] for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def average_bits(self) -> float:
        return 8 * self.plan_bytes / self.numel

    @property
    def predicted_error(self) -> float:
        return sum(layer.options[self.formats[layer.name]][1] for layer in self.layers)

    def report(self) -> dict:
        """JSON-able summary (saved in run.json under ``calibration.mixed_precision``)."""
        return {
            "budget_bytes": self.budget_bytes, "plan_bytes": self.plan_bytes, "fixed_bytes": self.fixed_bytes,
            "average_bits": round(self.average_bits, 4), "weights": self.numel,
            "predicted_sqnr_db": round(sqnr_db(self.predicted_error), 3),
            "histogram": {f: sum(1 for v in self.formats.values() if v == f)
                          for f in sorted(set(self.formats.values()), key=_format_order)},
            "bits": self.bits, "formats": self.formats, "scale_dtype": self.config.weights.scale_dtype,
            "calls": self.calls, "weighting": self.weighting,
            "seconds_sensitivity": round(self.seconds_sensitivity, 2),
            "seconds_allocation": round(self.seconds_allocation, 2),
            "sensitivity": {layer.name: {f: [c, float(f"{e:.4g}")] for f, (c, e) in layer.options.items()}
                            for layer in self.layers},
            "curve": self.curve, "uniform": self.uniform,
        }


def _format_order(label: str) -> tuple[int, bool, int]:
    bits, asymmetric, group = re.fullmatch(r"(\d+)(a?)(?:g(\d+))?", label).groups()
    return int(bits), bool(asymmetric), -int(group) if group else -10**9


def sqnr_db(relative_error: float) -> float:
    """The predicted signal-to-quantization-noise ratio of a summed relative error."""
    return 10 * math.log10(1 / max(relative_error, 1e-30))


# -- measuring ---------------------------------------------------------------------------------------------
def _parts(weight: torch.Tensor, split: int | None) -> list[torch.Tensor]:
    return [weight] if split is None else list(split_channels(weight, split, 1))


@torch.no_grad()
def fake_quantized_weight(weight: torch.Tensor, c: WeightQuantConfig, split: int | None) -> torch.Tensor:
    """The weight as a layer quantized with ``c`` (round to nearest; one quantizer per split part) computes."""
    parts = []
    for part in _parts(weight, split):
        q = WeightQuantizer(c.bits, c.symmetric, c.granularity, c.group_size, c.method, c.percentile,
                            number_format=c.format, scale_dtype=c.scale_dtype)
        q.calibrate(part)
        parts.append(q(part))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _part_shapes(shape: tuple[int, ...], split: int | None) -> list[tuple[int, ...]]:
    if split is None:
        return [tuple(shape)]
    return [(shape[0], split, *shape[2:]), (shape[0], shape[1] - split, *shape[2:])]


def storage_bytes(shape: tuple[int, ...], c: WeightQuantConfig, split: int | None) -> int:
    """Bytes the frozen layer stores for its weight (one quantized tensor per split part)."""
    return sum(weight_storage_bytes(s, c.bits, c.granularity, c.group_size, c.symmetric, c.scale_dtype)
               for s in _part_shapes(shape, split))


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _output(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise DMQuantError(f"the denoiser returned {type(out).__name__}: mixed precision needs a tensor output")


def spread(calls: Iterable[tuple[tuple, dict]], count: int) -> list[tuple[tuple, dict]]:
    """``count`` calls evenly spaced over all recorded ones (every sampled step and prompt batch)."""
    calls = list(calls)
    if len(calls) <= count:
        return calls
    return [calls[round(i * (len(calls) - 1) / (count - 1))] for i in range(count)] if count > 1 else calls[:1]


TIMED_WEIGHTINGS = ("early", "late")


def call_timesteps(adapter: DenoiserAdapter, calls: list[tuple[tuple, dict]]) -> list[float]:
    """Each call's timestep (the mean of a batch's timesteps)."""
    return [float(torch.as_tensor(adapter.read_timestep(a, k)).double().mean()) for a, k in calls]


def call_weights(weighting: str, powers: list[float], timesteps: list[float]) -> list[float]:
    """How much each call's mean squared output error counts in a layer's sensitivity: ``uniform`` (every
    call alike, the sum relative to the summed output power), ``relative`` (each call relative to its own
    output power, averaged), ``early`` / ``late`` (uniform, times ``t / t_max`` / ``1 - t / t_max``:
    the noisy steps / the last steps count more)."""
    total, n = max(sum(powers), 1e-30), len(powers)
    if weighting == "relative":
        return [1 / (n * max(p, 1e-30)) for p in powers]
    t_max = max(max(timesteps, default=1.0), 1e-30)
    shape = {"uniform": lambda t: 1.0, "early": lambda t: t / t_max, "late": lambda t: 1 - t / t_max}[weighting]
    w = [shape(t) for t in timesteps]
    norm = n / max(sum(w), 1e-30)  # the weights average 1: errors stay on the scale of uniform's
    return [x * norm / total for x in w]


def anchor_label(entry: LayerSensitivity, base: WeightQuantConfig) -> str:
    """The format measured in ``anchored`` mode: the recipe's own (else the layer's largest candidate)."""
    own = Candidate(base.bits)
    if own.label in entry.formats:
        return own.label
    return max(entry.formats, key=lambda f: (entry.formats[f].bits, -(entry.formats[f].group_size or 10**9)))


@torch.no_grad()
def measure_sensitivity(denoiser: nn.Module, layers: list[LayerSensitivity], config: QuantConfig,
                        calls: list[tuple[tuple, dict]], progress: bool = True,
                        timesteps: list[float] | None = None, guidance_scale: float | None = None) -> list[float]:
    """Fill each layer's ``options``: format label -> (stored bytes, output error when only this layer is
    quantized in that format, each call's mean squared error weighted by :func:`call_weights`) and
    ``call_errors`` (format label -> each call's mean squared error); returns the calls' output powers.

    ``mixed_precision.measure``: ``all`` runs every call for every format; ``sampled`` runs every call for one
    format per layer (:func:`anchor_label`) and ``sampled_calls`` of them (spread over the calls) for the
    others, whose errors are the anchor's times their ratio to it on those calls; ``anchored`` runs the calls
    for the anchor only, the others' errors being the anchor's times their ratio of the weight-space proxy
    (:func:`dmquant.calibration.proxy.weight_proxy`). With ``mixed_precision.guided`` and a ``guidance_scale``,
    a CFG-paired call's error is :func:`dmquant.calibration.reconstruct.reconstruction_error`'s guided one."""
    mp = config.mixed_precision
    guidance = [guidance_scale if mp.guided and guidance_scale is not None and cfg_paired(a, k) else None
                for a, k in calls]
    with record_input_moments(denoiser, [la.name for la in layers] if mp.measure == "anchored" else []) as moments:
        reference = [_output(denoiser(*a, **k)).float() for a, k in calls]
    powers = [float(r.pow(2).mean()) for r in reference]
    weights = call_weights(mp.weighting, powers, timesteps or [1.0] * len(calls))
    subset = spread(range(len(calls)), mp.sampled_calls) if mp.measure == "sampled" else list(range(len(calls)))
    base = candidate_base(config)
    bar = tqdm(layers, desc="mixed precision: layer sensitivity", disable=not progress)
    for entry in bar:
        module = denoiser.get_submodule(entry.name)
        original = module.weight.data
        anchor = anchor_label(entry, base)
        approx, partial = {}, {}
        try:
            for label in [anchor] + [f for f in entry.formats if f != anchor and mp.measure != "anchored"]:
                approx[label] = fake_quantized_weight(original, entry.formats[label].weights(base), entry.split)
                module.weight.data = approx[label]
                which = range(len(calls)) if label == anchor or mp.measure == "all" else subset
                errs = [float(reconstruction_error([_output(denoiser(*calls[i][0], **calls[i][1])).float()],
                                                   [reference[i]], guidance[i])[1]) for i in which]
                (entry.call_errors if len(errs) == len(calls) else partial)[label] = errs
        finally:
            module.weight.data = original
        for label, errs in partial.items():  # sampled: the anchor's errors times the ratio on the subset
            at_anchor = sum(weights[i] * entry.call_errors[anchor][i] for i in subset)
            ratio = sum(weights[i] * e for i, e in zip(subset, errs)) / at_anchor if at_anchor > 0 else 1.0
            entry.call_errors[label] = [e * ratio for e in entry.call_errors[anchor]]
        if mp.measure == "anchored":
            _scale_from_anchor(entry, anchor, original, approx[anchor], moments.get(entry.name), base)
        for label, candidate in entry.formats.items():
            entry.options[label] = (storage_bytes(tuple(original.shape), candidate.weights(base), entry.split),
                                    sum(w * e for w, e in zip(weights, entry.call_errors[label])))
    return powers


def _scale_from_anchor(entry: LayerSensitivity, anchor: str, weight: torch.Tensor, anchor_weight: torch.Tensor,
                       moment: torch.Tensor | None, base: WeightQuantConfig) -> None:
    """Each unmeasured format's call errors: the anchor's, times the ratio of their weight-space proxies (the
    anchor's own when the layer was never called or its anchor proxy is 0)."""
    if moment is None:
        moment = torch.ones(weight.shape[1], device=weight.device)
    at_anchor = weight_proxy(weight, anchor_weight, moment)
    for label, candidate in entry.formats.items():
        if label == anchor:
            continue
        approx = fake_quantized_weight(weight, candidate.weights(base), entry.split)
        ratio = weight_proxy(weight, approx, moment) / at_anchor if at_anchor > 0 else 1.0
        entry.call_errors[label] = [e * ratio for e in entry.call_errors[anchor]]


# -- planning ----------------------------------------------------------------------------------------------
def candidate_layers(denoiser: nn.Module, config: QuantConfig, adapter: DenoiserAdapter) -> list[LayerSensitivity]:
    """The layers the recipe quantizes (with their split point when the recipe splits weights) and the
    candidate formats that fit each."""
    splits = {}
    if config.split is not None and config.split.weights:
        splits = dict(adapter.concat_points(denoiser))
    base = candidate_base(config)
    every = candidates(config.mixed_precision, base) if config.mixed_precision is not None else []
    layers = []
    for n, m in denoiser.named_modules():
        if type(m) in FLOAT_TYPES and selected(n, config, adapter, layer_kind(m)):
            shape, split = tuple(m.weight.shape), splits.get(n)
            formats = {c.label: c for c in every if fits(c, shape, split, base)}
            layers.append(LayerSensitivity(n, m.weight.numel(), split, layer_kind(m), formats=formats))
    if not layers:
        raise DMQuantError("the recipe's include/exclude patterns select no layer of the denoiser: widen 'include'")
    return layers


def fixed_bytes(denoiser: nn.Module, layers: list[LayerSensitivity]) -> int:
    """Bytes of the denoiser's parameters and buffers other than the quantized layers' weights."""
    names = {f"{layer.name}.weight" for layer in layers}
    tensors = list(denoiser.named_parameters()) + list(denoiser.named_buffers())
    return sum(t.numel() * t.element_size() for n, t in tensors if n not in names)


def budget_bytes(mp: MixedPrecisionConfig, config: QuantConfig, layers: list[LayerSensitivity], fixed: int,
                 shapes: dict[str, tuple[int, ...]]) -> int:
    numel = sum(layer.numel for layer in layers)
    if mp.target_bits is not None:
        return int(mp.target_bits * numel / 8)
    if mp.max_weight_bytes is not None:
        return mp.max_weight_bytes - fixed
    return sum(storage_bytes(shapes[layer.name], config.weights, layer.split) for layer in layers)


def _options(layers: list[LayerSensitivity]) -> list[list[tuple[int, float]]]:
    return [list(layer.options.values()) for layer in layers]


def _budget_error(mp: MixedPrecisionConfig, budget: int, cheapest: int, numel: int, fixed: int) -> DMQuantError:
    if mp.max_weight_bytes is not None:
        return DMQuantError(f"mixed_precision.max_weight_bytes={mp.max_weight_bytes} is below the smallest plan "
                            f"({cheapest + fixed} bytes: every layer at W{min(mp.candidate_bits)}, the rest in full "
                            "precision): raise --max-weight-memory")
    return DMQuantError(f"the budget of {8 * budget / numel:.2f} bits per weight is below the smallest plan "
                        f"({8 * cheapest / numel:.2f} bits per weight, scales included: every layer at "
                        f"W{min(mp.candidate_bits)}): raise --target-bits")


def plan_mixed_precision(denoiser: nn.Module, adapter: DenoiserAdapter, config: QuantConfig,
                         calls: Iterable[tuple[tuple, dict]], progress: bool = True,
                         guidance_scale: float | None = None) -> MixedPlan:
    """Measure each layer's sensitivity on ``calls`` (full-precision ``denoiser``, unwrapped), allocate the
    bits within the recipe's budget, and return the plan (its ``config`` is the rerunnable recipe).
    ``guidance_scale``: the calibration run's CFG scale (``mixed_precision.guided`` weighs errors for it)."""
    mp = config.mixed_precision
    if mp is None:
        raise DMQuantError("the recipe has no mixed_precision section: use --recipe auto (or add the section)")
    layers = candidate_layers(denoiser, config, adapter)
    shapes = {layer.name: tuple(denoiser.get_submodule(layer.name).weight.shape) for layer in layers}
    fixed = fixed_bytes(denoiser, layers)
    budget = budget_bytes(mp, config, layers, fixed, shapes)
    numel = sum(layer.numel for layer in layers)
    cheapest = sum(min(storage_bytes(shapes[la.name], c.weights(candidate_base(config)), la.split)
                       for c in la.formats.values()) for la in layers)
    if cheapest > budget:  # before measuring anything
        raise _budget_error(mp, budget, cheapest, numel, fixed)
    start = time.perf_counter()
    chosen_calls = spread(calls, mp.num_samples)
    if not chosen_calls:
        raise DMQuantError("mixed precision needs calibration calls: pass prompts (or calibration_data)")
    timesteps = call_timesteps(adapter, chosen_calls) if mp.weighting in TIMED_WEIGHTINGS else None
    measure_sensitivity(denoiser, layers, config, chosen_calls, progress, timesteps, guidance_scale)
    measured = time.perf_counter() - start
    start = time.perf_counter()
    options = _options(layers)
    choice = allocate(options, budget)
    labels = [list(layer.options) for layer in layers]
    plan_formats = {layer.name: labels[i][j] for i, (layer, j) in enumerate(zip(layers, choice))}
    plan = MixedPlan(plan_config(config, {la.name: la.formats[plan_formats[la.name]] for la in layers},
                                 {la.name: la.kind for la in layers}),
                     plan_formats, layers, budget, fixed, measured, 0.0, len(chosen_calls), mp.weighting)
    top_bits = max(c.bits for la in layers for c in la.formats.values())
    plan.curve = quality_size_curve(options, top_bits, numel, cheapest)
    plan.uniform = []  # each candidate format that every layer can take, on every layer
    for label in labels[0]:
        if all(label in layer.options for layer in layers):
            uniform = [layer.options[label] for layer in layers]
            plan.uniform.append({"bits": layers[0].formats[label].bits, "format": label,
                                 "average_bits": round(8 * sum(c for c, _ in uniform) / numel, 4),
                                 "predicted_sqnr_db": round(sqnr_db(sum(e for _, e in uniform)), 3)})
    plan.seconds_allocation = time.perf_counter() - start
    return plan


def quality_size_curve(options, top_bits: int, numel: int, cheapest: int) -> list[dict]:
    """The allocation at each of :data:`CURVE_BITS` bits per weight (those the candidates can reach):
    average bits and predicted SQNR (from the summed sensitivities)."""
    curve = []
    for target in CURVE_BITS:
        budget = target * numel / 8
        if budget < cheapest or target > top_bits + 1:
            continue
        choice = allocate(options, budget)
        curve.append({"target_bits": target, "average_bits": round(8 * plan_cost(options, choice) / numel, 4),
                      "predicted_sqnr_db": round(sqnr_db(plan_error(options, choice)), 3)})
    return curve


def plan_config(config: QuantConfig, formats: dict[str, Candidate | int],
                kinds: dict[str, str | None] | None = None) -> QuantConfig:
    """The recipe with the plan's formats as per-layer overrides (layers in the recipe's own format need
    none; its ``weights`` take the candidates' scale dtype); a format given as an int is that many bits at the
    recipe's granularity. The recipe's own ``layers`` patterns stay, after the per-layer entries, and a planned
    layer keeps what its pattern said besides the weight format (``weight_only``, ``activations``); ``kinds``
    (layer -> ``linear`` / ``conv``) lets a pattern with a kind (``conv:*``) find it."""
    base = candidate_base(config)
    layers = {}
    for name, f in formats.items():
        override = (f if isinstance(f, Candidate) else Candidate(int(f))).override(base)
        if override is not None:
            found = config.layer_override(name, (kinds or {}).get(name))
            own = found[1] if found is not None else LayerOverrideConfig()
            layers[name] = dataclasses.replace(own, weights={**(own.weights or {}), **override})
    layers.update({pattern: o for pattern, o in config.layers.items() if pattern not in layers})
    note = (f"Mixed precision chosen by dmquant (sensitivity + allocation) from the recipe {config.name!r}: "
            f"{len(formats)} layers, {len(layers)} of them not in the recipe's W{config.weights.bits} format. ")
    return dataclasses.replace(config, weights=base, mixed_precision=None, layers=layers,
                               description=note + config.description)


# -- drawing -----------------------------------------------------------------------------------------------
def draw_plan(report: dict, width: int = 900, height: int = 340):
    """A PNG-ready PIL image of a plan (``MixedPlan.report()``): bits per layer (left), and the predicted
    quality/size curve of the candidate budgets against the uniform formats (right). PIL only."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top, bottom, half = 30, height - 40, width // 2
    bits = list(report["bits"].values())
    draw.text((10, 6), f"bits per layer ({len(bits)} layers, {report['average_bits']:.2f} bits per weight "
                       "with scales)", fill="black")
    x0, x1, top_bits = 40, half - 20, 8
    for b in range(0, top_bits + 1, 2):
        y = bottom - (bottom - top) * b / top_bits
        draw.line([(x0 - 4, y), (x1, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"W{b}", fill="black")
    step = (x1 - x0) / max(len(bits), 1)
    grouped = ["g" in f for f in report.get("formats", {}).values()] or [False] * len(bits)
    for i, (b, g) in enumerate(zip(bits, grouped)):
        y = bottom - (bottom - top) * b / top_bits
        shade = int(200 - 20 * b)
        fill = (255 - shade // 3, shade, shade) if g else (shade, shade, 255 - shade // 3)
        draw.rectangle([x0 + i * step + 1, y, x0 + (i + 1) * step - 1, bottom], fill=fill)
    draw.text((x0, bottom + 8), "layers in module order (red: one scale per group)", fill="black")

    points = [(p["average_bits"], p["predicted_sqnr_db"]) for p in report["curve"]]
    uniform = [(p["average_bits"], p["predicted_sqnr_db"]) for p in report["uniform"]]
    chosen = (report["average_bits"], report["predicted_sqnr_db"])
    every = points + uniform + [chosen]
    lo_x, hi_x = min(p[0] for p in every) - 0.2, max(p[0] for p in every) + 0.2
    lo_y, hi_y = min(p[1] for p in every) - 2, max(p[1] for p in every) + 2
    px0, px1 = half + 50, width - 20

    def at(p):
        return (px0 + (px1 - px0) * (p[0] - lo_x) / (hi_x - lo_x), bottom - (bottom - top) * (p[1] - lo_y) / (hi_y - lo_y))

    draw.text((half + 10, 6), "predicted SQNR (dB) vs bits per weight: auto (blue line), uniform (red), plan (green)",
              fill="black")
    draw.rectangle([px0, top, px1, bottom], outline=(160, 160, 160))
    for v in range(math.ceil(lo_y / 10) * 10, int(hi_y) + 1, 10):
        draw.text((half + 15, at((lo_x, v))[1] - 6), f"{v}", fill="black")
    for v in range(math.ceil(lo_x), int(hi_x) + 1):
        draw.text((at((v, lo_y))[0] - 3, bottom + 8), f"{v}", fill="black")
    if len(points) > 1:
        draw.line([at(p) for p in points], fill=(40, 80, 220), width=2)
    for p in points:
        x, y = at(p)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(40, 80, 220))
    for p, entry in zip(uniform, report["uniform"]):
        x, y = at(p)
        draw.rectangle([x - 4, y - 4, x + 4, y + 4], fill=(220, 40, 40))
        draw.text((x + 6, y + 2), f"W{entry.get('format', entry['bits'])}", fill=(220, 40, 40))
    x, y = at(chosen)
    draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline=(0, 150, 0), width=3)
    return img


def plan_markdown(report: dict) -> list[str]:
    """The summary lines of a plan (run folder's summary.md)."""
    hist = ", ".join(f"W{f}: {n}" for f, n in report["histogram"].items())
    lines = ["", "## Mixed precision", "",
             f"- budget {report['budget_bytes']} bytes, plan {report['plan_bytes']} bytes of quantized weights "
             f"(codes and scales): {report['average_bits']:.3f} bits per weight over {report['weights']} weights",
             f"- layers per format (`3g64`: 3 bits, one scale per 64 input weights; `3a`: with zero points): {hist}",
             f"- sensitivity on {report['calls']} calibration calls ({report['weighting']} weighting): "
             f"{report['seconds_sensitivity']} s; allocation {report['seconds_allocation']} s",
             f"- predicted SQNR of the plan {report['predicted_sqnr_db']:.1f} dB (sum of the layers' errors); "
             "uniform formats: " + ", ".join(f"W{u.get('format', u['bits'])} {u['predicted_sqnr_db']:.1f} dB at {u['average_bits']:.2f} "
                                              "bits" for u in report["uniform"]),
             "- `recipe.yaml` is the plan (rerun it with `dmquant calibrate --recipe recipe.yaml`); "
             "`mixed_precision.png` draws it", "",
             "![bits per layer and the quality/size curve](mixed_precision.png)", "",
             "| layer | format |", "| --- | --- |"]
    formats = report.get("formats") or {n: str(b) for n, b in report["bits"].items()}
    lines += [f"| `{name}` | W{f} |" for name, f in formats.items()]
    return lines
