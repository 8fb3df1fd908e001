"""Time as one object: :class:`TimeTable` holds the timesteps a denoiser's tables are indexed by
(its keys), the lookup policy, and the current step.

A denoiser that has time-conditioned quantizers gets exactly one table (``TimeTable.install``): a
forward pre-hook writes each call's timestep into it, and every quantizer built for that denoiser
receives the same object in its constructor and only indexes its own ``[K]`` scale tables with
``table.index()``. Noise correction (PTQD, step bias) keeps its statistics in a table of its own
keys, with the ``exact`` policy. Keys may be floats (flow-matching schedulers): a timestep matches a
key when it lies within half of the smallest gap between keys (and within 0.5).

Under ``torch.compile`` the pre-hook is traced with the denoiser: the current entry is then a 0-d long
tensor computed in the graph (the nearest key, an argmin), not a Python int, so one compiled graph
serves every timestep (no recompile per step). A compiled call cannot raise or warn on its data: it
neither checks that the batch has one timestep (it reads the first) nor warns about a timestep outside
the calibrated schedule (it takes the nearest key, as the eager ``nearest`` policy does).

The range MLP of TDQ (``mode: learned``) and the grouping of steps into intervals live here too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from dmquant.errors import DMQuantError

POLICIES = ("nearest", "exact")
_MAX_TOLERANCE = 0.5


def single_timestep(timestep) -> float:
    """The one timestep of a denoiser call (a number, or a tensor whose entries are all equal)."""
    if isinstance(timestep, torch.Tensor):
        flat = timestep.detach().reshape(-1).double()
        if flat.numel() == 0:
            raise DMQuantError("the denoiser was called with an empty timestep tensor")
        if flat.numel() > 1 and not torch.all(flat == flat[0]):
            raise DMQuantError("time-conditioned quantizers need one timestep per denoiser call, got a batch of "
                               "different timesteps: call the denoiser once per timestep")
        return float(flat[0])
    if isinstance(timestep, (int, float)):
        return float(timestep)
    raise DMQuantError(f"cannot read a timestep from {type(timestep).__name__}")


class TimeTable:
    """Keys (timesteps, float64), the lookup policy, and the timestep of the current denoiser call."""

    def __init__(self, keys=(), policy: str = "nearest", what: str = "time-conditioned quantizers"):
        if policy not in POLICIES:
            raise DMQuantError(f"unknown time-table policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.policy, self.what = policy, what
        self.timestep: float | None = None
        self._index: int | None = None
        self._warned = False
        self.set_keys(keys)

    def __deepcopy__(self, memo) -> TimeTable:
        """A copy of a layer or of a whole denoiser shares the table: its pre-hook (whose closure is not
        copied) keeps writing the current step into this one object."""
        return self

    def set_keys(self, keys) -> None:
        self.keys = torch.as_tensor(keys, dtype=torch.float64).reshape(-1).cpu()
        gaps = self.keys.sort().values.diff().abs()
        gap = float(gaps.min()) if gaps.numel() else 2 * _MAX_TOLERANCE
        self.tolerance = min(_MAX_TOLERANCE, gap / 2)
        self._index = None

    def __len__(self) -> int:
        return int(self.keys.numel())

    def lookup(self, timestep) -> int:
        """Index of the key nearest to ``timestep`` (``exact`` policy: DMQuantError unless it matches)."""
        if not len(self):
            raise DMQuantError(f"the timestep table of the {self.what} is empty: calibrate first")
        t = single_timestep(timestep)
        distance = (self.keys - t).abs()
        index = int(distance.argmin())
        if distance[index] <= self.tolerance:
            return index
        shown = ", ".join(f"{k:g}" for k in self.keys.tolist()[:6])
        if self.policy == "exact":
            raise DMQuantError(f"the {self.what} were fitted for the timesteps {shown}... ({len(self)} steps) and do "
                               f"not contain timestep {t:g}: generate with the same scheduler and number of steps, "
                               "or calibrate again for this schedule")
        if not self._warned:
            self._warned = True
            warnings.warn(f"timestep {t:g} is not in the calibrated schedule ({shown}...; {len(self)} steps): the "
                          f"{self.what} use the nearest calibrated step (warned once; calibrate with this scheduler "
                          "and number of steps to avoid it)", stacklevel=2)
        return index

    def set_timestep(self, timestep) -> None:
        if torch.compiler.is_compiling():
            self._set_timestep_traced(timestep)
            return
        self.timestep = single_timestep(timestep)
        self._index = self.lookup(self.timestep) if len(self) else None

    def _set_timestep_traced(self, timestep) -> None:
        """``set_timestep`` inside a compiled region (see :meth:`traced_lookup`)."""
        self._index = self.traced_lookup(timestep) if len(self) else None

    def traced_lookup(self, timestep) -> torch.Tensor:
        """The index of the key nearest to ``timestep`` (of a batch: its first entry) as a 0-d long tensor,
        by graph ops only (what a compiled call uses instead of :meth:`lookup`: no check, no warning). A
        tensor timestep keeps one graph for every step; a Python number is a constant of the graph."""
        t = torch.as_tensor(timestep).detach().reshape(-1)[0]
        keys = self.keys.to(t.device)
        return (keys - t.to(keys.dtype)).abs().argmin()

    def index(self) -> int | torch.Tensor:
        """The table entry of the current denoiser call (a 0-d long tensor inside ``torch.compile``)."""
        if self._index is None:
            raise DMQuantError(f"the {self.what} ran outside a denoiser call (no timestep seen) or before their "
                               "table had keys: call the denoiser itself, whose pre-hook reads the timestep")
        return self._index

    def install(self, model: nn.Module, read_timestep: Callable[[tuple, dict], object]) -> TimeTable:
        """Register the pre-hook that writes each call's timestep into this table; returns ``self``."""
        model.register_forward_pre_hook(lambda _m, args, kwargs: self.set_timestep(read_timestep(args, kwargs)),
                                        with_kwargs=True)
        return self


def take(values: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
    """``values[index]`` for an index of :meth:`TimeTable.index` (a 0-d tensor one inside ``torch.compile``:
    gathered by ``index_select``, which keeps the index a tensor in the graph instead of a number)."""
    if isinstance(index, torch.Tensor):
        return values.index_select(0, index.reshape(1).to(values.device)).squeeze(0)
    return values[index]


def interval_groups(num_keys: int, num_intervals: int) -> list[int]:
    """Group id of each of ``num_keys`` ordered keys, cut into ``num_intervals`` contiguous intervals."""
    n = max(1, min(num_intervals, num_keys))
    return [min(n - 1, i * n // num_keys) for i in range(num_keys)]


def nearest_filled(groups_filled: list[bool], group: int) -> int:
    """The nearest group (by id) that holds data; ``group`` itself when it does."""
    candidates = [g for g, ok in enumerate(groups_filled) if ok]
    if not candidates:
        raise DMQuantError("no timestep group received calibration data")
    return min(candidates, key=lambda g: (abs(g - group), g))


def fourier_features(t: torch.Tensor, num_frequencies: int, max_timestep: float = 1000.0) -> torch.Tensor:
    """``[t/T, sin(2^k pi t/T), cos(2^k pi t/T)]`` for k < num_frequencies: shape ``[len(t), 2F + 1]``."""
    u = t.double().reshape(-1, 1) / max_timestep
    angles = u * (2.0 ** torch.arange(num_frequencies, dtype=torch.float64)) * math.pi
    return torch.cat([u, angles.sin(), angles.cos()], dim=1).float()


class RangeMLP(nn.Module):
    """TDQ: the clipping range ``(lo, hi)`` of an activation as a function of the timestep.

    ``(lo, hi) = base_lo * exp(a(t)), base_hi * exp(b(t))`` where ``(a, b)`` is a 2-layer MLP over
    Fourier features of t; ``base`` is the range over all timesteps (so an untrained MLP gives it).
    """

    def __init__(self, num_frequencies: int, hidden: int):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.net = nn.Sequential(nn.Linear(2 * num_frequencies + 1, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.register_buffer("base", torch.zeros(2))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_ratio = self.net(fourier_features(t, self.num_frequencies).to(self.base.device))
        return self.base[0] * log_ratio[:, 0].exp(), self.base[1] * log_ratio[:, 1].exp()

    def fit(self, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, iterations: int) -> float:
        """Fit to per-timestep ranges (least squares on the range, relative to its span); returns the loss."""
        span = (hi - lo).abs().max().clamp_min(1e-8)
        self.base = torch.stack([lo.min(), hi.max()]).float()
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        loss = torch.zeros(())
        with torch.enable_grad():
            for _ in range(iterations):
                p_lo, p_hi = self(t)
                loss = (((p_lo - lo) / span) ** 2 + ((p_hi - hi) / span) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return float(loss)
