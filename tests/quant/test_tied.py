"""quant.tied: the Hessian of a table shared by an embedding and its LM head."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.passes.quant.tied import tied_hessian


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_quadratic_form_is_the_sum_of_the_two_relative_errors(d, v, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((d, v)).astype(np.float32)  # the head's W = table^T
    x = rng.standard_normal((3 * d, d))
    hessian = x.T @ x
    delta = rng.standard_normal((d, v))
    combined = tied_hessian(hessian, weight)
    head = np.sum((hessian @ delta) * delta) / np.sum((hessian @ weight) * weight)
    table = np.sum(delta * delta) / np.sum(weight.astype(np.float64) ** 2)
    np.testing.assert_allclose(np.sum((combined @ delta) * delta), head + table, rtol=1e-5)


def test_a_head_never_reached_in_calibration_leaves_the_table_error_alone():
    weight = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(tied_hessian(np.zeros((2, 2)), weight), np.eye(2) / np.sum(weight**2))


def test_bad_shapes_and_an_all_zero_table_are_refused():
    with pytest.raises(ValueError, match=r"head_hessian must be \[2, 2\]"):
        tied_hessian(np.eye(3), np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="all zeros"):
        tied_hessian(np.eye(2), np.zeros((2, 4), np.float32))
