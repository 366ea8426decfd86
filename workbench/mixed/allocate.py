"""The widths that cost least under a size budget: a multiple-choice knapsack.

Every item (a layer, or layers that must share a width) takes exactly one of its options, option
``j`` of item ``i`` costing ``costs[i][j]`` and taking ``sizes[i][j]`` bytes; the sum of the sizes
must stay within the budget and the sum of the costs is minimised.

The exact dynamic program runs on the size axis above the smallest plan, in units of the greatest
common divisor of the size steps: exact whenever that axis has at most ``cells`` units. Otherwise
the unit is coarsened and every step rounded up, which keeps the plan within the budget, and what
the rounding left unused is spent greedily on the upgrades that save the most cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

CELLS = 1 << 16      # size units of the program: items x options x cells operations


@dataclass(frozen=True)
class Allocation:
    picks: tuple[int, ...]      # the option of every item
    cost: float
    size: int
    exact: bool                 # the program ran in exact units (no rounding of the sizes)


class OverBudget(ValueError):
    """Even the smallest option of every item exceeds the budget."""

    def __init__(self, smallest: int):
        super().__init__(f"the smallest plan takes {smallest} bytes")
        self.smallest = smallest


def total(values: Sequence[Sequence[float]], picks: Sequence[int]):
    return sum(row[j] for row, j in zip(values, picks))


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int,
             cells: int = CELLS) -> Allocation:
    """The least-cost option of every item with the total size at most ``budget`` (all in bytes)."""
    if len(costs) != len(sizes) or any(len(c) != len(s) or not s for c, s in zip(costs, sizes)):
        raise ValueError("costs and sizes must give the same options for every item")
    floor = [min(row) for row in sizes]
    smallest = sum(floor)
    if smallest > budget:
        raise OverBudget(smallest)
    # the axis is the room above the smallest plan, no wider than the largest plan needs
    extra = [[s - f for s in row] for row, f in zip(sizes, floor)]
    room = min(budget - smallest, sum(max(row) for row in extra))
    unit = reduce(math.gcd, (e for row in extra for e in row), 0) or 1
    exact = room // unit <= cells
    if not exact:
        unit = -(-room // cells)
    steps = [[-(-e // unit) for e in row] for row in extra]
    picks = _program(costs, steps, room // unit)
    if not exact:
        picks = spend_leftover(costs, sizes, picks, budget)
    return Allocation(tuple(picks), float(total(costs, picks)), int(total(sizes, picks)), exact)


def _program(costs, steps, capacity: int) -> list[int]:
    """Options minimising the cost with the summed steps at most ``capacity`` (backtracked choices)."""
    best = np.zeros(capacity + 1)            # least cost of the items so far within c units
    choice = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for i, (row, step) in enumerate(zip(costs, steps)):
        options = np.full((len(row), capacity + 1), np.inf)
        for j, (c, s) in enumerate(zip(row, step)):
            if s <= capacity:
                options[j, s:] = best[:capacity + 1 - s] + c
        choice[i] = options.argmin(0)
        best = options.min(0)
    picks, c = [], capacity
    for i in range(len(costs) - 1, -1, -1):
        j = int(choice[i, c])
        picks.append(j)
        c -= steps[i][j]
    return picks[::-1]


def spend_leftover(costs, sizes, picks: Sequence[int], budget: int) -> list[int]:
    """``picks`` improved one change at a time, the change saving the most cost that still fits."""
    picks = list(picks)
    left = budget - total(sizes, picks)
    while True:
        gain, move = 0.0, None
        for i, (row, srow) in enumerate(zip(costs, sizes)):
            for j, (c, s) in enumerate(zip(row, srow)):
                saved = row[picks[i]] - c
                if saved > gain and s - srow[picks[i]] <= left:
                    gain, move = saved, (i, j)
        if move is None:
            return picks
        i, j = move
        left -= sizes[i][j] - sizes[i][picks[i]]
        picks[i] = j
