"""Channel reordering math: sorted permutations stay inside their classes, the induced position map
is exact, folding it is lossless on a NumPy attention with grouped-query heads, statistics permute."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.passes.quant import reorder
from lowbit.passes.quant.hessian import HessianAccumulator


def gqa_positions(kv_heads: int, group: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(channel, slice) of an o_proj input: query head h reads KV head h // group; heads are slices."""
    heads = np.arange(kv_heads * group).repeat(head_dim)
    within = np.tile(np.arange(head_dim), kv_heads * group)
    return (heads // group) * head_dim + within, heads


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.integers(1, 40), labels=st.integers(1, 4))
def test_sorting_permutation_sorts_each_class_and_keeps_channels_in_it(data, size, labels):
    scores = data.draw(hnp.arrays(np.float64, size, elements=st.floats(-5, 5)))
    classes = data.draw(hnp.arrays(np.int64, size, elements=st.integers(0, labels - 1)))
    p = reorder.sorting_permutation(scores, classes)
    assert sorted(p.tolist()) == list(range(size))
    np.testing.assert_array_equal(classes[p], classes)  # every channel stays in its class
    for label in np.unique(classes):
        ordered = scores[p][classes == label]
        assert np.all(np.diff(ordered) <= 0)


def test_equal_scores_give_the_identity():
    np.testing.assert_array_equal(reorder.sorting_permutation(np.ones(7), np.zeros(7, np.int64)), np.arange(7))


@settings(max_examples=40, deadline=None)
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), head_dim=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_gqa_classes_are_kv_heads_and_q_keeps_every_head(kv_heads, group, head_dim, seed):
    channel, slice_ = gqa_positions(kv_heads, group, head_dim)
    width = kv_heads * head_dim
    classes = reorder.interchangeable_classes(channel, slice_, width)
    np.testing.assert_array_equal(classes, np.arange(width) // head_dim)
    scores = np.random.default_rng(seed).standard_normal(width)
    p = reorder.sorting_permutation(scores, classes)
    q = reorder.position_permutation(channel, slice_, p)
    assert sorted(q.tolist()) == list(range(len(q)))
    np.testing.assert_array_equal(channel[q], p[channel])
    np.testing.assert_array_equal(slice_[q], slice_)


def test_flat_positions_move_like_the_channels():
    p = np.array([3, 0, 2, 1])
    q = reorder.position_permutation(np.arange(4), np.zeros(4, np.int64), p)
    np.testing.assert_array_equal(q, p)


def test_a_permutation_across_heads_is_refused():
    channel, slice_ = gqa_positions(kv_heads=2, group=1, head_dim=2)
    with pytest.raises(ValueError, match="out of a slice"):
        reorder.position_permutation(channel, slice_, np.array([2, 1, 0, 3]))
    with pytest.raises(ValueError, match="two positions"):
        reorder.position_permutation(np.array([0, 0]), np.array([0, 0]), np.array([0, 1]))


@settings(max_examples=30, deadline=None)
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), head_dim=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_folding_into_v_and_o_is_lossless_for_grouped_query_attention(kv_heads, group, head_dim, seed):
    """NumPy attention: V = X W_v, each query head h mixes KV head h // group with its own probabilities,
    then O = concat(heads) W_o. Permuting W_v's columns by p and W_o's rows by q changes nothing."""
    rng = np.random.default_rng(seed)
    tokens, hidden, heads = 5, 4, kv_heads * group
    x = rng.standard_normal((tokens, hidden))
    w_v = rng.standard_normal((hidden, kv_heads * head_dim))
    w_o = rng.standard_normal((heads * head_dim, 3))
    probs = rng.random((heads, tokens, tokens))

    def attention(w_v, w_o):
        v = (x @ w_v).reshape(tokens, kv_heads, head_dim).transpose(1, 0, 2).repeat(group, axis=0)
        return (probs @ v).transpose(1, 0, 2).reshape(tokens, -1) @ w_o

    channel, slice_ = gqa_positions(kv_heads, group, head_dim)
    width = kv_heads * head_dim
    classes = reorder.interchangeable_classes(channel, slice_, width)
    p = reorder.sorting_permutation(rng.standard_normal(width), classes)
    q = reorder.position_permutation(channel, slice_, p)
    np.testing.assert_allclose(attention(w_v[:, p], w_o[q]), attention(w_v, w_o), rtol=1e-10, atol=1e-12)


def test_source_scores_take_the_largest_reader():
    scores = reorder.source_scores(np.array([1.0, 5.0, 2.0, 3.0]), np.array([0, 1, 0, 1]), 3)
    np.testing.assert_array_equal(scores, [2.0, 5.0, -np.inf])


def test_position_scores_by_criterion():
    statistics = HessianAccumulator(2)
    statistics.update(np.array([[3.0, -1.0], [1.0, 2.0]]))
    np.testing.assert_array_equal(reorder.position_scores(statistics, "absmax"), [3.0, 2.0])
    np.testing.assert_array_equal(reorder.position_scores(statistics, "hessian"), [10.0, 5.0])
    with pytest.raises(ValueError, match="criterion"):
        reorder.position_scores(statistics, "mean")


@settings(max_examples=40, deadline=None)
@given(
    data=hnp.arrays(np.int64, st.tuples(st.integers(1, 20), st.integers(1, 6)), elements=st.integers(-100, 100)),
    seed=st.integers(0, 2**16),
    diagonal_only=st.booleans(),
)
def test_permuted_statistics_equal_the_statistics_of_permuted_inputs(data, seed, diagonal_only):
    """Integer inputs make every float64 sum exact: the law holds bit for bit, for full and diagonal-only H."""
    q = np.random.default_rng(seed).permutation(data.shape[1])
    before, after = (HessianAccumulator(data.shape[1], diagonal_only=diagonal_only) for _ in range(2))
    before.update(data.astype(np.float64))
    after.update(data[:, q].astype(np.float64))
    permuted = reorder.permute_statistics(before, q)
    assert permuted.diagonal_only == diagonal_only
    for name in ("diagonal", "abs_max", "abs_sum") + (() if diagonal_only else ("hessian",)):
        np.testing.assert_array_equal(getattr(permuted, name), getattr(after, name))
    assert permuted.tokens == after.tokens
    with pytest.raises(ValueError, match="permutation"):
        reorder.permute_statistics(before, np.zeros(data.shape[1], np.int64) if data.shape[1] > 1 else np.array([1]))
