"""AdaDim's output error and per-layer axis choice, including planted cases where each axis must win."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.passes.quant.adadim import lowest, output_error, relative, relative_output_error
from lowbit.passes.quant.gptq import quantize_gptq
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme

LAWS = settings(max_examples=30, deadline=None)
QUANTIZERS = {
    "rtn": lambda weight, hessian, scheme: quantize_rtn(weight, scheme),
    "gptq": quantize_gptq,
}


def choose_axis(weight, hessian, options):
    """The matrix choice as the selectors make it: every candidate's output error, the lowest one."""
    errors = {name: output_error(weight, q.dequantize(), hessian) for name, q in options.items()}
    return lowest(errors), errors


def candidates(weight, hessian, quantizer, bits=3, group_size=16):
    quantize = QUANTIZERS[quantizer]
    return {
        axis: quantize(weight, hessian, QuantScheme(bits=bits, group_size=group_size, group_axis=axis))
        for axis in ("oc", "ic")
    }


@LAWS
@given(tokens=st.integers(1, 30), rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_output_error_is_squared_output_difference(tokens, rows, cols, seed):
    """trace(dW^T X^T X dW) = ||X W - X W_hat||_F^2: the [K, N] layout is contracted on the right side."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((tokens, rows))
    weight, approx = rng.standard_normal((2, rows, cols))
    expected = np.sum((inputs @ weight - inputs @ approx) ** 2)
    assert output_error(weight, approx, inputs.T @ inputs) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_output_error_weighs_input_channels_by_the_hessian():
    weight = np.zeros((2, 3))
    approx = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # two errors on input 0, one on input 1
    assert output_error(weight, approx, np.diag([5.0, 0.5])) == pytest.approx(2 * 5.0 + 4 * 0.5)


def test_relative_output_error():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((50, 8))
    weight = rng.standard_normal((8, 6))
    hessian = inputs.T @ inputs
    assert relative_output_error(weight, np.zeros_like(weight), hessian) == pytest.approx(1.0)
    assert relative_output_error(weight, weight, hessian) == 0.0
    assert relative_output_error(weight, 0.9 * weight, 7.0 * hessian) == pytest.approx(0.01)


@LAWS
@given(
    seed=st.integers(0, 2**16),
    quantizer=st.sampled_from(sorted(QUANTIZERS)),
    bits=st.sampled_from([2, 3, 4]),
    group_size=st.sampled_from([-1, 4, 16]),
)
def test_choice_is_never_worse_than_either_axis(seed, quantizer, bits, group_size):
    rng = np.random.default_rng(seed)
    row_scales, col_scales = rng.lognormal(0, 1, (24, 1)), rng.lognormal(0, 1, 20)
    weight = (rng.standard_normal((24, 20)) * row_scales * col_scales).astype(np.float32)
    inputs = rng.standard_normal((40, 24)) * rng.lognormal(0, 1, 24)
    hessian = inputs.T @ inputs
    options = candidates(weight, hessian, quantizer, bits, group_size)
    axis, errors = choose_axis(weight, hessian, options)
    assert all(errors[axis] <= error for error in errors.values())


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_per_ic_wins_behind_large_activations_with_small_weights(quantizer):
    """Rows of small weights behind huge activations: per-OC groups give them their neighbours' scale."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    outliers = np.array([3, 17, 40, 41])
    weight[outliers] *= 0.02
    inputs = rng.standard_normal((256, 64))
    inputs[:, outliers] *= 100.0
    hessian = inputs.T @ inputs
    axis, errors = choose_axis(weight, hessian, candidates(weight, hessian, quantizer))
    assert axis == "ic"
    assert errors["ic"] < 0.5 * errors["oc"]


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_per_oc_wins_with_a_few_large_output_channels(quantizer):
    """Columns of large weights: per-IC groups give the small weights of each row the large one's scale."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((64, 128)).astype(np.float32)
    weight[:, [5, 70]] *= 10.0  # one large output channel in each per-IC group of 64
    inputs = rng.standard_normal((256, 64))
    hessian = inputs.T @ inputs
    axis, errors = choose_axis(weight, hessian, candidates(weight, hessian, quantizer, group_size=64))
    assert axis == "oc"
    assert errors["oc"] < 0.6 * errors["ic"]


def test_ties_go_to_the_first_candidate():
    weight = np.zeros((8, 8), dtype=np.float32)
    options = candidates(weight, np.eye(8), "rtn")
    assert choose_axis(weight, np.eye(8), options)[0] == "oc"
    assert choose_axis(weight, np.eye(8), dict(reversed(options.items())))[0] == "ic"


def test_choosing_needs_candidates():
    with pytest.raises(ValueError, match="at least one candidate"):
        lowest({})


def test_relative_error_of_a_weight_without_output_energy_is_the_raw_error():
    assert relative(0.5, 0.0) == 0.5
    assert relative(0.5, 2.0) == 0.25
