"""Per-layer error measurement of a simulated quantized denoiser on recorded full-precision calls.

For every recorded call the denoiser runs once in full precision (:func:`dmquant.nn.wrap.full_precision`)
with a forward hook on each quantized layer. The hook sees the layer's full-precision input ``x`` (the
FP model's own input to that layer: every other layer is FP) and its FP output, and evaluates the
layer's own quantized op on ``x`` three times: weights quantized only, input activations quantized
only, both. It also records statistics of ``x``: per-step ranges (per CFG half when the pipeline
batches the halves together), per-channel peaks (outlier channels), the peak-to-RMS ratio of tokens
(what a per-token scale sees), the range of each part of a skip concatenation, and the share of
values the calibrated static grid clips (beyond half a step past its ends). A torch-function mode sees the core attention call
(SDPA) of each quantized attention module and measures its output with only Q, K, V quantized.
Then the denoiser runs quantized on the same call, and its output is compared with the FP output.

SQNR is ``10·log10(Σ y² / Σ (y_q − y)²)`` summed over the calls it covers (None where the error is 0). The
guided SQNR compares ``uncond + g·(cond − uncond)`` over the whole output (a DiT's learned-variance channels
included, which its pipeline does not guide).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dmquant.formats import is_float
from dmquant.nn import backends
from dmquant.nn.attention import fake_quant_attention
from dmquant.nn.layers import QuantLayer, split_channels
from dmquant.nn.wrap import full_precision, quant_layers, quantized_attention

VARIANTS = ("weights", "activations", "both")
SAMPLE = 1 << 16  # values drawn per tensor for the percentile


@dataclass
class CallInfo:
    """One recorded denoiser call: its step (index within the run, timestep) and how its batch splits into
    CFG branches: ``halves`` names the two halves of a batched call (first, second), ``branch`` names a
    call that is one branch by itself; neither: the call is one branch, ``"all"``."""

    step: int
    timestep: float
    batch: int
    halves: tuple[str, str] | None = None
    branch: str = "all"

    def parts(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``x`` cut into its branches (whole when its leading dimension is not the call's batch)."""
        if self.halves is not None and x.ndim and x.shape[0] == self.batch and self.batch % 2 == 0:
            half = self.batch // 2
            return [(self.halves[0], x[:half]), (self.halves[1], x[half:])]
        return [(self.branch, x)]


def sqnr_db(signal: float, noise: float) -> float | None:
    """``10·log10(signal / noise)``; None for an exact result (no noise)."""
    if noise <= 0:
        return None
    if signal <= 0:
        return -math.inf if noise > 0 else None
    return 10 * math.log10(signal / noise)


def _power(y: torch.Tensor) -> float:
    return float(y.double().square().sum())


def _noise(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().sum())


class _Energy:
    """Signal and noise sums per key (``(step, branch)``); totals by step, by branch, overall."""

    def __init__(self):
        self.signal: dict = defaultdict(float)
        self.noise: dict = defaultdict(float)

    def add(self, key, y: torch.Tensor, yq: torch.Tensor) -> None:
        self.signal[key] += _power(y)
        self.noise[key] += _noise(yq, y)

    def total(self, keep=lambda key: True) -> float | None:
        keys = [k for k in self.signal if keep(k)]
        return sqnr_db(sum(self.signal[k] for k in keys), sum(self.noise[k] for k in keys))

    def per_step(self, steps: list[int]) -> list[float | None]:
        return [self.total(lambda k, s=s: k[0] == s) for s in steps]


def _stats(x: torch.Tensor) -> dict:
    flat = x.detach().reshape(-1).float()
    mag = flat.abs()
    if mag.numel() > SAMPLE:
        g = torch.Generator(device="cpu").manual_seed(mag.numel())
        mag = mag[torch.randint(mag.numel(), (SAMPLE,), generator=g).to(mag.device)]
    return {"min": float(flat.min()), "max": float(flat.max()), "absmax": float(flat.abs().max()),
            "p999": float(torch.quantile(mag, 0.999)), "sq": float(flat.double().square().sum()), "n": flat.numel()}


def _merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {"min": min(a["min"], b["min"]), "max": max(a["max"], b["max"]), "absmax": max(a["absmax"], b["absmax"]),
            "p999": max(a["p999"], b["p999"]), "sq": a["sq"] + b["sq"], "n": a["n"] + b["n"]}


def _public(stats: dict) -> dict:
    """min, max, peak |x|, 99.9th percentile of |x| and RMS (what ``inspect.json`` keeps of a range)."""
    out = {k: _round(stats[k]) for k in ("min", "max", "absmax", "p999")}
    out["rms"] = _round(math.sqrt(stats["sq"] / max(stats["n"], 1)))
    return out


def _channels_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.detach().float().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])


@dataclass
class LayerRecord:
    name: str
    kind: str
    weight_bits: int
    act_bits: int | None
    act_granularity: str | None
    split: int | None
    concat: int | None  # the skip concatenation's split index (whether or not the recipe splits)
    energy: dict = field(default_factory=lambda: {v: _Energy() for v in VARIANTS})
    ranges: dict = field(default_factory=dict)  # (step, branch) -> stats
    parts: dict = field(default_factory=dict)  # (step, part index) -> stats of the concat parts
    channel_peak: torch.Tensor | None = None
    token_ratio: list = field(default_factory=list)
    clip: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # step -> [outside, total]
    calibrated: dict = field(default_factory=dict)  # step -> [(lo, hi) per input part] (a time table: per step)
    peak_over_calibrated: float = 0.0


@dataclass
class AttentionRecord:
    name: str
    energy: _Energy = field(default_factory=_Energy)
    operands: dict = field(default_factory=dict)  # (operand, step) -> absmax


def _static_range(q) -> tuple[float, float, float] | None:
    """The static range in force of an integer per-tensor input quantizer, its grid's ends and step ``(lo, hi,
    scale)`` (None: dynamic, float8, not calibrated)."""
    if not q.static or is_float(q.fmt) or not q.calibrated:
        return None
    scale, zero = q.current_qparams()
    scale, zero = float(scale.reshape(-1)[0]), float(zero.reshape(-1)[0])
    return (q.fmt.qmin - zero) * scale, (q.fmt.qmax - zero) * scale, scale


def clipped_count(x: torch.Tensor, lo: float, hi: float, scale: float) -> int:
    """How many values of ``x`` a grid from ``lo`` to ``hi`` in steps of ``scale`` clips: those beyond half a step
    past an end (a value within half a step rounds to the end code as any value rounds to its nearest code; GELU's
    minimum -0.17 just under a grid that ends at -0.166 is rounding, not clipping)."""
    return int(((x < lo - scale / 2) | (x > hi + scale / 2)).sum())


class _AttentionProbe(TorchFunctionMode):
    """Sees the SDPA calls made inside a quantized attention module (after dmquant's own routing, which
    runs its quantizers, off in the FP pass, then calls SDPA again) and measures the core attention with
    the module's Q, K, V (and probabilities) quantizers on."""

    def __init__(self, inspector: Inspector):
        super().__init__()
        self.inspector = inspector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.inspector.attention_now is not None:
            self.inspector.record_attention(args, kwargs, out)
        return out


class Inspector:
    """Hooks on a wrapped (simulated) denoiser; :meth:`run` measures one recorded call."""

    def __init__(self, denoiser: nn.Module, concat_points: Iterable[tuple[str, int]] = ()):
        self.denoiser = denoiser
        concat = dict(concat_points)
        self.layers: dict[str, LayerRecord] = {}
        for name, layer in quant_layers(denoiser):
            inputs = list(layer.input_quantizers)
            self.layers[name] = LayerRecord(
                name, layer.kind, layer.weight_quantizers[0].bits if len(layer.weight_quantizers) else 0,
                inputs[0].bits if inputs else None, inputs[0].granularity if inputs else None, layer.split,
                concat.get(name, layer.split))
        self.attention: dict[str, AttentionRecord] = {}
        self.attention_modules: dict[str, nn.Module] = {}
        for name, attn in quantized_attention(denoiser):
            if getattr(attn, "dmq_quant", None) is not None:  # the int8 kernel has no fake quantizers to switch
                self.attention[name] = AttentionRecord(name)
                self.attention_modules[name] = attn
        self.model = {"overall": _Energy(), "guided": _Energy()}
        self.steps: dict[int, float] = {}
        self.branches: list[str] = []
        self.call: CallInfo | None = None
        self.attention_now: str | None = None
        self.busy = False

    # -- hooks ---------------------------------------------------------------------------------------------
    def _layer_hook(self, name: str):
        def hook(layer: QuantLayer, inputs, output):
            if self.busy or self.call is None:
                return
            self.busy = True
            try:
                self.record_layer(self.layers[name], layer, inputs[0], output)
            finally:
                self.busy = False
        return hook

    def _attention_pre(self, name: str):
        def hook(module, args, kwargs):
            self.attention_now = name
        return hook

    def _attention_post(self, module, args, kwargs, output):
        self.attention_now = None

    @torch.no_grad()
    def _variant(self, layer: QuantLayer, x: torch.Tensor, weights: bool, acts: bool) -> torch.Tensor:
        """The layer's own op on ``x`` with its weight and/or its input quantizers on (inside ``full_precision``)."""
        layer.quantize_weight = weights
        for q in layer.input_quantizers:
            q.mode = "quant" if acts else "off"
        try:
            return backends.run(layer, x)
        finally:
            layer.quantize_weight = False
            for q in layer.input_quantizers:
                q.mode = "off"

    @torch.no_grad()
    def record_layer(self, rec: LayerRecord, layer: QuantLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        call, step = self.call, self.call.step
        outputs = {"weights": self._variant(layer, x, True, False)}
        if len(layer.input_quantizers):
            outputs["activations"] = self._variant(layer, x, False, True)
            outputs["both"] = self._variant(layer, x, True, True)
        else:  # weight-only recipe: the activations are exact
            outputs["activations"], outputs["both"] = y, outputs["weights"]
        y_parts = call.parts(y)
        for variant, yq in outputs.items():
            for (branch, yp), (_, yqp) in zip(y_parts, call.parts(yq)):
                rec.energy[variant].add((step, branch), yp, yqp)
        for branch, xp in call.parts(x):
            rec.ranges[(step, branch)] = _merge(rec.ranges.get((step, branch)), _stats(xp))
        tokens = _channels_last(x, layer.channel_dim)
        peak = tokens.abs().amax(dim=0)
        rec.channel_peak = peak if rec.channel_peak is None else torch.maximum(rec.channel_peak, peak)
        rms = tokens.square().mean(dim=1).sqrt().clamp_min(1e-12)
        rec.token_ratio.append(float((tokens.abs().amax(dim=1) / rms).median()))
        if rec.concat is not None:
            for i, part in enumerate(split_channels(x, rec.concat, layer.channel_dim)):
                rec.parts[(step, i)] = _merge(rec.parts.get((step, i)), _stats(part))
        parts = [x] if len(layer.input_quantizers) == 1 else layer.input_parts(x)
        rec.calibrated.pop(step, None)  # the ranges in force at this step (the same for every call of it)
        for q, part in zip(layer.input_quantizers, parts):
            bounds = _static_range(q)
            if bounds is None:
                continue
            lo, hi, scale = bounds
            counts = rec.clip[step]
            counts[0] += clipped_count(part, lo, hi, scale)
            counts[1] += part.numel()
            top = max(abs(lo), abs(hi), 1e-12)
            rec.peak_over_calibrated = max(rec.peak_over_calibrated, float(part.abs().max()) / top)
            rec.calibrated.setdefault(step, []).append((lo, hi))

    @torch.no_grad()
    def record_attention(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        name = self.attention_now
        rec, quant = self.attention[name], self.attention_modules[name].dmq_quant
        step = self.call.step
        for operand, value in zip("qkv", args[:3]):
            rec.operands[(operand, step)] = max(rec.operands.get((operand, step), 0.0), float(value.abs().max()))
        quantizers = quant.quantizers()
        modes = [q.mode for q in quantizers]
        for q in quantizers:
            q.mode = "quant"
        try:
            quantized = fake_quant_attention(quant, *args, **kwargs)
        finally:
            for q, mode in zip(quantizers, modes):
                q.mode = mode
        for (branch, yp), (_, yqp) in zip(self.call.parts(out), self.call.parts(quantized)):
            rec.energy.add((step, branch), yp, yqp)

    # -- one call -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, args: tuple, kwargs: dict, call: CallInfo, guidance_scale: float | None = None) -> None:
        """Measure one denoiser call: the per-layer pass (FP model, hooks), then the quantized model."""
        self.steps[call.step] = call.timestep
        handles = [self.denoiser.get_submodule(n).register_forward_hook(self._layer_hook(n)) for n in self.layers]
        for name, attn in self.attention_modules.items():
            handles.append(attn.register_forward_pre_hook(self._attention_pre(name), with_kwargs=True))
            handles.append(attn.register_forward_hook(self._attention_post, with_kwargs=True))
        self.call = call
        try:
            with full_precision(self.denoiser), _AttentionProbe(self):
                fp = _output(self.denoiser(*args, **kwargs))
        finally:
            for h in handles:
                h.remove()
            self.call, self.attention_now = None, None
        quantized = _output(self.denoiser(*args, **kwargs))
        fp_parts, q_parts = call.parts(fp), call.parts(quantized)
        for (branch, yp), (_, yqp) in zip(fp_parts, q_parts):
            if branch not in self.branches:
                self.branches.append(branch)
            self.model["overall"].add((call.step, branch), yp, yqp)
        if guidance_scale is not None and len(fp_parts) == 2:
            named_fp, named_q = dict(fp_parts), dict(q_parts)
            if {"cond", "uncond"} <= set(named_fp):
                def guided(d):
                    return d["uncond"] + guidance_scale * (d["cond"] - d["uncond"])
                self.model["guided"].add((call.step, "guided"), guided(named_fp), guided(named_q))


def _output(out) -> torch.Tensor:
    """The first tensor of a denoiser's output (a tuple with ``return_dict=False``, or an output object)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _output(out[0])
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    values = list(out.values()) if hasattr(out, "values") else []
    return _output(values[0])


# -- the numbers ----------------------------------------------------------------------------------------------
def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _ratio(values: list[float]) -> float | None:
    """Largest over smallest of positive values (None with fewer than two)."""
    values = [v for v in values if v > 0]
    if len(values) < 2:
        return None
    return max(values) / min(values)


def _width(stats: dict) -> float:
    return stats["max"] - stats["min"]


def layer_results(rec: LayerRecord, steps: list[int], branches: list[str]) -> dict:
    out = {"kind": rec.kind, "weight_bits": rec.weight_bits, "act_bits": rec.act_bits,
           "act_granularity": rec.act_granularity, "split": rec.split,
           "sqnr_db": {v: _round(rec.energy[v].total()) for v in VARIANTS},
           "sqnr_db_per_step": {v: [_round(x) for x in rec.energy[v].per_step(steps)] for v in VARIANTS}}
    if len(branches) > 1:
        out["sqnr_db_per_branch"] = {b: _round(rec.energy["both"].total(lambda k, b=b: k[1] == b)) for b in branches}
    per_step, widths, cfg, crest = [], [], [], []
    for s in steps:
        entry = {"step": s}
        merged = None
        for b in branches:
            stats = rec.ranges.get((s, b))
            if stats is not None:
                entry[b] = _public(stats)
                merged = _merge(merged, stats)
        if merged is None:
            continue
        entry["all"] = _public(merged)
        crest.append(entry["all"]["absmax"] / entry["all"]["rms"] if entry["all"]["rms"] else 0.0)
        widths.append(_width(merged))
        halves = [_width(rec.ranges[(s, b)]) for b in branches if (s, b) in rec.ranges]
        if len(halves) == 2 and min(halves) > 0:
            cfg.append(max(halves) / min(halves))
        per_step.append(entry)
    tails = [e["all"]["absmax"] / e["all"]["p999"] for e in per_step if e["all"]["p999"]]
    out["ranges"] = {"per_step": per_step, "step_variation": _round(_ratio(widths)),
                     "cfg_ratio": _round(max(cfg)) if cfg else None,
                     "peak_over_p999": _round(max(tails)) if tails else None,
                     "peak_over_rms": _round(max(crest)) if crest else None}
    if rec.channel_peak is not None:
        peak = rec.channel_peak
        median = float(peak.median())
        top = torch.topk(peak, min(5, peak.numel()))
        out["outliers"] = {"channels": peak.numel(),
                           "channel_max_over_median": _round(float(peak.max()) / median if median > 0 else None),
                           "top_channels": [int(i) for i in top.indices],
                           "top_channel_peaks": [_round(float(v)) for v in top.values]}
        out["token_peak_over_rms"] = _round(sum(rec.token_ratio) / len(rec.token_ratio))
    if rec.concat is not None and rec.parts:
        parts = [{"channels": None, "absmax": _round(max(st["absmax"] for (s, i), st in rec.parts.items() if i == p)),
                  "absmax_per_step": [_round(rec.parts[(s, p)]["absmax"]) if (s, p) in rec.parts else None
                                      for s in steps]} for p in (0, 1)]
        total = rec.channel_peak.numel() if rec.channel_peak is not None else None
        parts[0]["channels"] = rec.concat
        parts[1]["channels"] = None if total is None else total - rec.concat
        a, b = parts[0]["absmax"] or 0.0, parts[1]["absmax"] or 0.0
        out["concat"] = {"index": rec.concat, "split_by_recipe": rec.split is not None, "parts": parts,
                         "ratio": _round(max(a, b) / min(a, b)) if min(a, b) > 0 else None}
    if rec.clip:
        outside = sum(c[0] for c in rec.clip.values())
        total = sum(c[1] for c in rec.clip.values())
        out["calibrated"] = {
            "ranges_per_step": [[[_round(lo), _round(hi)] for lo, hi in rec.calibrated.get(s, [])] for s in steps],
            "clipped_fraction": _round(outside / total if total else 0.0),
            "clipped_fraction_per_step": [_round(rec.clip[s][0] / rec.clip[s][1]) if rec.clip.get(s, [0, 0])[1] else None
                                          for s in steps],
            "peak_over_calibrated": _round(rec.peak_over_calibrated)}
    return out


def attention_results(rec: AttentionRecord, steps: list[int]) -> dict:
    operands = {}
    for operand in "qkv":
        peaks = [rec.operands.get((operand, s)) for s in steps]
        operands[operand] = {"absmax_per_step": [_round(p) for p in peaks],
                             "step_variation": _round(_ratio([p for p in peaks if p is not None]))}
    return {"sqnr_db": _round(rec.energy.total()), "sqnr_db_per_step": [_round(x) for x in rec.energy.per_step(steps)],
            "operands": operands}


def results(inspector: Inspector) -> dict:
    """Every number the inspector gathered, JSON-ready (None for an exact result or a missing value)."""
    steps = sorted(inspector.steps)
    branches = list(inspector.branches)
    model = inspector.model
    per_step = []
    for s in steps:
        entry = {"step": s, "timestep": _round(inspector.steps[s], 6),
                 "sqnr_db": _round(model["overall"].total(lambda k, s=s: k[0] == s))}
        if len(branches) > 1:
            for b in branches:
                entry[b] = _round(model["overall"].total(lambda k, s=s, b=b: k == (s, b)))
        if model["guided"].signal:
            entry["guided"] = _round(model["guided"].total(lambda k, s=s: k[0] == s))
        per_step.append(entry)
    whole = {"sqnr_db": _round(model["overall"].total()), "per_step": per_step}
    if len(branches) > 1:
        whole["per_branch"] = {b: _round(model["overall"].total(lambda k, b=b: k[1] == b)) for b in branches}
    if model["guided"].signal:
        whole["guided_sqnr_db"] = _round(model["guided"].total())
    return {"steps": steps, "timesteps": [_round(inspector.steps[s], 6) for s in steps], "branches": branches,
            "model": whole,
            "layers": {n: layer_results(r, steps, branches) for n, r in inspector.layers.items()},
            "attention": {n: attention_results(r, steps) for n, r in inspector.attention.items()}}
