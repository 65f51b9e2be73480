"""CandidateQuantizer: GPTQ factors each Hessian once for every axis and every weight that reads it, with the
same result as quantizing each candidate on its own; the dampening retry; each output error measured once."""

from __future__ import annotations

import types

import numpy as np
import pytest

from lowbit.passes import axis_selectors, quantize_candidates
from lowbit.passes.axis_selectors import WeightPlan
from lowbit.passes.quant.adadim import relative_output_error
from lowbit.passes.quant.gptq import HessianNotPositiveDefinite, quantize_gptq
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.passes.quantize_candidates import CandidateQuantizer


def plan(weight: np.ndarray, hessian: np.ndarray) -> WeightPlan:
    return WeightPlan([types.SimpleNamespace(kind="matmul")], weight, hessian)


def hessian(seed: int, channels: int) -> np.ndarray:
    inputs = np.random.default_rng(seed).standard_normal((64, channels)) * np.linspace(0.1, 3.0, channels)
    return inputs.T @ inputs


def test_one_factor_per_hessian_and_the_candidates_of_quantize_gptq(monkeypatch):
    calls = []
    factor = quantize_candidates.factor_hessian
    monkeypatch.setattr(quantize_candidates, "factor_hessian", lambda h, **kw: calls.append(h) or factor(h, **kw))
    rng = np.random.default_rng(0)
    shared, alone = hessian(1, 24), hessian(2, 24)
    plans = [
        plan(rng.standard_normal((24, n)).astype(np.float32), h) for n, h in ((8, shared), (5, shared), (9, alone))
    ]
    scheme = QuantScheme(bits=3, group_size=8, method="gptq", clip_search=True)
    quantizer = CandidateQuantizer(scheme, ("oc", "ic"))
    candidates = [quantizer.candidates(p, "gptq") for p in plans]
    assert [id(h) for h in calls] == [id(shared), id(alone)]
    for p, got in zip(plans, candidates):
        for axis, q in got.items():
            expected = quantize_gptq(p.weight, p.hessian, QuantScheme(3, 8, axis, False, "gptq", True))
            np.testing.assert_array_equal(q.codes, expected.codes)
            np.testing.assert_array_equal(q.scales, expected.scales)


def test_dampening_is_raised_until_the_hessian_factors():
    indefinite = np.array([[1.0, 1.05], [1.05, 1.0]])  # eigenvalues 2.05 and -0.05: 1 % dampening is too little
    weight = np.array([[0.3, -1.2], [0.7, 0.1]], dtype=np.float32)
    scheme = QuantScheme(bits=4, group_size=2, method="gptq")
    with pytest.raises(HessianNotPositiveDefinite):
        quantize_gptq(weight, indefinite, scheme, damp=0.01)
    got = CandidateQuantizer(scheme, ("oc",)).candidates(plan(weight, indefinite), "gptq")["oc"]
    np.testing.assert_array_equal(got.codes, quantize_gptq(weight, indefinite, scheme, damp=0.1).codes)
    with pytest.raises(ValueError, match="stays singular up to dampening"):
        CandidateQuantizer(scheme, ("oc",)).candidates(plan(weight, -np.eye(2)), "gptq")


def test_each_output_error_is_measured_once_per_candidate_and_hessian(monkeypatch):
    """The matrix choice and the report's relative errors share measurements; a replaced candidate (choice by
    RTN, then GPTQ) or a new Hessian (sequential mode) is measured again."""
    measured = []
    error = axis_selectors.output_error
    monkeypatch.setattr(axis_selectors, "output_error", lambda *args: measured.append(1) or error(*args))
    rng = np.random.default_rng(3)
    h = hessian(4, 16)
    p = plan(rng.standard_normal((16, 12)).astype(np.float32), h)
    scheme = QuantScheme(bits=3, group_size=4, method="gptq")
    quantizer = CandidateQuantizer(scheme, ("oc", "ic"))
    p.candidates = quantizer.candidates(p, "rtn")
    choice = axis_selectors.select_matrix([p])[0]
    relative = axis_selectors.matrix_errors(p)
    assert len(measured) == 3  # two candidates and the output energy
    for axis, q in p.candidates.items():
        assert relative[axis] == relative_output_error(p.weight, q.dequantize(), h)
    assert relative[choice] == min(relative.values())
    p.candidates[choice] = quantizer.quantize(p, choice, "gptq")
    assert axis_selectors.matrix_errors(p)[choice] == relative_output_error(
        p.weight, p.candidates[choice].dequantize(), h
    )
    assert len(measured) == 4
    p.hessian = 2.0 * h
    axis_selectors.matrix_errors(p)
    assert len(measured) == 7


@pytest.mark.parametrize("choice_method", ["gptq", "rtn"])
def test_candidates_do_not_depend_on_the_number_of_threads(choice_method):
    """Jobs (plans sharing a Hessian) run on threads; each computes what it would alone, bit for bit."""
    hessians = [hessian(seed, 32) for seed in (6, 7, 8)]
    shapes = [(32, 20), (32, 9), (32, 20), (32, 33), (32, 7)]
    hessian_of = [hessians[0], hessians[0], hessians[1], hessians[2], hessians[2]]
    scheme = QuantScheme(bits=3, group_size=8, method="gptq", clip_search=True)
    results = []
    for workers in (1, 2, 5):
        plans = [plan(w.astype(np.float32), h) for w, h in zip(weights(shapes), hessian_of)]
        choices, _ = quantize_candidates.choose(
            CandidateQuantizer(scheme, ("oc", "ic")),
            plans,
            choice_method=choice_method,
            method="gptq",
            selector=None,
            model=None,
            samples=[],
            workers=workers,
        )
        results.append((choices, [{axis: q.codes for axis, q in p.candidates.items()} for p in plans]))
    for choices, codes in results[1:]:
        assert choices == results[0][0]
        for got, expected in zip(codes, results[0][1]):
            assert got.keys() == expected.keys()
            for axis in got:
                np.testing.assert_array_equal(got[axis], expected[axis])


def weights(shapes):
    rng = np.random.default_rng(8)
    return [rng.standard_normal(shape) for shape in shapes]
