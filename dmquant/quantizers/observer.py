"""Running statistics of activations seen during calibration.

Keeps the exact per-row extremes and a uniform random sample of all values seen (priority
sampling: every value gets a random key and the ``capacity`` smallest keys are kept), so that
percentile and MSE ranges can be estimated without holding every activation in memory.
"""

from __future__ import annotations

import torch


class RangeObserver:
    def __init__(self, capacity: int = 1 << 16, seed: int = 0):
        self.capacity = capacity
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
        other._prune()
        self._values = torch.cat([self._values, other._values])
        self._keys = torch.cat([self._keys, other._keys])
        self._prune()

    @property
    def sample(self) -> torch.Tensor:
        """A uniform random sample of the values seen, as one row."""
        self._prune()
        return self._values.reshape(1, -1)

    @property
    def empty(self) -> bool:
        return self.lo is None
