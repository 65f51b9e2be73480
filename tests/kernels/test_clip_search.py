"""The clip search's compiled loops (``kernels.clip_search``) against NumPy's (``rtn._rounding_error``): the same
errors bit for bit, so the chosen group parameters are the same whether the op library is built or not (the loops
run in the variant this CPU selects: x86-64-v4, v3 or baseline)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import clip_search
from lowbit.passes import pipelines
from lowbit.passes.quant import rtn
from lowbit.passes.report import OptimizeReport


def _both(weight, bits, group, axis, symmetric, channel_weights, scale_dtype, ratios=rtn.CLIP_RATIOS):
    """(NumPy's, the compiled) candidate errors, scales and zero points, and search results; ``rtn`` is left as it
    was."""
    results = []
    before = rtn._compiled_rounding_errors
    try:
        for function in (None, clip_search.rounding_errors):
            rtn.use_compiled_rounding_errors(function)
            row_weights = None if channel_weights is None else np.asarray(channel_weights, dtype=np.float64)
            candidates = rtn._candidate_errors(weight, bits, group, axis, symmetric, row_weights, ratios, scale_dtype)
            chosen = rtn.search_group_params(weight, bits, group, axis, symmetric, channel_weights, ratios, scale_dtype)
            results.append((candidates, chosen))
    finally:
        rtn.use_compiled_rounding_errors(before)
    return results


def _weights(draw_seed: int, rows: int, columns: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(draw_seed)
    weight = rng.standard_normal((rows, columns)) * rng.uniform(1e-3, 10)
    if kind == "zeros":  # all-zero groups and rows: scale 1, code at the zero point
        weight[rng.random(weight.shape) < 0.5] = 0.0
        weight[: max(1, rows // 3)] = 0.0
    elif kind == "outliers":  # a few huge entries: clipping them away wins
        weight[rng.random(weight.shape) < 0.01] *= 1000.0
    elif kind == "ties":  # values on the half-steps of a grid: rint's ties to even
        weight = np.round(weight * 4) / 4 + 0.125
    elif kind == "tiny":  # scales below float16's normal range stay float32
        weight *= 1e-7
    return weight.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 70),
    columns=st.integers(1, 300),
    group=st.sampled_from([-1, 1, 3, 8, 32, 128, 200]),
    bits=st.sampled_from([2, 3, 4, 8]),
    axis=st.sampled_from([0, 1]),
    symmetric=st.booleans(),
    weighted=st.sampled_from(["none", "random", "zeros"]),
    scale_dtype=st.sampled_from(["float32", "float16"]),
    kind=st.sampled_from(["normal", "zeros", "outliers", "ties", "tiny"]),
    seed=st.integers(0, 2**16),
)
def test_compiled_errors_and_choices_equal_numpys_bit_for_bit(
    ops_library, rows, columns, group, bits, axis, symmetric, weighted, scale_dtype, kind, seed
):
    """Ragged last groups (padding weighted zero), groups longer than NumPy's 128-element pairwise block and whole
    axes (its recursive halves), one-member groups, weighted rows (some weighted zero), ties, zeros, outliers."""
    weight = _weights(seed, rows, columns, kind)
    group = weight.shape[axis] if group == -1 else group
    rng = np.random.default_rng(seed + 1)
    channel_weights = {"none": None, "random": rng.uniform(0.01, 100, rows), "zeros": rng.integers(0, 2, rows) * 1.0}[
        weighted
    ]
    (numpy_candidates, numpy_chosen), (compiled_candidates, compiled_chosen) = _both(
        weight, bits, group, axis, symmetric, channel_weights, scale_dtype
    )
    for expected, got in zip(numpy_candidates + numpy_chosen, compiled_candidates + compiled_chosen, strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_large_weights_compiled_equal_numpys_blocked_path(ops_library):
    """Per-OC weights past ``_SEARCH_ALL_AT_ONCE_ELEMENTS`` (NumPy evaluates them a ratio and a block at a time)."""
    weight = _weights(5, 576, 300, "outliers")
    channel_weights = np.random.default_rng(6).uniform(0.1, 10, 576)
    assert len(rtn.CLIP_RATIOS) * weight.size > rtn._SEARCH_ALL_AT_ONCE_ELEMENTS
    for axis in (0, 1):
        (numpy_candidates, numpy_chosen), (compiled_candidates, compiled_chosen) = _both(
            weight, 3, 128, axis, False, channel_weights, "float16"
        )
        for expected, got in zip(numpy_candidates + numpy_chosen, compiled_candidates + compiled_chosen, strict=True):
            np.testing.assert_array_equal(got, expected)


def test_running_a_pipeline_installs_the_compiled_loops(ops_library, monkeypatch):
    monkeypatch.setattr(rtn, "_compiled_rounding_errors", None)
    pipelines.run_pipeline(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), [], OptimizeReport())
    assert rtn._compiled_rounding_errors is clip_search.rounding_errors
