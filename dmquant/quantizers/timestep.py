"""Time-conditioned quantization: tables of scales indexed by the denoising timestep.

A :class:`TimestepState` is shared by every time-conditioned quantizer of one denoiser. A forward
pre-hook on the denoiser (``dmquant.nn.timestep``) writes the current timestep into it once per call;
the state turns it into the index of the table entry (``index``), so each quantizer only indexes its
tables. The math (lookup, grouping of steps, Fourier features, range MLP) lives here as functions.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from dmquant.errors import DMQuantError

_MATCH_TOLERANCE = 0.5  # timesteps are integers in every diffusers scheduler we know; DDIM may give floats


def lookup_index(keys: torch.Tensor, t: float) -> tuple[int, bool]:
    """Index of the entry of ``keys`` nearest to ``t`` and whether it matches (within half a step)."""
    if keys.numel() == 0:
        raise DMQuantError("a time-conditioned quantizer has an empty timestep table: calibrate it first")
    distance = (keys.double() - float(t)).abs()
    index = int(distance.argmin())
    return index, bool(distance[index] <= _MATCH_TOLERANCE)


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


class TimestepState:
    """The current timestep of one denoiser, shared by its time-conditioned quantizers."""

    def __init__(self, keys: torch.Tensor | None = None):
        self.keys = torch.empty(0) if keys is None else keys.detach().double().cpu()
        self.timestep: float | None = None
        self.index: int | None = None
        self._warned = False

    def set_keys(self, keys) -> None:
        self.keys = torch.as_tensor(keys, dtype=torch.float64).reshape(-1).cpu()
        self.index = None

    def set_timestep(self, timestep) -> None:
        self.timestep = single_timestep(timestep)
        if self.keys.numel() == 0:
            self.index = None
            return
        self.index, exact = lookup_index(self.keys, self.timestep)
        if not exact and not self._warned:
            self._warned = True
            warnings.warn(f"timestep {self.timestep:g} is not in the calibrated schedule "
                          f"({self.keys.min():g}..{self.keys.max():g}, {self.keys.numel()} steps): using the "
                          "nearest calibrated step's ranges (warned once; calibrate with this scheduler and "
                          "number of steps to avoid it)", stacklevel=2)

    def current_index(self) -> int:
        if self.index is None:
            raise DMQuantError("a time-conditioned quantizer ran outside a denoiser call (no timestep seen): "
                               "call the denoiser itself, whose pre-hook reads the timestep")
        return self.index


def fourier_features(t: torch.Tensor, num_frequencies: int, max_timestep: float = 1000.0) -> torch.Tensor:
    """``[sin(2^k pi t/T), cos(2^k pi t/T)]`` for k < num_frequencies, plus ``t/T``: shape ``[len(t), 2F + 1]``."""
    u = t.double().reshape(-1, 1) / max_timestep
    freqs = (2.0 ** torch.arange(num_frequencies, dtype=torch.float64)) * math.pi
    angles = u * freqs
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
        log_ratio = self.net(fourier_features(t, self.num_frequencies))
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
