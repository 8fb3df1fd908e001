"""The bit allocation against the exact optimum (dynamic program) on small random cases."""

import random

import pytest

from dmquant.calibration.allocation import (
    allocate,
    allocate_exact,
    allocate_greedy,
    cheapest_cost,
    plan_cost,
    plan_error,
)


def random_case(seed: int):
    r = random.Random(seed)
    options = []
    for _ in range(r.randint(3, 10)):
        n, e = r.randint(4, 60), r.uniform(0.1, 10)
        options.append([(n * b // 2 + 2, e * 4.0 ** (-b) * r.uniform(0.5, 2)) for b in (2, 3, 4, 6, 8)])
    hi = sum(max(c for c, _ in layer) for layer in options)
    return options, r.randint(cheapest_cost(options), hi)


def test_allocation_is_optimal_on_small_cases_and_the_plain_greedy_is_close():
    greedy_gaps = []
    for seed in range(120):
        options, budget = random_case(seed)
        exact = allocate_exact(options, budget)
        best = plan_error(options, exact)
        for choice in (allocate(options, budget), allocate_greedy(options, budget)):
            assert plan_cost(options, choice) <= budget
        assert plan_error(options, allocate(options, budget)) == pytest.approx(best, rel=1e-9)
        greedy_gaps.append(plan_error(options, allocate_greedy(options, budget)) / best - 1)
    # measured: the plain greedy is 2.6% above the optimum on average, 36% in its worst of these cases
    assert sum(greedy_gaps) / len(greedy_gaps) < 0.05 and max(greedy_gaps) < 0.5


def test_coarse_resolution_is_at_least_as_good_as_the_optimum_of_a_budget_smaller_by_one_unit_per_layer():
    """Costs rounded up to units of budget / resolution: the plan fits, and it is no worse than the exact
    optimum with ``layers`` units less (the guarantee; dmquant's 20,000 units lose <= 0.5% of the budget
    on a 100-layer model)."""
    checked = 0
    for seed in range(60):
        options, budget = random_case(seed)
        unit = budget / 50
        if cheapest_cost(options) > budget - len(options) * unit:
            continue
        choice = allocate(options, budget, resolution=50)
        assert plan_cost(options, choice) <= budget
        smaller = allocate_exact(options, int(budget - len(options) * unit))
        assert plan_error(options, choice) <= plan_error(options, smaller) + 1e-12
        checked += 1
    assert checked >= 20


def test_a_budget_below_the_cheapest_plan_is_refused():
    options = [[(4, 1.0), (8, 0.1)], [(4, 2.0), (8, 0.2)]]
    for fn in (allocate, allocate_greedy, allocate_exact):
        with pytest.raises(ValueError, match="cheapest plan takes 8 bytes"):
            fn(options, 7)
    assert allocate(options, 12) == [0, 1]  # the extra 4 bytes go to the layer whose error drops most


def test_layers_with_different_numbers_of_candidates_are_allocated_optimally():
    """Group candidates fit only some layers: each layer has its own list of options (here per-channel
    formats of n·b/2 + 2 bytes, and on some layers groups that cost more scales per bit)."""
    for seed in range(60):
        r = random.Random(1000 + seed)
        options = []
        for _ in range(r.randint(3, 9)):
            n, e = r.randint(4, 60), r.uniform(0.1, 10)
            layer = [(n * b // 2 + 2, e * 4.0 ** (-b) * r.uniform(0.5, 2)) for b in (2, 4, 8)]
            if r.random() < 0.5:  # grouped: more scale bytes, a quarter of the error
                layer += [(n * b // 2 + 2 + n // 4, e * 4.0 ** (-b) / 4) for b in (2, 3)]
            options.append(layer)
        budget = r.randint(cheapest_cost(options), sum(max(c for c, _ in layer) for layer in options))
        choice = allocate(options, budget)
        assert len(choice) == len(options) and all(0 <= j < len(o) for j, o in zip(choice, options))
        assert plan_cost(options, choice) <= budget
        assert plan_error(options, choice) == pytest.approx(plan_error(options, allocate_exact(options, budget)), rel=1e-9)
