"""The activation quantizer: static (a range observed on calibration data, per tensor, optionally
one per timestep through a :class:`~dmquant.quantizers.timetable.TimeTable`) or dynamic (per token, per
group of channels or per sample, computed on the fly). It takes numbers and formats, never config objects.

``mode`` is ``"off"`` (pass-through), ``"observe"`` (record statistics, pass-through) or ``"quant"``.
Observers are made when observation starts (``set_mode("observe")``: one per table key for a
time-conditioned quantizer, so the table's keys must be set first) and dropped by ``finalize``.

``number_format="fp8_e4m3"`` rounds to float8 e4m3 instead of an integer grid (symmetric: the scale is
``amax / 448`` of the tensor, or of each token when dynamic, computed in float32).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from dmquant.errors import DMQuantError
from dmquant.formats import format_named, is_float
from dmquant.quantizers.affine import fake_quant, fake_quant_inference, qparams_from_range
from dmquant.quantizers.base import FormatQuantizer
from dmquant.quantizers.granularity import dynamic_rows, from_dynamic_rows
from dmquant.quantizers.observer import RangeObserver
from dmquant.quantizers.ranges import estimate_range, mse_range
from dmquant.quantizers.timetable import RangeMLP, TimeTable, interval_groups, nearest_filled, take

MODES = ("off", "observe", "quant")
TABLE_MODES = ("step", "interval", "learned")
TIME_OBSERVER_CAPACITY = 1 << 13  # per timestep: tables keep many observers
# values per side each per-step observer keeps exactly (RangeObserver.strata): 8,192 sampled values miss the outliers
# an MSE range must weigh (per-step tables lost 1.6-2.8 dB to one pooled range on the flow models without them); the
# pooled observer's 65,536 values hold them well enough (eval/RESULTS.md, "Per-step tables on flow models")
TIME_OBSERVER_TAIL = 256


class ActQuantizer(FormatQuantizer):
    """``table`` (static only) gives one range per timestep key: ``table_mode`` ``step`` (one per key),
    ``interval`` (``num_intervals`` contiguous groups of keys) or ``learned`` (TDQ: a range MLP of
    ``mlp = (num_frequencies, hidden)`` fitted for ``mlp_iterations``)."""

    def __init__(self, bits: int = 8, *, symmetric: bool = False, signed: bool | None = None,
                 granularity: str = "tensor", group_size: int | None = None, method: str = "minmax",
                 percentile: float = 99.99, channel_dim: int = -1, table: TimeTable | None = None,
                 table_mode: str = "step", num_intervals: int = 4, mlp: tuple[int, int] | None = None,
                 mlp_iterations: int = 300, number_format: str = "int"):
        super().__init__(format_named(number_format, bits, signed=symmetric if signed is None else signed),
                         symmetric, "activations")
        self.symmetric, self.granularity, self.group_size = symmetric, granularity, group_size
        self.method, self.percentile, self.channel_dim = method, percentile, channel_dim
        self.table = table if self.static else None
        if self.table is not None and table_mode not in TABLE_MODES:
            raise DMQuantError(f"unknown time mode {table_mode!r}: use one of {', '.join(TABLE_MODES)}")
        self.table_mode, self.num_intervals, self.mlp_iterations = table_mode, num_intervals, mlp_iterations
        self.range_mlp = RangeMLP(*mlp) if self.table is not None and table_mode == "learned" else None
        self.mode = "off"
        self.observers: list[RangeObserver] = []

    @property
    def static(self) -> bool:
        return self.granularity == "tensor"

    @property
    def learned(self) -> bool:
        return self.range_mlp is not None

    @property
    def calibrated(self) -> bool:
        return not self.static or self.scale.numel() > 0

    # -- description (saving and loading) ----------------------------------------------------------------
    def spec(self) -> dict:
        mlp = None if self.range_mlp is None else [self.range_mlp.num_frequencies, self.range_mlp.net[0].out_features]
        return {"bits": self.bits, "signed": self.fmt.signed, "symmetric": self.symmetric,
                "granularity": self.granularity, "group_size": self.group_size, "channel_dim": self.channel_dim,
                "table": self.table is not None, "mlp": mlp, "format": self.number_format}

    @classmethod
    def from_spec(cls, spec: dict, table: TimeTable | None, device="meta") -> ActQuantizer:
        """An empty quantizer in the quant state, buffers shaped for the saved state dict."""
        if spec["table"] and table is None:
            raise DMQuantError("a saved time-conditioned quantizer has no timestep keys: the folder is damaged; "
                               "save it again")
        q = cls(spec["bits"], symmetric=spec["symmetric"], signed=spec["signed"], granularity=spec["granularity"],
                group_size=spec["group_size"], channel_dim=spec["channel_dim"],
                table=table if spec["table"] else None, table_mode="learned" if spec["mlp"] else "step",
                mlp=tuple(spec["mlp"]) if spec["mlp"] else None,
                number_format=spec.get("format", "int"))  # "format" is new in dmquant 0.2's format 4
        shape = (len(table),) if spec["table"] else ()
        if q.static:
            q.scale, q.zero_point = torch.empty(shape, device=device), torch.empty(shape, device=device)
        q.mode = "quant"
        return q.to(device)

    # -- states ------------------------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise DMQuantError(f"unknown quantizer mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "observe" and self.static and not self.observers:
            self.observers = self._new_observers()
        self.mode = mode

    def _new_observers(self) -> list[RangeObserver]:
        if self.table is None:
            return [RangeObserver()]
        if not len(self.table):
            raise DMQuantError("a time-conditioned quantizer cannot observe before its table has keys: set the "
                               "timesteps of the calibration run first")
        return [RangeObserver(capacity=TIME_OBSERVER_CAPACITY, seed=int(k * 1000) % (1 << 31), tail=TIME_OBSERVER_TAIL)
                for k in self.table.keys.tolist()]

    def freeze(self) -> None:
        """The frozen state: quantize always, keep no calibration statistics."""
        if not self.calibrated:
            raise DMQuantError("an activation quantizer has no range: calibrate before freezing")
        self.observers, self.mode = [], "quant"

    # -- computation -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.static:
                index = 0 if self.table is None else self.table.index()
                self.observers[index].update(x.detach().reshape(1, -1))
            return x
        if not self.static:
            return self._dynamic(x)
        scale, zero = self.current_qparams()
        if x.requires_grad or scale.requires_grad:
            return fake_quant(x, scale, zero, self.fmt)
        return fake_quant_inference(x, scale, zero, self.fmt)

    def current_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point in force now (the current timestep's entry for a table)."""
        if not self.calibrated:
            raise DMQuantError("an activation quantizer has no range: run calibration before quantized inference")
        if self.table is None:
            return self.scale, self.zero_point
        index = self.table.index()
        return take(self.scale, index), take(self.zero_point, index)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """Scales and codes in float32 whatever ``x``'s dtype (as the fused GPU kernels compute them: a
        16-bit scale would move near-tie codes), the result in ``x``'s dtype."""
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        rows = dynamic_rows(wide, self.granularity, self.group_size, self.channel_dim)
        lo, hi = rows.detach().amin(dim=1), rows.detach().amax(dim=1)
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.symmetric)
        out = from_dynamic_rows(fake_quant(rows, scale[:, None], zero[:, None], self.fmt), wide, self.granularity,
                                self.channel_dim)
        return out.to(x.dtype)

    # -- calibration -------------------------------------------------------------------------------------
    def _range_of(self, obs: RangeObserver) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "mse":  # the exact tails (per-step observers) and the sampled bulk (RangeObserver.strata)
            bulk, weight, tails = obs.strata()
            return mse_range(bulk.float(), self.fmt, self.symmetric, extremes=(obs.lo, obs.hi), tails=tails,
                             sample_weight=weight)
        rows = obs.sample if self.method != "minmax" else obs.lo[:, None]
        return estimate_range(rows, self.method, self.fmt, self.symmetric, self.percentile, extremes=(obs.lo, obs.hi))

    def _set_range(self, lo: torch.Tensor, hi: torch.Tensor, shape) -> None:
        scale, zero = qparams_from_range(lo, hi, self.fmt, self.symmetric)
        device = self.scale.device  # the module's device (statistics may live elsewhere)
        self.scale, self.zero_point = scale.reshape(shape).to(device), zero.reshape(shape).to(device)

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed statistics into a scale and zero point (a table); free the statistics."""
        if not self.static:
            return
        filled = [i for i, obs in enumerate(self.observers) if not obs.empty]
        if not filled:
            raise DMQuantError("an activation quantizer saw no data during calibration: the layer never ran on the "
                               "calibration inputs; exclude it or check the calibration prompts")
        if self.table is None:
            self._set_range(*self._range_of(self.observers[0]), ())
        elif self.learned:
            self._set_range(*self._learned_table(filled), -1)
        else:
            self._set_range(*self._grouped_table(), -1)
        self.observers = []

    def _grouped_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One range per group of keys (a group per key, or contiguous intervals); empty groups borrow."""
        n = len(self.table)
        groups = list(range(n)) if self.table_mode == "step" else interval_groups(n, self.num_intervals)
        merged: dict[int, RangeObserver] = {}
        for i, obs in enumerate(self.observers):
            if not obs.empty:
                merged.setdefault(groups[i], RangeObserver(capacity=TIME_OBSERVER_CAPACITY * 4,
                                                           tail=TIME_OBSERVER_TAIL)).merge(obs)
        ranges = {g: self._range_of(obs) for g, obs in merged.items()}
        filled = [g in ranges for g in range(max(groups) + 1)]
        picked = [ranges[nearest_filled(filled, groups[k])] for k in range(n)]
        return torch.cat([p[0] for p in picked]), torch.cat([p[1] for p in picked])

    def _learned_table(self, filled: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """TDQ: fit the range MLP to the per-timestep ranges, then evaluate it at the keys."""
        ranges = [self._range_of(self.observers[i]) for i in filled]
        lo, hi = torch.cat([r[0] for r in ranges]), torch.cat([r[1] for r in ranges])
        keys = self.table.keys.float()
        self.range_mlp.fit(keys[filled], lo.float(), hi.float(), self.mlp_iterations)
        return self.range_mlp(keys)

    @torch.no_grad()
    def retable(self, keys: torch.Tensor) -> None:
        """TDQ: the table for new timestep ``keys`` from the range MLP (the caller sets the TimeTable's keys)."""
        if not self.learned:
            raise DMQuantError("only time.mode='learned' quantizers can compute ranges for new timesteps")
        lo, hi = self.range_mlp(keys.float())
        self._set_range(lo.to(self.scale.device), hi.to(self.scale.device), -1)

    @contextmanager
    def learnable_scale(self):
        """Within the block ``scale`` is a Parameter (LSQ-style learning); a clamped buffer after it."""
        scale = nn.Parameter(self._buffers.pop("scale").detach().clone())
        self.scale = scale
        try:
            yield scale
        finally:
            self.register_buffer("scale", self._parameters.pop("scale").detach().clamp_min(1e-8))

    def extra_repr(self) -> str:
        time = f", table={self.table_mode}" if self.table is not None else ""
        fmt = ", fp8_e4m3" if is_float(self.fmt) else ""
        return f"bits={self.bits}{fmt}, {self.granularity}, mode={self.mode}{time}"
