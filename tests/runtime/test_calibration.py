"""Calibration through ONNX Runtime: streamed statistics equal the one-shot NumPy ones."""

import numpy as np
import pytest

from lowbit.runtime.calibration import collect, weight_activations
from tests import factories


def _relu_hidden(model, x):
    w1 = model.graph.initializers["w1"].const_value.numpy().astype(np.float64)
    b1 = model.graph.initializers["b1"].const_value.numpy().astype(np.float64)
    return np.maximum(x.astype(np.float64) @ w1 + b1, 0)


def test_statistics_equal_numpy_on_every_weight_input():
    model = factories.mlp()
    batches = [factories.feeds_for(model, seed=seed) for seed in range(5)]
    stats = collect(model, batches)
    assert weight_activations(model) == {"x": 40, "act_out": 72}
    assert stats.batches == 5
    inputs = np.concatenate([b["x"].reshape(-1, 40) for b in batches]).astype(np.float64)
    first = stats.by_activation["x"]
    assert first.tokens == 5 * 15
    exact = inputs.T @ inputs  # H from float32 products: to float32 round-off of its largest entry
    np.testing.assert_allclose(first.hessian, exact, rtol=0, atol=1e-6 * np.abs(exact).max())
    np.testing.assert_allclose(first.abs_max, np.abs(inputs).max(axis=0))
    np.testing.assert_allclose(first.mean_abs, np.abs(inputs).mean(axis=0))
    hidden = _relu_hidden(model, inputs)
    np.testing.assert_allclose(stats.by_activation["act_out"].hessian, hidden.T @ hidden, rtol=1e-5)


def test_diagonals_are_collected_for_the_activations_not_asked_for_whole():
    """``only`` gets a full H, ``diagonals`` (less those) ``diag(H)`` only: the model's weights fed to the session,
    so the activations may differ from a session holding them in the last bits only."""
    model = factories.mlp()
    batches = [factories.feeds_for(model, seed=seed) for seed in range(3)]
    whole = collect(model, batches)
    mixed = collect(model, batches, only={"x"}, diagonals={"x", "act_out"})
    diagonal = collect(model, batches, only=set(), diagonals={"x", "act_out"})
    assert not mixed.by_activation["x"].diagonal_only and mixed.by_activation["act_out"].diagonal_only
    np.testing.assert_array_equal(mixed.by_activation["x"].hessian, whole.by_activation["x"].hessian)
    for stats in (mixed, diagonal):
        for name, accumulator in stats.by_activation.items():
            expected = np.diagonal(whole.by_activation[name].hessian)
            np.testing.assert_allclose(accumulator.diagonal, expected, rtol=1e-5)
            assert accumulator.tokens == whole.by_activation[name].tokens


def test_weights_reading_the_same_input_share_one_hessian():
    model = factories.shared_weight()
    stats = collect(model, [factories.feeds_for(model)])
    assert sorted(stats.by_activation) == ["first_out", "x"]


def test_collect_leaves_the_model_unchanged():
    from tests.parity import serialized

    model = factories.mlp()
    before = serialized(model)
    collect(model, [factories.feeds_for(model)])
    assert serialized(model) == before


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        collect(factories.mlp(), [])


def test_a_model_without_weights_is_an_error():
    model = factories.mlp()
    for use_name in ("w1", "w2"):
        model.graph.initializers[use_name].const_value = None
    with pytest.raises(ValueError, match="no weight MatMul"):
        collect(model, [factories.feeds_for(model)])


def test_collect_times_the_model_and_the_statistics_apart():
    model = factories.mlp()
    stats = collect(model, [factories.feeds_for(model, seed) for seed in range(3)])
    assert set(stats.seconds) == {"onnxruntime", "statistics"} and all(s > 0 for s in stats.seconds.values())


def test_the_pass_reports_the_seconds_of_a_collection_it_ran():
    from lowbit.passes.capture_calibration import CaptureCalibrationPass

    model = factories.mlp()
    feeds = [factories.feeds_for(model, seed) for seed in range(2)]
    ran = CaptureCalibrationPass(feeds)
    ran(model)
    assert ran.details["seconds_onnxruntime"] > 0 and ran.details["seconds_statistics"] > 0
    given = CaptureCalibrationPass(collect(model, feeds))
    given(model)
    assert not any(key.startswith("seconds") for key in given.details)


def test_the_session_runs_only_the_nodes_the_statistics_need():
    """The model's outputs and every node after the last weight input asked for are dropped (an LM's head runs
    for nothing otherwise), with the initializers only they read; the statistics stay the same."""
    import onnx_ir as ir

    from lowbit.runtime.calibration import _session_with_outputs, keep_nodes_needed_for

    model = factories.mlp()
    proto = ir.to_proto(model)
    keep_nodes_needed_for(proto.graph, ["act_out"])
    assert "w2" not in {tensor.name for tensor in proto.graph.initializer}
    assert "w1" in {tensor.name for tensor in proto.graph.initializer}
    assert all("act_out" not in node.input for node in proto.graph.node)
    assert [value.name for value in _session_with_outputs(model, ["act_out"], None).get_outputs()] == ["act_out"]
    batches = [factories.feeds_for(model, seed=seed) for seed in range(3)]
    full = collect(model, batches)
    for only in ({"act_out"}, {"x"}):
        part = collect(model, batches, only=only)
        for name in only:
            np.testing.assert_array_equal(part.by_activation[name].hessian, full.by_activation[name].hessian)
            np.testing.assert_array_equal(part.by_activation[name].abs_sum, full.by_activation[name].abs_sum)


def test_nodes_whose_subgraphs_read_a_needed_value_are_kept():
    import onnx

    from lowbit.runtime.calibration import keep_nodes_needed_for

    then = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["h"], ["t"])], "then", [], [])
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["h"]),
            onnx.helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then),
            onnx.helper.make_node("Neg", ["x"], ["unused"]),
        ],
        "g",
        [],
        [],
    )
    keep_nodes_needed_for(graph, ["y"])
    assert [node.op_type for node in graph.node] == ["Relu", "If"]


def test_the_session_threads_sleep_between_runs():
    """The statistics are computed between two runs: the session's threads must not spin meanwhile."""
    from lowbit.runtime.calibration import _session_with_outputs
    from lowbit.runtime.threads import NO_SPINNING

    key, value = NO_SPINNING
    options = _session_with_outputs(factories.mlp(), ["act_out"], None).get_session_options()
    assert options.get_session_config_entry(key) == value


def test_batches_folded_beside_the_next_run_give_the_sums_of_folding_in_order():
    """Each run's outputs are folded on a thread while the next batch runs: the sums are the ones of folding
    every batch in order, bit for bit, and a batch that cannot be folded (NaN) still fails the collection."""
    from lowbit.passes.quant.hessian import HessianAccumulator

    model = factories.mlp()
    batches = [factories.feeds_for(model, seed=seed) for seed in range(6)]
    stats = collect(model, batches)
    in_order = HessianAccumulator(40)
    for batch in batches:
        in_order.update(batch["x"])
    np.testing.assert_array_equal(stats.by_activation["x"].hessian, in_order.hessian)
    np.testing.assert_array_equal(stats.by_activation["x"].abs_sum, in_order.abs_sum)
    poisoned = {name: np.full_like(value, np.nan) for name, value in batches[2].items()}
    with pytest.raises(ValueError, match="NaN"):
        collect(model, [*batches[:2], poisoned, *batches[3:]])
