"""Bit allocation under a budget (passes/quant/allocate.py) against a brute-force optimum on small tables."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowbit.passes.quant.allocate import Budget, allocate, parse_budget, total_cost

LAWS = settings(max_examples=200, deadline=None)


@st.composite
def tables(draw, max_weights: int = 5, max_options: int = 4):
    """Costs (whole bytes) and errors of a few weights with the same number of options each."""
    weights = draw(st.integers(1, max_weights))
    options = draw(st.integers(1, max_options))
    cost = st.integers(0, 50)
    error = st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False)
    costs = [[draw(cost) for _ in range(options)] for _ in range(weights)]
    errors = [[draw(error) for _ in range(options)] for _ in range(weights)]
    return costs, errors


def total_error(errors, picks) -> float:
    return sum(row[j] for row, j in zip(errors, picks))


def brute_force(costs, errors, budget) -> float:
    """The lowest summed error of any choice within the budget."""
    feasible = [
        total_error(errors, picks)
        for picks in itertools.product(*(range(len(row)) for row in costs))
        if total_cost(costs, picks) <= budget
    ]
    return min(feasible)


def cheapest_bytes(costs) -> int:
    return sum(min(row) for row in costs)


def largest_step(costs, errors) -> float:
    """The most error one weight can save from its cheapest option (the greedy's LP bound)."""
    saves = []
    for cost, error in zip(costs, errors):
        start = min(range(len(cost)), key=lambda j, cost=cost, error=error: (cost[j], error[j]))
        saves.append(error[start] - min(error))
    return max(saves)


@LAWS
@given(table=tables(), slack=st.integers(0, 200))
def test_within_budget_and_near_the_optimum(table, slack):
    costs, errors = table
    budget = cheapest_bytes(costs) + slack
    picks = allocate(costs, errors, budget)
    assert total_cost(costs, picks) <= budget
    optimum = brute_force(costs, errors, budget)
    got = total_error(errors, picks)
    assert optimum - 1e-9 <= got <= optimum + largest_step(costs, errors) + 1e-9


@LAWS
@given(table=tables(), column=st.integers(0, 3), slack=st.integers(0, 20))
def test_never_worse_than_a_uniform_column_that_fits(table, column, slack):
    costs, errors = table
    column %= len(costs[0])
    uniform = [column] * len(costs)
    budget = total_cost(costs, uniform) + slack  # slack 0: a budget equal to the uniform width's bytes
    picks = allocate(costs, errors, budget)
    assert total_cost(costs, picks) <= budget
    assert total_error(errors, picks) <= total_error(errors, uniform)


@LAWS
@given(table=tables(), log_rate=st.floats(-4.0, 4.0))
def test_optimal_at_a_lagrangian_budget(table, log_rate):
    """A budget equal to the bytes of the unique minimiser of error + rate * bytes: that minimiser is optimal
    for it, and the allocation must reach its error."""
    costs, errors = table
    rate = 10.0**log_rate
    picks = []
    for cost, error in zip(costs, errors):
        values = sorted((e + rate * c, j) for j, (c, e) in enumerate(zip(cost, error)))
        assume(len(values) == 1 or values[1][0] - values[0][0] > 1e-6)  # a unique minimiser per weight
        picks.append(values[0][1])
    budget = total_cost(costs, picks)
    got = allocate(costs, errors, budget)
    assert total_cost(costs, got) <= budget
    assert total_error(errors, got) == pytest.approx(brute_force(costs, errors, budget), rel=1e-12, abs=1e-9)


@LAWS
@given(table=tables())
def test_enough_budget_gives_every_weight_its_lowest_error(table):
    costs, errors = table
    picks = allocate(costs, errors, sum(max(row) for row in costs))
    assert total_error(errors, picks) == pytest.approx(sum(min(row) for row in errors), rel=1e-12, abs=1e-12)


def test_the_trap_of_taking_the_best_rate_first():
    """Weight 0 saves the most per byte (15), but taking it leaves too little for weight 1's step, which saves
    more in all (100 against 30): the hull greedy alone ends at error 100; the optimum is 30."""
    costs = [[0, 2], [0, 10]]
    errors = [[30.0, 0.0], [100.0, 0.0]]
    assert allocate(costs, errors, 10) == [0, 1]


def test_infeasible_budget_is_refused():
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate([[4, 8], [4, 8]], [[1.0, 0.5], [1.0, 0.5]], 7)


@pytest.mark.parametrize(
    ("costs", "errors", "message"),
    [
        ([], [], "one row"),
        ([[1, 2]], [[1.0]], "same non-zero number"),
        ([[1.5]], [[1.0]], "whole numbers"),
        ([[1]], [[float("nan")]], "finite"),
        ([[-1]], [[1.0]], "non-negative"),
    ],
)
def test_bad_tables_are_refused(costs, errors, message):
    with pytest.raises(ValueError, match=message):
        allocate(costs, errors, 100)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3.5", Budget(bits=3.5)), ("180MB", Budget(megabytes=180.0)), (" 12.5 mb ", Budget(megabytes=12.5))],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "-3", "inf", "nan", "3 bits", "MB"])
def test_parse_budget_refuses(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_budget_limits():
    assert Budget(bits=3.0).limit(weights=1000, other_bytes=999) == 375.0
    assert Budget(megabytes=1.0).limit(weights=1000, other_bytes=250_000) == 750_000.0
