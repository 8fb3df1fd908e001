"""Quantizer modules: they hold scales and zero points (buffers) and fake-quantize tensors.

* :class:`WeightQuantizer` is calibrated once from the weight it quantizes.
* :class:`ActQuantizer` is either static (a range observed on calibration data, per tensor) or
  dynamic (per token, computed on the fly). Its ``mode`` is ``"off"`` (pass-through),
  ``"observe"`` (record statistics, pass-through) or ``"quant"``. A static quantizer given a
  :class:`~dmquant.config.TimeConditioningConfig` keeps one scale per calibrated timestep
  (``scale``/``zero_point`` of shape ``[K]`` beside ``timesteps``) and reads the entry of the current
  step from a shared :class:`~dmquant.quantizers.timestep.TimestepState`.
* :class:`SplitActQuantizer` / :class:`SplitWeightQuantizer`: two quantizers on the two parts of a
  tensor cut at a channel index (Q-Diffusion's shortcut splitting); they know only the index.
"""

from __future__ import annotations

import torch
from torch import nn

from dmquant.config import ActQuantConfig, TimeConditioningConfig, WeightQuantConfig
from dmquant.errors import DMQuantError
from dmquant.formats import IntFormat
from dmquant.quantizers.affine import fake_quant, fake_quant_inference, qparams_from_range, quantize
from dmquant.quantizers.granularity import dynamic_rows, from_dynamic_rows, from_rows, to_rows
from dmquant.quantizers.observer import RangeObserver
from dmquant.quantizers.ranges import estimate_range
from dmquant.quantizers.timestep import RangeMLP, TimestepState, interval_groups, lookup_index, nearest_filled

MODES = ("off", "observe", "quant")
TIME_OBSERVER_CAPACITY = 1 << 13  # per observed timestep: tables keep many observers


class _ResizableBuffers(nn.Module):
    """Buffers that take the shape of the state dict being loaded (scales are sized at calibration)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in list(self._buffers.items()):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and buf is not None and buf.shape != incoming.shape:
                self._buffers[name] = torch.empty_like(incoming, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WeightQuantizer(_ResizableBuffers):
    def __init__(self, config: WeightQuantConfig):
        super().__init__()
        self.config = config
        self.fmt = IntFormat(config.bits, signed=True, narrow=config.symmetric)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return to_rows(weight, self.config.granularity, self.config.group_size)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        c = self.config
        lo, hi = estimate_range(self.rows(weight), c.method, self.fmt, c.symmetric, c.percentile)
        scale, zero = qparams_from_range(lo, hi, self.fmt, c.symmetric)
        self.scale, self.zero_point = scale.to(weight.dtype), zero.to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise DMQuantError("a weight quantizer was used before calibration: call calibrate(weight) first")
        rows = fake_quant(self.rows(weight), self.scale[:, None], self.zero_point[:, None], self.fmt)
        return from_rows(rows, weight, self.config.granularity)

    @torch.no_grad()
    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight's integer codes (int8 tensor), shaped as the weight."""
        rows = quantize(self.rows(weight), self.scale[:, None], self.zero_point[:, None], self.fmt)
        return from_rows(rows, weight, self.config.granularity).to(torch.int8)


class ActQuantizer(_ResizableBuffers):
    def __init__(self, config: ActQuantConfig, channel_dim: int = -1, signed: bool | None = None,
                 time: TimeConditioningConfig | None = None):
        super().__init__()
        self.config = config
        self.channel_dim = channel_dim
        signed = config.symmetric if signed is None else signed
        self.fmt = IntFormat(config.bits, signed=signed, narrow=False)
        self.mode = "off"
        self.observer: RangeObserver | None = None
        self.time = time if config.static else None
        self.time_state: TimestepState | None = None
        self.time_observers: dict[float, RangeObserver] = {}
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        if self.time is not None:
            self.register_buffer("timesteps", torch.empty(0))
            self.range_mlp = RangeMLP(self.time.embedding_dim, self.time.hidden_dim) if self.time.mode == "learned" else None

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise DMQuantError(f"unknown quantizer mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "observe" and self.config.static and self.observer is None:
            self.observer = RangeObserver()
        self.mode = mode

    @property
    def time_conditioned(self) -> bool:
        return self.time is not None

    @property
    def learned(self) -> bool:
        """Whether a range MLP (TDQ) gives the table, so it can be recomputed for other timesteps."""
        return self.time is not None and self.time.mode == "learned"

    @property
    def calibrated(self) -> bool:
        return not self.config.static or self.scale.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.config.static:
                self._observer_now().update(x.detach().reshape(1, -1))
            return x
        if not self.config.static:
            return self._dynamic(x)
        if not self.calibrated:
            raise DMQuantError("an activation quantizer has no range: run calibration before quantized inference")
        scale, zero = self.current_qparams()
        if x.requires_grad or scale.requires_grad:
            return fake_quant(x, scale, zero, self.fmt)
        return fake_quant_inference(x, scale, zero, self.fmt)

    def current_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point in force now (the current timestep's entry for a table)."""
        if self.scale.ndim == 0:
            return self.scale, self.zero_point
        index = self._state().current_index()
        return self.scale[index], self.zero_point[index]

    def _state(self) -> TimestepState:
        if self.time_state is None:
            raise DMQuantError("a time-conditioned quantizer has no timestep source: install the timestep hook "
                               "(dmquant.nn.timestep.install_timestep_hook) on its denoiser")
        return self.time_state

    def _observer_now(self) -> RangeObserver:
        if self.time is None:
            return self.observer
        t = self._state().timestep
        if t is None:
            raise DMQuantError("a time-conditioned quantizer observed data outside a denoiser call")
        if t not in self.time_observers:
            self.time_observers[t] = RangeObserver(capacity=TIME_OBSERVER_CAPACITY, seed=int(t * 1000) % (1 << 31))
        return self.time_observers[t]

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        rows = dynamic_rows(x, self.config.granularity, self.config.group_size, self.channel_dim)
        lo, hi = rows.detach().amin(dim=1), rows.detach().amax(dim=1)
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.config.symmetric)
        q = fake_quant(rows, scale[:, None], zero[:, None], self.fmt)
        return from_dynamic_rows(q, x, self.channel_dim)

    def _range_of(self, obs: RangeObserver) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        rows = obs.sample if c.method != "minmax" else obs.lo[:, None]
        return estimate_range(rows, c.method, self.fmt, c.symmetric, c.percentile, extremes=(obs.lo, obs.hi))

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed statistics into a scale and zero point; free the statistics."""
        if not self.config.static:
            return
        if self.time is not None:
            return self._finalize_table()
        if self.observer is None or self.observer.empty:
            raise DMQuantError(
                "an activation quantizer saw no data during calibration: the layer never ran on the "
                "calibration inputs; exclude it or check the calibration prompts"
            )
        lo, hi = self._range_of(self.observer)
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.config.symmetric)
        self.scale, self.zero_point = scale.reshape(()), zero.reshape(())
        self.observer = None

    def _finalize_table(self) -> None:
        if not self.time_observers:
            raise DMQuantError("a time-conditioned activation quantizer saw no data during calibration: the layer "
                               "never ran on the calibration inputs; exclude it or check the calibration prompts")
        observed = sorted(self.time_observers)
        state_keys = self._state().keys
        keys = state_keys if state_keys.numel() else torch.tensor(observed, dtype=torch.float64)
        if self.time.mode == "learned":
            lo, hi = self._learned_table(observed, keys)
        else:
            lo, hi = self._grouped_table(observed, keys)
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.config.symmetric)
        self.scale, self.zero_point = scale.reshape(-1), zero.reshape(-1)
        self.timesteps = keys.float().clone()
        self.time_observers, self.observer = {}, None

    def _grouped_table(self, observed: list[float], keys: torch.Tensor):
        """One range per group of keys (a group per step, or contiguous intervals); empty groups borrow."""
        per_step = self.time.mode == "step"
        groups = list(range(len(keys))) if per_step else interval_groups(len(keys), self.time.num_intervals)
        merged: dict[int, RangeObserver] = {}
        for t in observed:
            g = groups[lookup_index(keys, t)[0]]
            merged.setdefault(g, RangeObserver(capacity=TIME_OBSERVER_CAPACITY * 4)).merge(self.time_observers[t])
        num_groups = max(groups) + 1
        ranges = {g: self._range_of(obs) for g, obs in merged.items()}
        filled = [g in ranges for g in range(num_groups)]
        picked = [ranges[nearest_filled(filled, groups[k])] for k in range(len(keys))]
        return torch.cat([p[0] for p in picked]), torch.cat([p[1] for p in picked])

    def _learned_table(self, observed: list[float], keys: torch.Tensor):
        """TDQ: fit the range MLP to the per-timestep ranges, then evaluate it at the keys."""
        ranges = [self._range_of(self.time_observers[t]) for t in observed]
        lo, hi = torch.cat([r[0] for r in ranges]), torch.cat([r[1] for r in ranges])
        t = torch.tensor(observed, dtype=torch.float32)
        self.range_mlp.fit(t, lo.float(), hi.float(), self.time.iterations)
        return self.range_mlp(keys.float())

    @torch.no_grad()
    def retable(self, keys: torch.Tensor) -> None:
        """Re-evaluate a learned (TDQ) table for new timesteps, e.g. another scheduler's steps."""
        if self.time is None or self.time.mode != "learned":
            raise DMQuantError("only time.mode='learned' quantizers can compute ranges for new timesteps")
        lo, hi = self.range_mlp(keys.float())
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.config.symmetric)
        self.scale, self.zero_point = scale.reshape(-1), zero.reshape(-1)
        self.timesteps = keys.float().clone()


class SplitActQuantizer(nn.Module):
    """Two activation quantizers for the parts ``x[:, :split]`` and ``x[:, split:]`` along ``channel_dim``."""

    def __init__(self, parts: tuple[ActQuantizer, ActQuantizer], split: int, channel_dim: int):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.split, self.channel_dim = int(split), channel_dim
        self.config = parts[0].config

    @property
    def mode(self) -> str:
        return self.parts[0].mode

    @property
    def calibrated(self) -> bool:
        return all(p.calibrated for p in self.parts)

    def set_mode(self, mode: str) -> None:
        for p in self.parts:
            p.set_mode(mode)

    def finalize(self) -> None:
        for p in self.parts:
            p.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = split_channels(x, self.split, self.channel_dim)
        return torch.cat([self.parts[0](a), self.parts[1](b)], dim=self.channel_dim)


class SplitWeightQuantizer(nn.Module):
    """Two weight quantizers for the input-channel parts ``W[:, :split]`` and ``W[:, split:]``."""

    def __init__(self, config: WeightQuantConfig, split: int):
        super().__init__()
        self.config = config
        self.split = int(split)
        self.parts = nn.ModuleList([WeightQuantizer(config), WeightQuantizer(config)])

    @property
    def calibrated(self) -> bool:
        return all(p.calibrated for p in self.parts)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        for part, w in zip(self.parts, split_channels(weight, self.split, 1)):
            part.calibrate(w)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = split_channels(weight, self.split, 1)
        return torch.cat([self.parts[0](a), self.parts[1](b)], dim=1)


def split_channels(x: torch.Tensor, split: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` cut at index ``split`` along ``dim`` (DMQuantError if the index is not inside)."""
    size = x.shape[dim]
    if not 0 < split < size:
        raise DMQuantError(f"split index {split} is not inside the {size} channels of the tensor")
    return x.narrow(dim, 0, split), x.narrow(dim, split, size - split)
