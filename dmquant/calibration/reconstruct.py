"""Reconstruction (AdaRound, BRECQ): learn each unit's weight rounding on calibration inputs.

Units are the wrapped layers (``unit: layer``) or the adapter's blocks (``unit: block``), taken in
execution order. For each unit: record its full-precision inputs and outputs and its inputs in the
quantized model (earlier units already rounded), on ``num_samples`` recorded denoiser calls (a forward
stops as soon as the unit has run); then minimise ``|unit_q(x_q) - unit_fp(x_fp)|^2`` plus the rounding
regulariser over the rounding variables (and, LSQ-style, the unit's activation scales and, optionally, its
weight scales); finally
harden the rounding in each weight quantizer (its codes are fixed; the float weights stay untouched,
so the full-precision passes of later units read the original model). A unit whose hardened error ends
above round-to-nearest's (a diverged fit: learned scales can drift) is fitted again from its starting scales with
the rounding alone (listed in the report's ``refits``), and put back to nearest rounding if that too ends worse
(``fallbacks``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from dmquant.config import ReconstructionConfig
from dmquant.models.adapters import DenoiserAdapter
from dmquant.nn.layers import QuantLayer
from dmquant.nn.wrap import (
    activation_quantizers,
    full_precision,
    quant_layers,
    set_activation_mode,
    time_table,
)
from dmquant.quantizers.adaround import annealed_beta


class _Stop(Exception):
    """Raised by a hook once the unit has run: the rest of the denoiser is not needed."""


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor of a unit's output (joint blocks return the text and image streams; SD3's last block
    returns ``(None, image)``)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def capture(denoiser: nn.Module, unit: nn.Module, calls, with_output: bool) -> list[tuple]:
    """Run the denoiser on ``calls``; per call, the unit's ``(args, kwargs, timestep, output or None)``."""
    table, records, current = time_table(denoiser), [], {}

    def pre(module, args, kwargs):
        current["in"] = (_detach(args), _detach(kwargs))
        if not with_output:
            raise _Stop

    def post(module, args, kwargs, out):
        current["out"] = [t.detach() for t in _tensors(out)]
        raise _Stop

    handles = [unit.register_forward_pre_hook(pre, with_kwargs=True)]
    if with_output:
        handles.append(unit.register_forward_hook(post, with_kwargs=True))
    try:
        for args, kwargs in calls:
            current.clear()
            try:
                denoiser(*args, **kwargs)
            except _Stop:
                pass
            records.append((*current["in"], table.timestep if table is not None else None, current.get("out")))
    finally:
        for h in handles:
            h.remove()
    return records


def _units(denoiser: nn.Module, r: ReconstructionConfig, adapter: DenoiserAdapter, probe) -> list[tuple[str, nn.Module]]:
    """The reconstruction units holding quantized layers, in the order the denoiser runs them."""
    if r.unit == "layer":
        units = quant_layers(denoiser)
    else:
        units = [(n, m) for n, m in adapter.blocks(denoiser) if any(isinstance(x, QuantLayer) for x in m.modules())]
    order: dict[int, int] = {}

    def seen(module, args) -> None:
        order.setdefault(id(module), len(order))

    handles = [m.register_forward_pre_hook(seen) for _, m in units]
    try:
        with torch.no_grad():
            denoiser(*probe[0], **probe[1])
    finally:
        for h in handles:
            h.remove()
    return sorted([u for u in units if id(u[1]) in order], key=lambda u: order[id(u[1])])


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


def cfg_paired(args: tuple, kwargs: dict) -> bool:
    """Whether a denoiser call carries both halves of classifier-free guidance: its latent input (the first
    tensor argument) is an even batch whose two halves are equal (the pipeline doubled the latents)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [kwargs[k] for k in ("sample", "hidden_states") if isinstance(kwargs.get(k), torch.Tensor)]
    if not tensors or tensors[0].dim() == 0 or tensors[0].shape[0] % 2:
        return False
    x = tensors[0]
    return bool(torch.equal(x[: x.shape[0] // 2], x[x.shape[0] // 2:]))


def reconstruction_error(outputs: list[torch.Tensor], targets: list[torch.Tensor], guidance: float | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(plain, guided)``: the mean squared error of the unit's outputs, and with ``guidance`` (a CFG-paired
    call) that error plus ``g² ·`` the mean squared difference of the two halves' errors (each output whose
    batch is even; ``guided = plain`` without ``guidance``)."""
    errors = [q - f for q, f in zip(outputs, targets)]
    plain = guided = sum(e.pow(2).mean() for e in errors)
    if guidance is None:
        return plain, guided
    for e in errors:
        if e.dim() and e.shape[0] % 2 == 0:
            half = e.shape[0] // 2
            guided = guided + guidance ** 2 * (e[:half] - e[half:]).pow(2).mean()
    return plain, guided


def _optimize(unit, layers: list[QuantLayer], scales: list[nn.Parameter], gains: list[nn.Parameter], fp, qin,
              r: ReconstructionConfig, table, guidance: list[float | None]) -> tuple[float, float]:
    """``scales``: activation scales; ``gains``: log-ratios of learned weight scales (relative steps of
    ``act_learning_rate``). ``guidance[i]``: the CFG scale whose guided error call ``i`` is fitted for (None: the
    plain error)."""
    quantizers = [q for layer in layers for q in layer.weight_quantizers]
    rounding = [q.start_rounding(w) for layer in layers
                for q, w in zip(layer.weight_quantizers, layer.weight_parts(layer.weight))]
    groups = [{"params": rounding, "lr": r.learning_rate}]
    for s in scales:  # relative steps: each scale moves by about act_learning_rate of itself per iteration
        groups.append({"params": [s], "lr": r.act_learning_rate * float(s.detach().abs().mean())})
    if gains:
        groups.append({"params": gains, "lr": r.act_learning_rate})
    opt = torch.optim.Adam(groups)
    first = last = 0.0
    norm = None  # the guided loss scaled to the plain one on the first guided call (keeps its balance with the
    # regulariser); calls without guidance keep the plain loss
    for step in range(r.iterations):
        i = random.randrange(len(qin))
        rec, fitted = _call_error(unit, qin[i], fp[i][3], table, guidance[i])
        if guidance[i] is not None:
            if norm is None:
                norm = float(rec.detach()) / max(float(fitted.detach()), 1e-30)
            fitted = fitted * norm
        beta = annealed_beta(step, r.iterations, r.warmup, r.beta_start, r.beta_end)
        loss = fitted if beta is None else fitted + r.reg_weight * sum(q.rounding_loss(beta) for q in quantizers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for s in scales:
            s.data.clamp_(min=1e-8)
        last = float(rec.detach())
        first = last if step == 0 else first
    return first, last


def _scale_learners(layers: list[QuantLayer], r: ReconstructionConfig) -> list:
    """The weight quantizers whose scales the unit learns: none without ``learn_weight_scales``, else those of at
    most ``weight_scale_max_bits`` bits (finer grids keep their starting scales)."""
    if not r.learn_weight_scales:
        return []
    return [q for layer in layers for q in layer.weight_quantizers if q.bits <= r.weight_scale_max_bits]


def reconstruct(denoiser: nn.Module, r: ReconstructionConfig, adapter: DenoiserAdapter,
                calls: Iterable[tuple[tuple, dict]], learn_act_scales: bool, seed: int = 0,
                progress: bool = True, guidance_scale: float | None = None) -> dict:
    """Learn the rounding of every unit's weights (and its activation scales); returns a short report.
    ``guidance_scale``: the calibration run's CFG scale (``r.guided`` fits CFG-paired calls for it)."""
    calls = list(calls)
    stride = max(1, len(calls) // r.num_samples)
    sample = calls[::stride][: r.num_samples]
    g = r.guidance_scale if r.guidance_scale is not None else guidance_scale
    guidance = [g if r.guided and g is not None and cfg_paired(a, k) else None for a, k in sample]
    random.seed(seed)
    torch.manual_seed(seed)
    table = time_table(denoiser)
    set_activation_mode(denoiser, "quant")
    units = _units(denoiser, r, adapter, sample[0])
    losses, refits, fallbacks = [], [], []
    for name, unit in tqdm(units, desc="calibration: reconstruction", disable=not progress):
        with torch.no_grad():
            with full_precision(denoiser):
                fp = capture(denoiser, unit, sample, with_output=True)
            qin = capture(denoiser, unit, sample, with_output=False)
        layers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
        act_qs = [q for q in activation_quantizers(unit) if q.static] if learn_act_scales else []
        learners = _scale_learners(layers, r)
        start = [(q, q.scale.detach().clone()) for q in [*act_qs, *learners]]
        nearest = unit_error(unit, fp, qin, table)  # round to nearest, the starting scales
        fit = _fit_unit(unit, layers, act_qs, learners, fp, qin, r, table, guidance)
        if not fit[2] <= nearest and start:  # the fit diverged: undo it, then learn the rounding alone
            _restore(layers, start)
            fit = _fit_unit(unit, layers, [], [], fp, qin, r, table, guidance)
            refits.append(name)
        if not fit[2] <= nearest:  # still worse than where it started: round to nearest
            _restore(layers, start)
            fallbacks.append(name)
        losses.append((name, fit[0], fit[1]))
    return {"unit": r.unit, "units": len(units), "samples": len(sample), "iterations": r.iterations,
            "guided_samples": sum(x is not None for x in guidance), "guidance_scale": g if r.guided else None,
            "mean_loss_first": _mean([b for _, b, _ in losses]), "mean_loss_last": _mean([a for _, _, a in losses]),
            "refits": refits, "fallbacks": fallbacks}


def _fit_unit(unit: nn.Module, layers: list[QuantLayer], act_qs: list, learners: list, fp, qin,
              r: ReconstructionConfig, table, guidance: list[float | None]) -> tuple[float, float, float]:
    """Learn the unit's rounding (and the scales of ``act_qs`` and ``learners``), harden it; ``(first loss, last
    loss, the hardened error on the recorded calls)``."""
    with _NoParamGrads(unit), ExitStack() as stack:
        scales = [stack.enter_context(q.learnable_scale()) for q in act_qs]
        gains = [stack.enter_context(q.learnable_scale()) for q in learners]
        before, after = _optimize(unit, layers, scales, gains, fp, qin, r, table, guidance)
    for layer in layers:
        for q, w in zip(layer.weight_quantizers, layer.weight_parts(layer.weight)):
            q.harden_rounding(w)
        layer.refresh_weight()
    return before, after, unit_error(unit, fp, qin, table)


@torch.no_grad()
def unit_error(unit: nn.Module, fp, qin, table) -> float:
    """The unit's mean squared output error over the recorded calls, as it quantizes now (hard codes)."""
    return sum(float(_call_error(unit, call, target[3], table, None)[0]) for call, target in zip(qin, fp)) / max(1, len(qin))


def _call_error(unit: nn.Module, call: tuple, targets: list[torch.Tensor], table, guidance: float | None):
    """``reconstruction_error`` of the unit on one recorded call (its timestep set in the time table)."""
    args, kwargs, t, _ = call
    if table is not None and t is not None:
        table.set_timestep(t)
    return reconstruction_error(_tensors(unit(*args, **kwargs)), targets, guidance)


@torch.no_grad()
def _restore(layers: list[QuantLayer], start: list[tuple]) -> None:
    """Back to the unit's starting point: its quantizers' starting scales, weights rounded to nearest."""
    for q, scale in start:
        q.scale = scale
    for layer in layers:
        for q in layer.weight_quantizers:
            q.fixed_codes = None
        layer.refresh_weight()


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0
