"""Bit allocation under a size budget: one option (a bit width) per weight, the lowest summed error whose summed
bytes stay within the budget. Pure Python, no graph code.

This is a multiple-choice knapsack. The options of one weight that are worth having lie on the lower convex
hull of its (bytes, error) points, and going up that hull one step at a time buys error at a falling rate.
``allocate`` takes the hull steps of all weights in order of error saved per byte, skipping a step that does
not fit (every prefix of that order minimises ``error + lambda * bytes`` for some lambda, so it is optimal for
the bytes it uses), then spends what is left on the single change that saves the most error, again and again.
It also starts from every uniform choice (the same option column for every weight) that fits, spends what is
left there the same way, and keeps the best result. So the result never exceeds the budget, is never worse
than a uniform column that fits, and its error exceeds the optimum by at most the most any single hull step
saves (the LP-relaxation bound of the greedy).

Budgets (``parse_budget``): average bits per quantized weight (``"3.5"``) or megabytes (``"180MB"``, 10^6 bytes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Budget:
    """A size budget: average bits per quantized weight, or megabytes (exactly one is set)."""

    bits: float | None = None
    megabytes: float | None = None

    def limit(self, weights: int, other_bytes: int) -> float:
        """The bytes the quantized weights may take: ``bits`` times ``weights`` entries over 8, or the
        megabytes less ``other_bytes`` (what the model keeps besides them)."""
        if self.bits is not None:
            return self.bits * weights / 8
        return self.megabytes * 1e6 - other_bytes

    def __str__(self) -> str:
        return f"{self.bits:g} bits per weight" if self.bits is not None else f"{self.megabytes:g} MB"


_MEGABYTES = re.compile(r"^\s*([0-9.eE+-]+)\s*MB\s*$", re.IGNORECASE)


def parse_budget(text: str) -> Budget:
    """``"3.5"`` (bits per weight) or ``"180MB"`` (megabytes of the model's tensors) as a ``Budget``."""
    match = _MEGABYTES.match(str(text))
    try:
        value = float(match.group(1) if match else text)
    except ValueError:
        raise ValueError(f"budget must be bits per weight (e.g. 3.5) or megabytes (e.g. 180MB), got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget must be a positive finite number, got {text!r}")
    return Budget(megabytes=value) if match else Budget(bits=value)


def allocate(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: float) -> list[int]:
    """The option index per weight (row) with the lowest summed ``errors`` whose summed ``costs`` (bytes) fit
    ``budget``. ``costs[i][j]``, ``errors[i][j]``: option j of weight i; every row has the same options in
    the same order (column j is one setting, e.g. one bit width). ValueError when even the cheapest choice does
    not fit."""
    costs, errors = _checked(costs, errors)
    cheapest = [
        min(range(len(row)), key=lambda j, row=row, err=err: (row[j], err[j])) for row, err in zip(costs, errors)
    ]
    least = sum(row[j] for row, j in zip(costs, cheapest))
    if least > budget:
        raise ValueError(
            f"the budget ({budget:.6g} bytes) is below the cheapest choice of every weight ({least:.6g} bytes)"
        )
    starts = [_hull_greedy(costs, errors, cheapest, budget)]
    starts += [[j] * len(costs) for j in range(len(costs[0])) if sum(row[j] for row in costs) <= budget]
    results = [_fill(costs, errors, start, budget) for start in starts]
    return min(results, key=lambda picks: _total(errors, picks))


def _checked(costs, errors) -> tuple[list[list[int]], list[list[float]]]:
    """The table as whole-number costs (bytes: sums stay exact) and float errors, after shape and value checks."""
    if not costs or len(costs) != len(errors):
        raise ValueError(f"need one row of costs and errors per weight, got {len(costs)} and {len(errors)}")
    width = len(costs[0])
    if width == 0 or any(len(row) != width for row in [*costs, *errors]):
        raise ValueError("every weight needs the same non-zero number of options in costs and errors")
    values = [float(v) for row in [*costs, *errors] for v in row]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError("costs and errors must be finite and non-negative")
    if not all(float(c).is_integer() for row in costs for c in row):
        raise ValueError("costs are bytes: whole numbers")
    return [[int(c) for c in row] for row in costs], [[float(e) for e in row] for row in errors]


def _hull(cost: list[float], error: list[float], start: int) -> list[int]:
    """Options on the lower convex hull of (cost, error) from ``start`` (the cheapest): error falls, and
    the error saved per byte falls from step to step."""
    order = sorted(range(len(cost)), key=lambda j: (cost[j], error[j]))
    hull = [start]
    for j in order:
        if cost[j] <= cost[hull[-1]] or error[j] >= error[hull[-1]]:
            continue  # not cheaper-and-worse than the last hull point: dominated or the start itself
        while len(hull) >= 2 and _rate(cost, error, hull[-2], hull[-1]) <= _rate(cost, error, hull[-1], j):
            hull.pop()
        hull.append(j)
    return hull


def _rate(cost: list[float], error: list[float], a: int, b: int) -> float:
    return (error[a] - error[b]) / (cost[b] - cost[a])


def _hull_greedy(costs, errors, cheapest: list[int], budget: float) -> list[int]:
    """Hull steps of all weights by falling error per byte, each taken when it fits (a weight whose step
    does not fit stops there: its later steps start from the option it did not reach)."""
    steps = []
    for i, (cost, error) in enumerate(zip(costs, errors)):
        hull = _hull(cost, error, cheapest[i])
        steps += [(-_rate(cost, error, a, b), i, n, b) for n, (a, b) in enumerate(zip(hull, hull[1:]))]
    picks = list(cheapest)
    spent = sum(row[j] for row, j in zip(costs, picks))
    blocked = set()
    for _, i, _, target in sorted(steps):
        if i in blocked:
            continue
        extra = costs[i][target] - costs[i][picks[i]]
        if spent + extra > budget:
            blocked.add(i)
            continue
        picks[i], spent = target, spent + extra
    return picks


def _fill(costs, errors, picks: list[int], budget: float) -> list[int]:
    """Repeatedly take the single option change (any weight, any option) that saves the most error and
    still fits the budget; each change saves error, so this ends."""
    picks = list(picks)
    spent = sum(row[j] for row, j in zip(costs, picks))
    while True:
        best = None  # (error saved, weight, option)
        for i, (cost, error) in enumerate(zip(costs, errors)):
            current = picks[i]
            for j in range(len(cost)):
                saved = error[current] - error[j]
                if saved > 0 and spent - cost[current] + cost[j] <= budget and (best is None or saved > best[0]):
                    best = (saved, i, j)
        if best is None:
            return picks
        _, i, j = best
        spent += costs[i][j] - costs[i][picks[i]]
        picks[i] = j


def _total(errors, picks: list[int]) -> float:
    return sum(row[j] for row, j in zip(errors, picks))


def total_cost(costs: Sequence[Sequence[int]], picks: Sequence[int]) -> int:
    """Summed cost of one option per weight."""
    return sum(row[j] for row, j in zip(costs, picks))
