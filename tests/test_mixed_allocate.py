"""The size-budget allocation: the exact optimum on small problems, never over the budget, and the
sizes it counts equal to what the export writes (``test_mixed_run.py`` checks them against a file)."""
from __future__ import annotations

import itertools
import random

import pytest

from workbench.mixed.allocate import OverBudget, allocate, spend_leftover, total
from workbench.mixed.sizes import average_bits, packed_bytes


def random_problem(rng: random.Random, items: int, options: int, step: int = 1):
    """Costs falling and sizes rising with the width, as a model's layers have them, with noise."""
    costs, sizes = [], []
    for _ in range(items):
        base = rng.randint(1, 40) * step
        grow = sorted(rng.randint(1, 30) * step for _ in range(options))
        sizes.append([base + sum(grow[:j]) for j in range(options)])
        costs.append(sorted((rng.random() * 10 for _ in range(options)), reverse=True))
    return costs, sizes


def brute_force(costs, sizes, budget):
    best = None
    for picks in itertools.product(*[range(len(r)) for r in costs]):
        if total(sizes, picks) <= budget:
            c = total(costs, picks)
            best = c if best is None or c < best else best
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_program_finds_the_optimum_of_small_problems(seed):
    rng = random.Random(seed)
    costs, sizes = random_problem(rng, rng.randint(1, 6), rng.randint(1, 4), step=rng.choice([1, 3, 64]))
    smallest, largest = sum(map(min, sizes)), sum(map(max, sizes))
    budget = rng.randint(smallest, largest + 5)
    found = allocate(costs, sizes, budget)
    assert found.exact and found.size <= budget
    assert found.size == total(sizes, found.picks) and found.cost == pytest.approx(total(costs, found.picks))
    assert found.cost == pytest.approx(brute_force(costs, sizes, budget))


def test_costs_that_do_not_fall_with_the_width_are_still_optimal():
    """A wider option is not always the better one (a noisy measurement): the program does not assume it."""
    rng = random.Random(7)
    for _ in range(30):
        costs = [[rng.random() for _ in range(3)] for _ in range(5)]
        sizes = [[rng.randint(1, 20) for _ in range(3)] for _ in range(5)]
        budget = rng.randint(sum(map(min, sizes)), sum(map(max, sizes)))
        assert allocate(costs, sizes, budget).cost == pytest.approx(brute_force(costs, sizes, budget))


@pytest.mark.parametrize("seed", range(30))
def test_coarse_units_never_exceed_the_budget_and_stay_near_the_optimum(seed):
    rng = random.Random(100 + seed)
    costs, sizes = random_problem(rng, 6, 4, step=rng.randint(1, 997))
    budget = rng.randint(sum(map(min, sizes)), sum(map(max, sizes)))
    found = allocate(costs, sizes, budget, cells=8)        # a handful of units: sizes are rounded up
    best = brute_force(costs, sizes, budget)
    assert found.size <= budget and found.cost >= best - 1e-9
    # what the rounding left is spent: no single change that fits would lower the cost
    assert spend_leftover(costs, sizes, found.picks, budget) == list(found.picks)


def test_a_large_problem_is_within_budget_and_uses_it(seed=3):
    """Model-sized: 200 layers x 4 widths, sizes in bytes of millions, on the default resolution."""
    rng = random.Random(seed)
    costs, sizes = random_problem(rng, 200, 4, step=10_007)
    sizes = [[s + rng.randint(0, 999) * j for j, s in enumerate(row)] for row in sizes]    # no common divisor
    budget = (sum(map(min, sizes)) + sum(map(max, sizes))) // 2
    found = allocate(costs, sizes, budget)
    assert not found.exact and found.size <= budget
    # what the rounding up of the coarse unit left is spent: no layer below its widest option could still move up
    upgrades = [s[j + 1] - s[j] for s, j in zip(sizes, found.picks) if j < 3]
    assert budget - found.size < min(upgrades)


def test_everything_fits_when_the_budget_covers_the_largest_plan():
    costs, sizes = [[3.0, 1.0, 0.5]] * 3, [[10, 20, 30]] * 3
    assert allocate(costs, sizes, 10 ** 9).picks == (2, 2, 2)


def test_a_budget_below_the_smallest_plan_is_refused():
    with pytest.raises(OverBudget) as info:
        allocate([[1.0, 0.0]], [[10, 20]], 9)
    assert info.value.smallest == 10


def test_packed_sizes_follow_the_dense_int32_packing():
    # 3-bit codes of 64 columns: 192 bits = 6 words a row; zero points of 64 rows: 6 words a group
    assert packed_bytes(64, 64, 3, 16, False) == 4 * 64 * 6 + 4 * 6 * 4 + 2 * 64 * 4 + 16
    assert packed_bytes(64, 64, 3, 16, True) == 4 * 64 * 6 + 2 * 64 * 4 + 16
    assert packed_bytes(10, 33, 5, -1, False) == 4 * 10 * 6 + 4 * 2 + 2 * 10 + 16     # 165 bits -> 6 words
    # uniform 4-bit g64 asymmetric: 4 + (16 + 4) / 64 bits per weight, with the shape's 16 bytes on top
    assert average_bits(packed_bytes(576, 576, 4, 64, False), 576 * 576) == pytest.approx(4.3125, abs=1e-3)
