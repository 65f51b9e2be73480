"""ReorderChannelsPass: lossless at fp32, folded into constants (no node added), statistics permuted like
the activations, sorted channels, and a reason for every weight it leaves alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.passes.capture_calibration import CaptureCalibrationPass
from lowbit.passes.quant.reorder import position_scores
from lowbit.passes.reorder_channels import ReorderChannelsPass
from lowbit.runtime.calibration import calibration_of, collect
from tests import factories
from tests.factories import constant, graph_input, node
from tests.parity import check_valid, run, serialized

RTOL = 1e-5  # fp32 parity, relative to the largest output: folding only changes float round-off


def gated_mlp(seed: int = 0, hidden: int = 12, inner: int = 20) -> ir.Model:
    """x + down(silu(gate(x)) * (up(x) + b_up)); a few gate/up channels are made large."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [2, 5, hidden])
    boost = np.ones(inner, np.float32)
    boost[rng.choice(inner, 4, replace=False)] = 8.0
    w_gate = constant("w_gate", (rng.standard_normal((hidden, inner)) * boost).astype(np.float32))
    w_up = constant("w_up", (rng.standard_normal((hidden, inner)) * boost).astype(np.float32))
    b_up = constant("b_up", rng.standard_normal(inner).astype(np.float32))
    w_down = constant("w_down", rng.standard_normal((inner, hidden)).astype(np.float32))
    gate = node("MatMul", [x, w_gate], "gate_proj")
    up = node("MatMul", [x, w_up], "up_proj")
    up_bias = node("Add", [up.outputs[0], b_up], "up_bias")
    sigmoid = node("Sigmoid", [gate.outputs[0]], "sigmoid")
    silu = node("Mul", [gate.outputs[0], sigmoid.outputs[0]], "silu")
    product = node("Mul", [silu.outputs[0], up_bias.outputs[0]], "gating")
    down = node("MatMul", [product.outputs[0], w_down], "down_proj")
    residual = node("Add", [x, down.outputs[0]], "residual", output="y")
    nodes = [gate, up, up_bias, sigmoid, silu, product, down, residual]
    return factories.model([x], [residual.outputs[0]], nodes, [w_gate, w_up, b_up, w_down])


def gqa_attention(seed: int = 0, hidden: int = 12, kv_heads: int = 2, group: int = 3, head_dim: int = 4) -> ir.Model:
    """Grouped-query attention as torch exports it: Reshape/Transpose per head, repeat_kv by
    Unsqueeze/Expand/Reshape, softmax(q k^T) @ v, Transpose/Reshape back, o_proj. k and v share their
    bias constant (exporters merge equal constants)."""
    rng = np.random.default_rng(seed)
    batch, seq, heads = 2, 5, kv_heads * group
    x = graph_input("x", [batch, seq, hidden])

    def weight(name, width, scale=1.0):
        return constant(name, (rng.standard_normal((hidden, width)) * scale).astype(np.float32))

    def shape(name, dims):
        return constant(name, np.array(dims, np.int64))

    w_q, w_k, w_v = (
        weight("w_q", heads * head_dim),
        weight("w_k", kv_heads * head_dim),
        weight("w_v", kv_heads * head_dim, 3),
    )
    kv_bias = constant("kv_bias", rng.standard_normal(kv_heads * head_dim).astype(np.float32))
    w_o = constant("w_o", rng.standard_normal((heads * head_dim, hidden)).astype(np.float32))
    split_q, split_kv = (
        shape("split_q", [batch, seq, heads, head_dim]),
        shape("split_kv", [batch, seq, kv_heads, head_dim]),
    )
    repeat = shape("repeat", [batch, kv_heads, group, seq, head_dim])
    merge_heads, merge = (
        shape("merge_heads", [batch, heads, seq, head_dim]),
        shape("merge", [batch, seq, heads * head_dim]),
    )
    axis2 = shape("axis2", [2])
    nodes = []

    def add(op, inputs, name, **attributes):
        nodes.append(node(op, inputs, name, **attributes))
        return nodes[-1].outputs[0]

    def kv(prefix, w):
        projected = add("Add", [add("MatMul", [x, w], f"{prefix}_proj"), kv_bias], f"{prefix}_bias")
        per_head = add(
            "Transpose", [add("Reshape", [projected, split_kv], f"{prefix}_view")], f"{prefix}_t", perm=[0, 2, 1, 3]
        )
        expanded = add("Expand", [add("Unsqueeze", [per_head, axis2], f"{prefix}_unsq"), repeat], f"{prefix}_expand")
        return add("Reshape", [expanded, merge_heads], f"{prefix}_repeat")

    q = add(
        "Transpose", [add("Reshape", [add("MatMul", [x, w_q], "q_proj"), split_q], "q_view")], "q_t", perm=[0, 2, 1, 3]
    )
    k, v = kv("k", w_k), kv("v", w_v)
    scores = add("MatMul", [q, add("Transpose", [k], "k_t2", perm=[0, 1, 3, 2])], "scores")
    probs = add("Softmax", [scores], "softmax", axis=-1)
    context = add("Transpose", [add("MatMul", [probs, v], "context")], "context_t", perm=[0, 2, 1, 3])
    flat = add("Reshape", [context, merge], "context_flat")
    output = add("Add", [x, add("MatMul", [flat, w_o], "o_proj")], "residual")
    output.name = "y"
    constants = [w_q, w_k, w_v, kv_bias, w_o, split_q, split_kv, repeat, merge_heads, merge, axis2]
    return factories.model([x], [output], nodes, constants)


def batches(model: ir.Model, count: int = 4) -> list[dict[str, np.ndarray]]:
    return [factories.feeds_for(model, seed) for seed in range(10, 10 + count)]


def token_batches(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(10)
    return [{"input_ids": rng.integers(0, 96, (2, 12)).astype(np.int64)} for _ in range(count)]


def calibrated(build, **kwargs) -> ir.Model:
    model = build(**kwargs)
    CaptureCalibrationPass(batches(model))(model)
    return model


def assert_lossless(reference: ir.Model, candidate: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    """Every output equal within ``RTOL`` relative, and ``RTOL`` of the output's largest magnitude absolute."""
    for want, got in zip(run(reference, feeds), run(candidate, feeds)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def weight_of(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def reordered(reference: ir.Model, model: ir.Model, feeds, criterion: str = "absmax") -> ReorderChannelsPass:
    """Run the pass on calibrated ``model``: it must change it, keep it valid, add no node, stay lossless."""
    ops = [n.op_type for n in model.graph]
    reorder = ReorderChannelsPass(criterion)
    assert reorder(model).modified
    check_valid(model)
    assert [n.op_type for n in model.graph] == ops  # nothing added at run time
    assert_lossless(reference, model, feeds)
    return reorder


def test_mlp_permutation_is_folded_losslessly_without_new_nodes():
    reference, model = gated_mlp(), calibrated(gated_mlp)
    reorder = reordered(reference, model, factories.feeds_for(model, seed=99))
    assert set(model.graph.initializers) == set(reference.graph.initializers)
    (record,) = reorder.details["reordered"]
    assert record["targets"] == ["down_proj"] and sorted(record["sources"]) == ["gate_proj", "up_proj"]
    assert record["classes"] == 1 and record["constants"] == 1 and record["moved"] > 0
    # gate/up read the graph input: nothing produces their input channels
    assert {entry["layer"] for entry in reorder.details["skipped"]} == {"gate_proj", "up_proj"}
    assert all("graph input" in entry["reason"] for entry in reorder.details["skipped"])
    counts = {
        key: reorder.details[key]
        for key in ("reordered_weights", "permuted_sources", "permuted_constants", "skipped_weights")
    }
    assert counts == {"reordered_weights": 1, "permuted_sources": 2, "permuted_constants": 1, "skipped_weights": 2}


@pytest.mark.parametrize("criterion", ["absmax", "hessian"])
def test_statistics_after_reorder_equal_fresh_statistics_and_are_sorted(criterion):
    model = calibrated(gated_mlp)
    ReorderChannelsPass(criterion)(model)
    kept = calibration_of(model).by_activation
    fresh = collect(model, batches(model)).by_activation
    assert set(kept) == set(fresh)
    for name in fresh:
        np.testing.assert_allclose(kept[name].hessian, fresh[name].hessian, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(kept[name].abs_max, fresh[name].abs_max, rtol=1e-6)
        assert kept[name].tokens == fresh[name].tokens
    scores = position_scores(fresh["gating_out"], criterion)
    assert np.all(np.diff(scores) <= 0)  # down_proj's input channels now run from large to small


def test_gqa_attention_permutes_within_kv_heads_and_copies_the_shared_bias():
    reference, model = gqa_attention(), calibrated(gqa_attention)
    reorder = reordered(reference, model, factories.feeds_for(model, seed=99))
    (record,) = reorder.details["reordered"]
    assert record["targets"] == ["o_proj"] and record["sources"] == ["v_proj"]
    assert record["classes"] == 2  # one per KV head
    np.testing.assert_array_equal(weight_of(model, "kv_bias"), weight_of(reference, "kv_bias"))  # k keeps the original
    v_bias = next(n for n in model.graph if n.name == "v_bias").inputs[1]
    assert v_bias.name != "kv_bias" and v_bias.is_initializer()
    # o_proj rows move only inside each head, and every query head of a KV head moves the same way
    w_o, w_o_before = weight_of(model, "w_o"), weight_of(reference, "w_o")
    local = []
    for head in range(6):
        block, block_before = w_o[4 * head : 4 * head + 4], w_o_before[4 * head : 4 * head + 4]
        local.append([next(i for i, row in enumerate(block_before) if np.array_equal(row, new)) for new in block])
    assert local[0] == local[1] == local[2] and local[3] == local[4] == local[5]
    assert local[0] != [0, 1, 2, 3] or local[3] != [0, 1, 2, 3]
    fresh = collect(model, batches(model)).by_activation["context_flat_out"]
    np.testing.assert_allclose(
        calibration_of(model).by_activation["context_flat_out"].hessian, fresh.hessian, rtol=1e-6, atol=1e-9
    )


def test_reasons_for_weights_it_cannot_reorder():
    model = calibrated(gqa_attention)
    reorder = ReorderChannelsPass()
    reorder(model)
    reasons = {entry["layer"]: entry["reason"] for entry in reorder.details["skipped"]}
    assert set(reasons) == {"q_proj", "k_proj", "v_proj"}


def test_a_chain_value_read_elsewhere_blocks_the_fold():
    model = gated_mlp()
    silu = next(n for n in model.graph if n.name == "silu")
    mean = ir.node("ReduceMean", [silu.outputs[0]], name="probe")  # the SiLU output is also read elsewhere
    mean.outputs[0].name = "probe_out"
    model.graph.append(mean)
    model.graph.outputs.append(mean.outputs[0])
    CaptureCalibrationPass(batches(model))(model)
    before = serialized(model)
    reorder = ReorderChannelsPass()
    assert not reorder(model).modified
    assert serialized(model) == before
    down = next(entry for entry in reorder.details["skipped"] if entry["layer"] == "down_proj")
    assert down["reason"] == "'silu_out' also feeds ReduceMean 'probe'"


def test_sorted_model_is_left_byte_identical():
    model = calibrated(gated_mlp)
    ReorderChannelsPass()(model)
    before = serialized(model)
    assert not ReorderChannelsPass()(model).modified
    assert serialized(model) == before


def test_needs_calibration_and_a_known_criterion():
    with pytest.raises(ValueError, match="CaptureCalibrationPass"):
        ReorderChannelsPass()(gated_mlp())
    with pytest.raises(ValueError, match="criterion"):
        ReorderChannelsPass("median")


@pytest.mark.slow
def test_exported_qwen2_reorders_o_and_down_of_every_layer(tiny_qwen2):
    """The torch exporter's graph (symbolic batch/seq, GQA, q/k/v biases): o_proj through v_proj and
    down_proj through gate/up are reordered, the rest is reported."""
    reference, model = tiny_qwen2(), tiny_qwen2()
    CaptureCalibrationPass(token_batches())(model)
    reorder = reordered(reference, model, token_batches(5)[-1], "hessian")
    targets = sorted(layer.rsplit(".", 1)[-1] for record in reorder.details["reordered"] for layer in record["targets"])
    assert targets == ["down_proj", "down_proj", "o_proj", "o_proj"]
    assert {record["classes"] for record in reorder.details["reordered"]} == {1, 2}  # MLP: 1, attention: 2 KV heads
    assert reorder.details["permuted_constants"] == 2  # the v_proj biases
    skipped = sorted(entry["layer"].rsplit(".", 1)[-1] for entry in reorder.details["skipped"])
    assert skipped == sorted(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * 2 + ["lm_head"])


def export_tiny_qwen2():
    """The ONNX proto of a random Qwen2 (GQA 4/2 heads, q/k/v biases, untied head) with random norm
    gammas and biases, exported by torch (decomposed RMSNorm, symbolic batch/seq)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="the 'models' extra (transformers) is not installed")
    from lowbit.tools import models

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    module = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name:
                parameter.uniform_(-2, 2)
            elif "bias" in name:
                parameter.normal_(0, 0.5)
    return ir.to_proto(models.export_causal_lm(module))


@pytest.mark.slow
def test_optimize_runs_fold_norms_then_calibration_then_reorder(tiny_qwen2):
    import lowbit

    reference, model = tiny_qwen2(), tiny_qwen2()
    recipe = lowbit.Recipe(bits=8, group_size=32, method="gptq", fold_norms=True, reorder="absmax")
    result = lowbit.optimize(model, recipe, calibration=token_batches())
    check_valid(result.model)
    names = [record.name for record in result.report.passes]
    assert (
        names.index("FoldNormScalesPass") < names.index("CaptureCalibrationPass") < names.index("ReorderChannelsPass")
    )
    assert names.index("ReorderChannelsPass") < names.index("QuantizeWeightsPass")
    details = {record.name: record.details for record in result.report.passes}
    assert (
        details["FoldNormScalesPass"]["folded_norms"] == 5 and details["ReorderChannelsPass"]["reordered_weights"] == 4
    )
    feeds = token_batches(5)[-1]
    (want,), (got,) = run(reference, feeds), run(result.model, feeds)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02  # 8-bit GPTQ on random weights


def test_recipe_validates_reorder_and_requires_calibration():
    import lowbit

    with pytest.raises(ValueError, match="reorder"):
        lowbit.Recipe(reorder="median")
    recipe = lowbit.Recipe(reorder="hessian")
    assert recipe.needs_calibration
    with pytest.raises(ValueError, match="calibration"):
        lowbit.optimize(gated_mlp(), recipe)


def test_command_line_flags_reach_the_recipe():
    from lowbit import cli

    args = cli.build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--fold-norms", "--reorder", "hessian"])
    recipe = cli._recipe(args)
    assert recipe.fold_norms and recipe.reorder == "hessian"
    assert cli._recipe(cli.build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx"])).reorder is None


def test_statistics_passed_in_are_not_changed_so_they_can_serve_another_model():
    """One collect() for several optimize() calls (as the benchmarks do): reordering one model must not
    permute the caller's statistics (found when a second reorder saw sorted statistics and did nothing)."""
    import lowbit

    statistics = collect(gated_mlp(), batches(gated_mlp()))
    before = {name: accumulator.hessian.copy() for name, accumulator in statistics.by_activation.items()}
    recipe = lowbit.Recipe(bits=4, group_size=8, reorder="hessian")
    reports = [lowbit.optimize(gated_mlp(), recipe, calibration=statistics).report for _ in range(2)]
    for name, hessian in before.items():
        np.testing.assert_array_equal(statistics.by_activation[name].hessian, hessian)
    details = [next(p for p in report.passes if p.name == "ReorderChannelsPass").details for report in reports]
    assert details[0]["reordered_weights"] == details[1]["reordered_weights"] == 1


def _constant_weight_chain() -> ir.Model:
    """x[1, 3] @ C (a Constant node's [3, 4] output) -> h @ W2 [4, 2] + b: h's channels come from C."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    c = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "c")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c_out"], name="c_constant", value=c),
            helper.make_node("MatMul", ["x", "c_out"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "w2"], ["m"], name="second"),
            helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
        ],
        "constant_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "b"),
        ],
    )
    model = ir.serde.deserialize_model(
        onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    )
    output = model.graph.node(0).outputs[0]
    output.const_value = ir.tensor(numpy_helper.to_array(c))  # as onnx_ir's and onnxscript's matchers leave it
    return model


def test_a_constant_node_weight_is_never_permuted():
    """Permuting a Constant node's const_value is not what gets saved (fuzz seed 300): such a producer is
    left alone with the reason, and the model stays exact."""
    reference, model = _constant_weight_chain(), calibrated(_constant_weight_chain)
    before = serialized(model)
    reorder = ReorderChannelsPass()
    assert not reorder(model).modified and serialized(model) == before
    reasons = " ".join(entry["reason"] for entry in reorder.details["skipped"])
    assert "Constant node's output" in reasons
    assert_lossless(reference, model, factories.feeds_for(model, seed=3))
