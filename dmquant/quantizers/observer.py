"""Running statistics of activations seen during calibration.

Keeps the exact per-row extremes and a uniform random sample of all values seen (priority
sampling: every value gets a random key and the ``capacity`` smallest keys are kept), so that
percentile and MSE ranges can be estimated without holding every activation in memory.

With ``tail`` set, a sample of one row also keeps its ``tail`` largest and ``tail`` smallest values
exactly: the few outliers that decide how much an MSE range may clip are rarely in a small uniform
sample (a per-step observer of a time table samples 8,192 values), and a sample without them judges
clipping cheap. :meth:`RangeObserver.strata` splits what was seen into those exact tails and the
sample of the bulk between them, each bulk value standing for ``weight`` values.
"""

from __future__ import annotations

import torch


class RangeObserver:
    def __init__(self, capacity: int = 1 << 16, seed: int = 0, tail: int = 0):
        self.capacity, self.tail = capacity, tail
        self._tail_lo, self._tail_hi = torch.empty(0), torch.empty(0)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self._values = torch.empty(0)
        self._keys = torch.empty(0)
        self._gen = torch.Generator().manual_seed(seed)
        self._threshold = 1.0
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.count += rows.numel()
        if rows.shape[0] == 1:
            self._add_sample(rows.reshape(-1))
            self._add_tails(rows.reshape(-1))

    def _add_tails(self, values: torch.Tensor) -> None:
        """Keep the ``tail`` largest and smallest values seen (only values beyond the current ones are sorted)."""
        if not self.tail:
            return
        full = self._tail_hi.numel() >= self.tail
        high = values[values > self._tail_hi.min()] if full else values
        low = values[values < self._tail_lo.max()] if full else values
        if high.numel():
            merged = torch.cat([self._tail_hi, high])
            self._tail_hi = merged.topk(min(self.tail, merged.numel())).values
        if low.numel():
            merged = torch.cat([self._tail_lo, low])
            self._tail_lo = merged.topk(min(self.tail, merged.numel()), largest=False).values

    def _add_sample(self, values: torch.Tensor) -> None:
        # Lazy pruning: keys above the largest kept key can never enter the sample, so they are dropped
        # at once, and the buffer is cut back to ``capacity`` only when it doubles (same sample, far fewer
        # top-k passes than pruning at every update).
        keys = torch.rand(values.numel(), generator=self._gen)
        if self._threshold < 1.0:
            keep = keys < self._threshold
            values, keys = values[keep], keys[keep]
        self._values = torch.cat([self._values, values])
        self._keys = torch.cat([self._keys, keys])
        if self._values.numel() > 2 * self.capacity:
            self._prune()

    def _prune(self) -> None:
        if self._values.numel() > self.capacity:
            keep = self._keys.topk(self.capacity, largest=False).indices
            self._values, self._keys = self._values[keep], self._keys[keep]
            self._threshold = float(self._keys.max())

    def merge(self, other: RangeObserver) -> None:
        """Add what ``other`` saw (exact extremes; the union of the two samples, thinned to capacity)."""
        if other.empty:
            return
        self.lo = other.lo.clone() if self.lo is None else torch.minimum(self.lo, other.lo)
        self.hi = other.hi.clone() if self.hi is None else torch.maximum(self.hi, other.hi)
        self.count += other.count
        self._add_tails(torch.cat([other._tail_lo, other._tail_hi]))
        other._prune()
        self._values = torch.cat([self._values, other._values])
        self._keys = torch.cat([self._keys, other._keys])
        self._prune()

    @property
    def sample(self) -> torch.Tensor:
        """A uniform random sample of the values seen, as one row."""
        self._prune()
        return self._values.reshape(1, -1)

    def strata(self) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """``(bulk, weight, tails)``: the exact tails (one row of the ``tail`` smallest and largest values; None when
        the sample holds every value seen, or without tails), the sampled values strictly between them (one row),
        and how many values seen each bulk value stands for."""
        sample = self.sample
        if self.count <= sample.numel() or not self._tail_hi.numel():
            return sample, 1.0, None
        tails = torch.cat([self._tail_lo, self._tail_hi])
        lo_cut, hi_cut = self._tail_lo.max(), self._tail_hi.min()
        bulk = sample[(sample > lo_cut) & (sample < hi_cut)]
        weight = (self.count - tails.numel()) / bulk.numel() if bulk.numel() else 0.0
        return bulk.reshape(1, -1), weight, tails.reshape(1, -1)

    @property
    def empty(self) -> bool:
        return self.lo is None
