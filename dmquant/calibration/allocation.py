"""Bit allocation under a byte budget: a multiple-choice knapsack on numbers (no tensors, no configs).

Each layer has options ``(cost, error)`` (bytes of its stored weight at one format, and the error that
format adds); a plan picks one option per layer so that the summed cost stays within the budget and
the summed error is as small as possible.

* :func:`allocate` (what dmquant uses): the dynamic program over costs rounded up to ``resolution``
  units of the budget (so its plan always fits; it can leave at most one unit per layer unused), then
  the greedy below spends what is left at exact costs. Near the optimum: the tests compare it with the
  exact program on small cases.
* :func:`allocate_greedy`: start every layer at its cheapest option, then repeatedly take the upgrade
  with the largest error reduction per extra byte that still fits.
* :func:`allocate_exact`: the dynamic program over integer costs (``O(layers · options · budget)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Option = tuple[int, float]  # (cost in bytes, error)


def plan_cost(options: Sequence[Sequence[Option]], choice: Sequence[int]) -> int:
    return sum(options[i][j][0] for i, j in enumerate(choice))


def plan_error(options: Sequence[Sequence[Option]], choice: Sequence[int]) -> float:
    return sum(options[i][j][1] for i, j in enumerate(choice))


def cheapest_cost(options: Sequence[Sequence[Option]]) -> int:
    return sum(min(c for c, _ in layer) for layer in options)


def _check_fits(options: Sequence[Sequence[Option]], budget: float) -> None:
    if cheapest_cost(options) > budget:
        raise ValueError(f"the cheapest plan takes {cheapest_cost(options)} bytes, more than the budget {budget:.0f}")


def allocate(options: Sequence[Sequence[Option]], budget: float, resolution: int = 20000) -> list[int]:
    """One option index per layer, summed cost <= ``budget``, summed error near the least possible (see the
    module). ValueError if even the cheapest plan does not fit."""
    _check_fits(options, budget)
    unit = max(float(budget) / resolution, 1.0)
    cap = int(budget // unit)
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = []
    for layer in options:
        new, pick = np.full(cap + 1, inf), np.full(cap + 1, -1, dtype=np.int16)
        for j, (cost, err) in enumerate(layer):
            units = int(np.ceil(cost / unit - 1e-9))
            if units > cap:
                continue
            shifted = np.full(cap + 1, inf)
            shifted[units:] = best[: cap + 1 - units] + err
            better = shifted < new
            new[better], pick[better] = shifted[better], j
        best = new
        picks.append(pick)
    c = int(np.argmin(best))
    if not np.isfinite(best[c]):  # rounding up made the cheapest plan overflow: plain greedy
        return allocate_greedy(options, budget)
    choice = []
    for i in range(len(options) - 1, -1, -1):
        j = int(picks[i][c])
        choice.append(j)
        c -= int(np.ceil(options[i][j][0] / unit - 1e-9))
    return allocate_greedy(options, budget, start=choice[::-1])


def allocate_greedy(options: Sequence[Sequence[Option]], budget: float, start: Sequence[int] | None = None
                    ) -> list[int]:
    """Greedy by error reduction per byte over all upgrades that fit, from the cheapest options (or
    ``start``). ValueError if even the cheapest plan does not fit."""
    _check_fits(options, budget)
    if start is None:
        choice = [min(range(len(layer)), key=lambda j, layer=layer: (layer[j][0], layer[j][1])) for layer in options]
    else:
        choice = list(start)
    left = budget - plan_cost(options, choice)
    while True:
        best, best_ratio = None, 0.0
        for i, layer in enumerate(options):
            c0, e0 = layer[choice[i]]
            for j, (c, e) in enumerate(layer):
                gain, extra = e0 - e, c - c0
                if gain <= 0 or extra > left:
                    continue
                ratio = gain / extra if extra > 0 else float("inf")
                if ratio > best_ratio:
                    best, best_ratio = (i, j), ratio
        if best is None:
            return choice
        i, j = best
        left -= options[i][j][0] - options[i][choice[i]][0]
        choice[i] = j


def allocate_exact(options: Sequence[Sequence[Option]], budget: int) -> list[int]:
    """The optimal plan by dynamic programming over integer costs (``O(layers · options · budget)``: for
    small cases and tests)."""
    budget = int(budget)
    _check_fits(options, budget)
    inf = float("inf")
    best = [0.0] + [inf] * budget  # best[c]: least error of the layers so far at total cost exactly c
    picks: list[list[int]] = []
    for layer in options:
        new, pick = [inf] * (budget + 1), [-1] * (budget + 1)
        for c in range(budget + 1):
            if best[c] == inf:
                continue
            for j, (cost, err) in enumerate(layer):
                total = c + int(cost)
                if total <= budget and best[c] + err < new[total]:
                    new[total], pick[total] = best[c] + err, j
        best = new
        picks.append(pick)
    c = min(range(budget + 1), key=lambda k: best[k])
    choice = []
    for i in range(len(options) - 1, -1, -1):
        j = picks[i][c]
        choice.append(j)
        c -= int(options[i][j][0])
    return choice[::-1]
