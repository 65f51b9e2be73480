"""RotateResidualPass: the residual stream carried as ``x Q``, folded into the weights: lossless in float, the
float MatMuls it needs marked and kept out of quantization, streams it cannot prove left alone with a reason."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.ir import analysis
from lowbit.passes.fold_norm_scales import FoldNormScalesPass
from lowbit.passes.quant.rotation import random_orthogonal
from lowbit.passes.rotate_residual import ROTATION_KEY, RotateResidualPass
from tests import factories
from tests.factories import constant, graph_input, node
from tests.parity import check_valid, run
from tests.passes.test_fold_norm_scales import rms_norm
from tests.passes.test_reorder_channels import assert_lossless, token_batches

HIDDEN, VOCAB, INNER = 16, 80, 24  # the table past FoldWeightsPass.SHARED_LIMIT: a tie stays a tie


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 48), seed=st.integers(0, 2**32 - 1))
def test_random_orthogonal_is_orthogonal_and_fixed_by_its_seed(size, seed):
    q = random_orthogonal(size, seed)
    np.testing.assert_allclose(q @ q.T, np.eye(size), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(size, seed))


def test_random_orthogonal_differs_between_seeds_and_refuses_no_channels():
    assert not np.allclose(random_orthogonal(8, 0), random_orthogonal(8, 1))
    with pytest.raises(ValueError, match="at least one channel"):
        random_orthogonal(0, 0)


def residual_lm(
    seed: int = 0,
    tied: bool = True,
    stream_output: bool = False,
    outside_term: bool = False,
    second_table: bool = False,
    norm_op: bool = False,
    layers: int = 2,
) -> ir.Model:
    """ids -> Gather(table) -> ``layers`` x [x + (relu(rms(x) @ W_up) @ W_down + b)] -> rms -> head.

    ``tied``: the head reads ``Transpose(table)``, else a head of its own. ``stream_output``: the last stream
    value is also a graph output. ``outside_term``: a graph input is added into the stream (no writer).
    ``second_table``: a second embedding Gather is added to the first (as position embeddings are).
    ``norm_op``: the norms are opset 23's RMSNormalization instead of the exporter's decomposed form."""
    rng = np.random.default_rng(seed)
    ids = graph_input("ids", [2, 7], ir.DataType.INT64)
    table = constant("embed", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))
    nodes = [node("Gather", [table, ids], "embed_tokens")]
    inputs, inits, outputs = [ids], [table], []
    x = nodes[-1].outputs[0]
    if second_table:
        other = constant("embed_2", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))
        nodes.append(node("Gather", [other, ids], "embed_positions"))
        nodes.append(node("Add", [x, nodes[-1].outputs[0]], "embeddings"))
        inits.append(other)
        x = nodes[-1].outputs[0]
    for layer in range(layers):
        gamma = constant(f"gamma_{layer}", rng.uniform(0.5, 2, HIDDEN).astype(np.float32))
        normed, norm_inits = norm(x, gamma, nodes, f"norm_{layer}", norm_op)
        up = constant(f"w_up_{layer}", rng.standard_normal((HIDDEN, INNER)).astype(np.float32))
        down = constant(f"w_down_{layer}", rng.standard_normal((INNER, HIDDEN)).astype(np.float32))
        bias = constant(f"b_down_{layer}", rng.standard_normal(HIDDEN).astype(np.float32))
        nodes.append(node("MatMul", [normed, up], f"layers.{layer}.up_proj"))
        nodes.append(node("Relu", [nodes[-1].outputs[0]], f"act_{layer}"))
        nodes.append(node("MatMul", [nodes[-1].outputs[0], down], f"layers.{layer}.down_proj"))
        nodes.append(node("Add", [nodes[-1].outputs[0], bias], f"down_bias_{layer}"))
        nodes.append(node("Add", [x, nodes[-1].outputs[0]], f"residual_{layer}"))
        inits += [*norm_inits, up, down, bias]
        x = nodes[-1].outputs[0]
    if outside_term:
        extra = graph_input("extra", [2, 7, HIDDEN])
        inputs.append(extra)
        nodes.append(node("Add", [x, extra], "outside_term"))
        x = nodes[-1].outputs[0]
    if stream_output:
        outputs.append(x)
    final_gamma = constant("final_gamma", rng.uniform(0.5, 2, HIDDEN).astype(np.float32))
    normed, norm_inits = norm(x, final_gamma, nodes, "final_norm", norm_op)
    inits += norm_inits
    if tied:
        nodes.append(node("Transpose", [table], "tie", perm=[1, 0]))
        head = nodes[-1].outputs[0]
    else:
        head = constant("lm_head.weight", rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32))
        inits.append(head)
    nodes.append(node("MatMul", [normed, head], "lm_head", output="logits"))
    return factories.model(inputs, [nodes[-1].outputs[0], *outputs], nodes, inits, opset=23 if norm_op else 20)


def norm(x: ir.Value, gamma: ir.Value, nodes: list, prefix: str, norm_op: bool) -> tuple[ir.Value, list]:
    if not norm_op:
        return rms_norm(x, gamma, nodes, prefix)
    nodes.append(node("RMSNormalization", [x, gamma], prefix, axis=-1, epsilon=1e-5))
    return nodes[-1].outputs[0], [gamma]


def feeds(model: ir.Model, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    result = {"ids": rng.integers(0, VOCAB, (2, 7)).astype(np.int64)}
    if "extra" in [value.name for value in model.graph.inputs]:
        result["extra"] = rng.standard_normal((2, 7, HIDDEN)).astype(np.float32)
    return result


def rotated(model: ir.Model) -> RotateResidualPass:
    """Fold the norms, rotate: the pass must change the model and keep it valid."""
    FoldNormScalesPass()(model)
    rotate = RotateResidualPass()
    assert rotate(model).modified
    check_valid(model)
    return rotate


def float_rotations(model: ir.Model) -> dict[str, ir.Node]:
    return {node.metadata_props[ROTATION_KEY]: node for node in model.graph if ROTATION_KEY in node.metadata_props}


def test_tied_lm_rotates_losslessly_with_a_float_matmul_at_each_end():
    reference, model = residual_lm(), residual_lm()
    rotate = rotated(model)
    assert_lossless(reference, model, feeds(model))
    (stream,) = rotate.details["streams"]
    assert stream["rows_rotated"] == ["layers.0.up_proj", "layers.1.up_proj"]
    assert stream["columns_rotated"] == ["layers.0.down_proj", "layers.1.down_proj"]
    assert stream["tables_rotated"] == [] and stream["biases_rotated"] == 2
    ends = float_rotations(model)
    assert set(ends) == {"into_stream", "out_of_stream"}
    assert ends["into_stream"].inputs[0].producer().op_type == "Gather"  # the shared table itself is unchanged
    np.testing.assert_array_equal(
        model.graph.initializers["embed"].const_value.numpy(), reference.graph.initializers["embed"].const_value.numpy()
    )
    # the final norm's scale (tied head: not folded) reads the unrotated normalised value
    assert ends["out_of_stream"].outputs[0].uses()[0].node.op_type == "Mul"
    weights = {use.node.name for use in analysis.weight_uses(model.graph)}
    assert not weights & {node.name for node in ends.values()}


@pytest.mark.parametrize("norm_op", [False, True])
def test_untied_lm_rotates_table_and_head_with_no_float_matmul(norm_op):
    reference, model = residual_lm(tied=False, norm_op=norm_op), residual_lm(tied=False, norm_op=norm_op)
    rotate = rotated(model)
    assert_lossless(reference, model, feeds(model))
    (stream,) = rotate.details["streams"]
    assert stream["tables_rotated"] == ["embed"] and stream["float_rotations"] == []
    assert stream["rows_rotated"][-1] == "lm_head"
    assert not float_rotations(model)
    assert "lowbit_rotation_16" not in model.graph.initializers  # Q is stored only where a MatMul reads it


def test_stream_read_as_graph_output_keeps_its_name_and_value():
    reference, model = residual_lm(stream_output=True), residual_lm(stream_output=True)
    rotated(model)
    assert [value.name for value in model.graph.outputs] == [value.name for value in reference.graph.outputs]
    assert_lossless(reference, model, feeds(model))
    assert model.graph.outputs[1].producer().metadata_props[ROTATION_KEY] == "out_of_stream"


def test_a_term_added_from_outside_is_rotated_into_the_stream():
    reference, model = residual_lm(outside_term=True), residual_lm(outside_term=True)
    rotate = rotated(model)
    assert_lossless(reference, model, feeds(model))
    readers = [entry["reads"] for entry in rotate.details["streams"][0]["float_rotations"]]
    assert "extra" in readers


def test_a_second_table_joining_the_stream_is_rotated_in_once():
    """The second Gather's stream is the first one's from the Add on: its table is rotated in by a float MatMul
    (traced from the first table), and tracing from it again is refused, so no weight turns twice."""
    reference, model = residual_lm(second_table=True), residual_lm(second_table=True)
    rotate = rotated(model)
    assert_lossless(reference, model, feeds(model))
    assert rotate.details["rotated_streams"] == 1
    (skipped,) = rotate.details["skipped_streams"]
    assert skipped["node"] == "embed_positions" and "another table" in skipped["reason"]


def test_layer_norm_stream_is_left_alone_with_the_reason():
    """LayerNorm subtracts the row mean, which does not commute with Q: no reader is rotated, nothing changes."""
    rng = np.random.default_rng(0)
    ids = graph_input("ids", [2, 7], ir.DataType.INT64)
    table = constant("embed", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))
    gamma, beta = constant("gamma", np.ones(HIDDEN, np.float32)), constant("beta", np.zeros(HIDDEN, np.float32))
    weight = constant("w", rng.standard_normal((HIDDEN, 8)).astype(np.float32))
    nodes = [node("Gather", [table, ids], "embed_tokens")]
    nodes.append(node("LayerNormalization", [nodes[-1].outputs[0], gamma, beta], "norm", axis=-1))
    nodes.append(node("MatMul", [nodes[-1].outputs[0], weight], "proj", output="y"))
    model = factories.model([ids], [nodes[-1].outputs[0]], nodes, [table, gamma, beta, weight])
    before = ir.to_proto(model).SerializeToString()
    rotate = RotateResidualPass()
    assert not rotate(model).modified
    assert ir.to_proto(model).SerializeToString() == before
    (skipped,) = rotate.details["skipped_streams"]
    assert "no weight MatMul reads the stream" in skipped["reason"]


def test_unfolded_norm_scale_gets_the_unrotated_value():
    """Without FoldNormScalesPass the norms' scales are readers the stream cannot pass: still lossless."""
    reference, model = residual_lm(tied=False), residual_lm(tied=False)
    rotate = RotateResidualPass()
    rotate(model)
    assert_lossless(reference, model, feeds(model))
    assert rotate.details["rotated_streams"] == 0  # every reader is an exit: nothing is gained, nothing changes


@pytest.mark.slow
def test_exported_qwen2_rotates_every_projection_losslessly(tiny_qwen2):
    reference, model = tiny_qwen2(), tiny_qwen2()
    FoldNormScalesPass()(model)
    rotate = RotateResidualPass()
    assert rotate(model).modified
    check_valid(model)
    (stream,) = rotate.details["streams"]
    readers = [f"self_attn.{name}_proj" for name in "qkv"] + ["mlp.gate_proj", "mlp.up_proj"]
    assert stream["rows_rotated"] == [f"model.layers.{i}.{name}" for i in range(2) for name in readers] + ["lm_head"]
    writers = ["self_attn.o_proj", "mlp.down_proj"]
    assert stream["columns_rotated"] == [f"model.layers.{i}.{name}" for i in range(2) for name in writers]
    assert stream["tables_rotated"] and stream["float_rotations"] == []  # untied: the table itself turns
    for batch in token_batches(2):
        (want,), (got,) = run(reference, batch), run(model, batch)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_optimize_with_rotate_quantizes_the_same_weights_and_reports_the_float_rotations():
    import lowbit
    from lowbit.runtime.calibration import collect

    batches = [feeds(residual_lm(), seed) for seed in range(4)]
    plain = lowbit.optimize(residual_lm(), lowbit.Recipe(bits=4, group_size=8, method="gptq"), calibration=batches)
    recipe = lowbit.Recipe(bits=4, group_size=8, method="gptq", rotate=True)
    result = lowbit.optimize(residual_lm(), recipe, calibration=batches)
    check_valid(result.model)
    names = [record.name for record in result.report.passes]
    assert names.index("FoldNormScalesPass") < names.index("RotateResidualPass") < names.index("CaptureCalibrationPass")
    assert sorted(w.layer for w in result.report.weights) == sorted(w.layer for w in plain.report.weights)
    skipped = [entry for entry in result.report.skipped if entry.kind == "rotation"]
    assert len(skipped) == 2 and all("float" in entry.reason for entry in skipped)
    rotation_nodes = {entry.layer for entry in skipped}
    assert [entry.kind for entry in result.report.skipped if entry.layer in rotation_nodes] == ["rotation"] * 2
    with pytest.raises(ValueError, match="rotate=True changes the activations"):
        lowbit.optimize(residual_lm(), recipe, calibration=collect(residual_lm(), batches))
