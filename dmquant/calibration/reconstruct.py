"""Reconstruction (AdaRound, BRECQ): learn each unit's weight rounding on calibration inputs.

Units are the wrapped layers (``unit: layer``) or the adapter's blocks (``unit: block``), taken in
execution order. For each unit: record its full-precision inputs and outputs and its inputs in the
quantized model (earlier units already rounded), on ``num_samples`` recorded denoiser calls (a forward
stops as soon as the unit has run); then minimise ``|unit_q(x_q) - unit_fp(x_fp)|^2`` plus the rounding
regulariser over the rounding variables (and, LSQ-style, the unit's activation scales); finally
write the hard-rounded weights back (they lie on the quantizer's grid, so freezing keeps them exactly).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from dmquant.config import QuantConfig
from dmquant.models.adapters import adapter_for
from dmquant.nn.layers import _QuantLayer
from dmquant.nn.timestep import timestep_state
from dmquant.nn.wrap import activation_quantizers, quant_layers, set_activation_mode
from dmquant.quantizers.adaround import annealed_beta, init_rounding, rounding_regularizer, soft_round_weight
from dmquant.quantizers.modules import ActQuantizer, SplitWeightQuantizer, WeightQuantizer, split_channels


class _Stop(Exception):
    """Raised by a hook once the unit has run: the rest of the denoiser is not needed."""


class _Rounding:
    """Learned rounding of one layer's weight (one ``V`` per weight quantizer part)."""

    def __init__(self, layer: _QuantLayer):
        self.layer = layer
        wq = layer.weight_quantizer
        self.parts: list[WeightQuantizer] = list(wq.parts) if isinstance(wq, SplitWeightQuantizer) else [wq]
        self.split = wq.split if isinstance(wq, SplitWeightQuantizer) else None
        self.v = [nn.Parameter(init_rounding(q.rows(w) / q.scale[:, None]))
                  for q, w in zip(self.parts, self._weights(layer.weight.detach()))]

    def _weights(self, weight: torch.Tensor) -> list[torch.Tensor]:
        return [weight] if self.split is None else list(split_channels(weight, self.split, 1))

    def weight(self, hard: bool = False) -> torch.Tensor:
        out = []
        for q, w, v in zip(self.parts, self._weights(self.layer.weight.detach()), self.v):
            rows = soft_round_weight(q.rows(w), q.scale[:, None], q.zero_point[:, None], v, q.fmt, hard)
            out.append(rows.reshape(w.shape))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def regularizer(self, beta: float) -> torch.Tensor:
        return sum(rounding_regularizer(v, beta) for v in self.v)

    def harden(self) -> None:
        with torch.no_grad():
            self.layer.weight.data.copy_(self.weight(hard=True))
        self.layer._cached_weight = None


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return _first_tensor(out[0]) if hasattr(out, "__getitem__") else out.sample


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


class _Capture:
    """Runs the denoiser on calls and keeps the unit's inputs (and output), stopping after the unit."""

    def __init__(self, denoiser: nn.Module, unit: nn.Module):
        self.denoiser, self.unit = denoiser, unit

    def run(self, calls, with_output: bool) -> list[tuple[tuple, dict, float | None, torch.Tensor | None]]:
        state, records = timestep_state(self.denoiser), []
        current = {}

        def pre(module, args, kwargs):
            current["in"] = (_detach(args), _detach(kwargs))
            if not with_output:
                raise _Stop

        def post(module, args, kwargs, out):
            current["out"] = _first_tensor(out).detach()
            raise _Stop

        handles = [self.unit.register_forward_pre_hook(pre, with_kwargs=True)]
        if with_output:
            handles.append(self.unit.register_forward_hook(post, with_kwargs=True))
        try:
            for args, kwargs in calls:
                current.clear()
                try:
                    self.denoiser(*args, **kwargs)
                except _Stop:
                    pass
                t = state.timestep if state is not None else None
                records.append((*current["in"], t, current.get("out")))
        finally:
            for h in handles:
                h.remove()
        return records


class _FullPrecision:
    """Context: every quantizer off and the layers on their original full-precision weights."""

    def __init__(self, denoiser, originals: dict[int, torch.Tensor]):
        self.denoiser, self.originals = denoiser, originals
        self.layers = [m for _, m in quant_layers(denoiser)]

    def __enter__(self):
        set_activation_mode(self.denoiser, "off")
        for layer in self.layers:
            layer.weight_override = _constant(self.originals[id(layer)])

    def __exit__(self, *exc):
        set_activation_mode(self.denoiser, "quant")
        for layer in self.layers:
            layer.weight_override = None


def _constant(value: torch.Tensor):
    return lambda: value


class _NoParamGrads:
    """Context: the unit's own parameters need no gradients (only rounding and scales are learned)."""

    def __init__(self, unit: nn.Module):
        self.params = [p for p in unit.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _units(denoiser: nn.Module, config: QuantConfig, probe) -> list[tuple[str, nn.Module]]:
    """The reconstruction units holding quantized layers, in the order the denoiser runs them."""
    if config.reconstruction.unit == "layer":
        units = quant_layers(denoiser)
    else:
        units = [(n, m) for n, m in adapter_for(denoiser).blocks(denoiser)
                 if any(isinstance(x, _QuantLayer) for x in m.modules())]
    order: dict[int, int] = {}

    def seen(module, args):
        order.setdefault(id(module), len(order))

    handles = [m.register_forward_pre_hook(seen) for _, m in units]
    try:
        with torch.no_grad():
            denoiser(*probe[0], **probe[1])
    finally:
        for h in handles:
            h.remove()
    return sorted([u for u in units if id(u[1]) in order], key=lambda u: order[id(u[1])])


def _learnable_act_scales(unit: nn.Module) -> list[ActQuantizer]:
    qs = [q for q in activation_quantizers(unit) if isinstance(q, ActQuantizer) and q.config.static]
    for q in qs:
        scale = q._buffers.pop("scale")
        q.scale = nn.Parameter(scale.detach().clone())
    return qs


def _restore_act_scales(qs: list[ActQuantizer]) -> None:
    for q in qs:
        scale = q._parameters.pop("scale").detach().clamp_min(1e-8)
        q.register_buffer("scale", scale)


def _optimize(unit, roundings, act_qs, fp, qin, config, state) -> tuple[float, float]:
    r = config.reconstruction
    params = [{"params": [v for rd in roundings for v in rd.v], "lr": r.learning_rate}]
    for q in act_qs:  # relative steps: each scale moves by about act_learning_rate of itself per iteration
        params.append({"params": [q.scale], "lr": r.act_learning_rate * float(q.scale.detach().abs().mean())})
    opt = torch.optim.Adam(params)
    for rd in roundings:
        rd.layer.weight_override = rd.weight
    first = last = 0.0
    try:
        for step in range(r.iterations):
            i = random.randrange(len(qin))
            args, kwargs, t, _ = qin[i]
            if state is not None and t is not None:
                state.set_timestep(t)
            out = _first_tensor(unit(*args, **kwargs))
            rec = (out - fp[i][3]).pow(2).mean()
            beta = annealed_beta(step, r.iterations, r.warmup, r.beta_start, r.beta_end)
            loss = rec if beta is None else rec + r.reg_weight * sum(rd.regularizer(beta) for rd in roundings)
            opt.zero_grad()
            loss.backward()
            opt.step()
            for q in act_qs:
                q.scale.data.clamp_(min=1e-8)
            last = float(rec.detach())
            first = last if step == 0 else first
    finally:
        for rd in roundings:
            rd.layer.weight_override = None
    return first, last


def reconstruct(denoiser: nn.Module, config: QuantConfig, calls: Iterable[tuple[tuple, dict]],
                progress: bool = True) -> dict:
    """Learn the rounding of every unit's weights (and its activation scales); returns a short report."""
    r = config.reconstruction
    calls = list(calls)
    stride = max(1, len(calls) // r.num_samples)
    sample = calls[::stride][: r.num_samples]
    random.seed(config.calibration.seed)
    torch.manual_seed(config.calibration.seed)
    state = timestep_state(denoiser)
    set_activation_mode(denoiser, "quant")
    units = _units(denoiser, config, sample[0])
    originals = {id(m): m.weight.detach().clone() for _, m in quant_layers(denoiser)}
    losses = []
    for name, unit in tqdm(units, desc="calibration: reconstruction", disable=not progress):
        with torch.no_grad():
            with _FullPrecision(denoiser, originals):
                fp = _Capture(denoiser, unit).run(sample, with_output=True)
            qin = _Capture(denoiser, unit).run(sample, with_output=False)
        layers = [m for m in unit.modules() if isinstance(m, _QuantLayer)]
        roundings = [_Rounding(layer) for layer in layers]
        with _NoParamGrads(unit):  # only the rounding variables and the activation scales learn
            act_qs = _learnable_act_scales(unit) if r.learn_act_scales and config.activations is not None else []
            try:
                before, after = _optimize(unit, roundings, act_qs, fp, qin, config, state)
            finally:
                _restore_act_scales(act_qs)
        for rd in roundings:
            rd.harden()
        losses.append((name, before, after))
    return {"unit": r.unit, "units": len(units), "samples": len(sample), "iterations": r.iterations,
            "mean_loss_first": _mean([b for _, b, _ in losses]), "mean_loss_last": _mean([a for _, _, a in losses])}


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0
