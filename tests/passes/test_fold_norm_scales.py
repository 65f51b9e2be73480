"""FoldNormScalesPass: norm gammas (and LayerNorm betas) move into the reading weights losslessly,
only when every reader is a weight MatMul, with a reason otherwise; BatchNorm folds into Conv."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.passes.fold_norm_scales import FoldNormScalesPass
from tests import factories
from tests.factories import constant, graph_input, node
from tests.parity import check_valid, serialized
from tests.passes.test_reorder_channels import assert_lossless, export_tiny_qwen2


def rms_norm(x: ir.Value, gamma: ir.Value, nodes: list, prefix: str) -> ir.Value:
    """The exporter's decomposed RMSNorm: gamma * (x * 1/sqrt(mean(x^2) + eps))."""
    two, eps = (
        constant(f"{prefix}_two", np.array(2.0, np.float32)),
        constant(f"{prefix}_eps", np.array(1e-5, np.float32)),
    )
    axes = constant(f"{prefix}_axes", np.array([-1], np.int64))
    steps = [
        ("Pow", [x, two]),
        ("ReduceMean", [None, axes]),
        ("Add", [None, eps]),
        ("Sqrt", [None]),
        ("Reciprocal", [None]),
    ]
    value = None
    for index, (op, inputs) in enumerate(steps):
        nodes.append(node(op, [value if item is None else item for item in inputs], f"{prefix}_{index}"))
        value = nodes[-1].outputs[0]
    nodes.append(node("Mul", [x, value], f"{prefix}_normed"))
    nodes.append(node("Mul", [gamma, nodes[-1].outputs[0]], f"{prefix}_gamma"))
    return nodes[-1].outputs[0], [two, eps, axes, gamma]


def projections(source: ir.Value, names: list[str], rng, hidden: int, nodes: list) -> tuple[list[ir.Value], list]:
    weights = [constant(f"w_{name}", rng.standard_normal((hidden, hidden)).astype(np.float32)) for name in names]
    for name, weight in zip(names, weights):
        nodes.append(node("MatMul", [source, weight], name))
    return [n.outputs[0] for n in nodes[-len(names) :]], weights


def summed(values: list[ir.Value], nodes: list, output: str = "y") -> ir.Value:
    total = values[0]
    for index, value in enumerate(values[1:]):
        nodes.append(node("Add", [total, value], f"sum_{index}", output=output if index == len(values) - 2 else None))
        total = nodes[-1].outputs[0]
    return total


def decomposed_rms_qkv(seed: int = 0, hidden: int = 16) -> ir.Model:
    """x -> RMSNorm (decomposed, random gamma) -> q, k, v MatMuls -> q + k + v."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [2, 5, hidden])
    nodes: list = []
    normed, inits = rms_norm(x, constant("gamma", rng.uniform(-2, 2, hidden).astype(np.float32)), nodes, "norm")
    outputs, weights = projections(normed, ["q_proj", "k_proj", "v_proj"], rng, hidden, nodes)
    y = summed(outputs, nodes)
    return factories.model([x], [y], nodes, inits + weights)


def rms_normalization_op(seed: int = 0, hidden: int = 16) -> ir.Model:
    """x -> RMSNormalization (opset 23) -> gate, up -> gate * up."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [2, 5, hidden])
    gamma = constant("gamma", rng.uniform(-2, 2, hidden).astype(np.float32))
    nodes = [node("RMSNormalization", [x, gamma], "norm", axis=-1, epsilon=1e-5)]
    outputs, weights = projections(nodes[0].outputs[0], ["gate_proj", "up_proj"], rng, hidden, nodes)
    nodes.append(node("Mul", outputs, "gating", output="y"))
    return factories.model([x], [nodes[-1].outputs[0]], nodes, [gamma, *weights], opset=23)


def layer_norm(seed: int = 0, hidden: int = 16, residual: bool = False) -> ir.Model:
    """x -> LayerNormalization (gamma, beta) -> a (with a bias Add), b (no bias) -> a + b [+ the norm output]."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [2, 5, hidden])
    gamma = constant("gamma", rng.uniform(-2, 2, hidden).astype(np.float32))
    beta = constant("beta", rng.standard_normal(hidden).astype(np.float32))
    bias = constant("bias_a", rng.standard_normal(hidden).astype(np.float32))
    nodes = [node("LayerNormalization", [x, gamma, beta], "norm", axis=-1, epsilon=1e-5)]
    (a, b), weights = projections(nodes[0].outputs[0], ["a_proj", "b_proj"], rng, hidden, nodes)
    nodes.append(node("Add", [a, bias], "a_bias"))
    terms = [nodes[-1].outputs[0], b] + ([nodes[0].outputs[0]] if residual else [])
    y = summed(terms, nodes)
    return factories.model([x], [y], nodes, [gamma, beta, bias, *weights])


def layer_norm_gemm(seed: int = 0, hidden: int = 12, n: int = 5, trans_b: int = 1) -> ir.Model:
    """x -> LayerNormalization (gamma, beta) -> Gemm(transB, alpha, C, beta): the weight stored [N, K]."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [4, hidden])
    gamma = constant("gamma", rng.uniform(-2, 2, hidden).astype(np.float32))
    beta = constant("beta", rng.standard_normal(hidden).astype(np.float32))
    weight = constant("w", rng.standard_normal((n, hidden) if trans_b else (hidden, n)).astype(np.float32))
    c = constant("c", rng.standard_normal(n).astype(np.float32))
    nodes = [node("LayerNormalization", [x, gamma, beta], "norm", axis=-1, epsilon=1e-5)]
    nodes.append(
        node("Gemm", [nodes[0].outputs[0], weight, c], "gemm", output="y", transB=trans_b, alpha=0.5, beta=2.0)
    )
    return factories.model([x], [nodes[-1].outputs[0]], nodes, [gamma, beta, weight, c])


def tied_head(seed: int = 0, vocab: int = 30, hidden: int = 16) -> ir.Model:
    """ids -> Gather(E) -> RMSNorm -> MatMul(Transpose(E)): the final norm of a tied LM head."""
    rng = np.random.default_rng(seed)
    ids = graph_input("ids", [1, 7], ir.DataType.INT64)
    table = constant("embed", rng.standard_normal((vocab, hidden)).astype(np.float32))
    nodes = [node("Gather", [table, ids], "embed_tokens")]
    normed, inits = rms_norm(
        nodes[0].outputs[0], constant("gamma", rng.uniform(-2, 2, hidden).astype(np.float32)), nodes, "norm"
    )
    nodes.append(node("Transpose", [table], "tie", perm=[1, 0]))
    nodes.append(node("MatMul", [normed, nodes[-1].outputs[0]], "lm_head", output="logits"))
    return factories.model([ids], [nodes[-1].outputs[0]], nodes, [table, *inits])


def conv_batch_norm(seed: int = 0, with_bias: bool = True) -> ir.Model:
    """x -> Conv(W[, b]) -> BatchNormalization -> Relu."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [1, 3, 8, 8])
    weight = constant("conv_w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    params = [
        constant(name, array.astype(np.float32))
        for name, array in [
            ("bn_scale", rng.uniform(0.5, 2, 4)),
            ("bn_bias", rng.standard_normal(4)),
            ("bn_mean", rng.standard_normal(4)),
            ("bn_var", rng.uniform(0.5, 2, 4)),
        ]
    ]
    conv_inputs = [x, weight]
    inits = [weight, *params]
    if with_bias:
        conv_inputs.append(constant("conv_b", rng.standard_normal(4).astype(np.float32)))
        inits.append(conv_inputs[-1])
    conv = node("Conv", conv_inputs, "conv", pads=[1, 1, 1, 1])
    bn = node("BatchNormalization", [conv.outputs[0], *params], "bn", epsilon=1e-3)
    relu = node("Relu", [bn.outputs[0]], "relu", output="y")
    return factories.model([x], [relu.outputs[0]], [conv, bn, relu], inits)


def folded(build, **kwargs) -> tuple[ir.Model, ir.Model, FoldNormScalesPass]:
    reference, model = build(**kwargs), build(**kwargs)
    fold = FoldNormScalesPass()
    assert fold(model).modified
    check_valid(model)
    assert_lossless(reference, model, factories.feeds_for(model, seed=3))
    return reference, model, fold


def test_decomposed_rms_norm_gamma_moves_into_q_k_v():
    reference, model, fold = folded(decomposed_rms_qkv)
    assert [n.op_type for n in model.graph] == [n.op_type for n in reference.graph]
    np.testing.assert_array_equal(model.graph.initializers["gamma"].const_value.numpy(), np.ones(16))
    gamma = reference.graph.initializers["gamma"].const_value.numpy()
    for name in ("w_q_proj", "w_k_proj", "w_v_proj"):
        before = reference.graph.initializers[name].const_value.numpy()
        np.testing.assert_allclose(
            model.graph.initializers[name].const_value.numpy(), gamma[:, None] * before, rtol=1e-6
        )
    assert fold.details["folded"] == [
        {"node": "norm_gamma", "op": "Mul", "weights": ["q_proj", "k_proj", "v_proj"], "new_adds": 0}
    ]
    assert (fold.details["folded_norms"], fold.details["scaled_weights"], fold.details["skipped_norms"]) == (1, 3, 0)


def test_rms_normalization_op_scale_becomes_one():
    _, model, fold = folded(rms_normalization_op)
    assert fold.details["folded"][0]["op"] == "RMSNormalization"
    np.testing.assert_array_equal(model.graph.initializers["gamma"].const_value.numpy(), np.ones(16))


def test_layer_norm_beta_goes_into_the_bias_add_or_a_new_add():
    reference, model, fold = folded(layer_norm)
    ops = [n.op_type for n in model.graph]
    assert len(ops) == len(reference.graph) + 1 and ops.count("Add") == 3  # b_proj got a bias Add
    norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert len(norm.inputs) == 2
    assert "beta" not in model.graph.initializers
    assert fold.details["bias_adds"] == 1 and fold.details["folded"][0]["weights"] == ["a_proj", "b_proj"]


@pytest.mark.parametrize("trans_b", [1, 0])
def test_layer_norm_into_a_gemm_scales_its_input_channels_whatever_the_layout(trans_b):
    """Found by the fuzzer: a Gemm with transB=1 stores W as [N, K]; gamma scales K and beta @ W gets alpha."""
    reference, model, fold = folded(layer_norm_gemm, trans_b=trans_b)
    gamma = reference.graph.initializers["gamma"].const_value.numpy()
    before, after = (m.graph.initializers["w"].const_value.numpy() for m in (reference, model))
    np.testing.assert_allclose(after, gamma[None, :] * before if trans_b else gamma[:, None] * before, rtol=1e-6)
    assert fold.details["folded"][0]["new_adds"] == 1


def test_post_layer_norm_with_a_residual_reader_is_reported_and_untouched():
    model = layer_norm(residual=True)
    before = serialized(model)
    fold = FoldNormScalesPass()
    assert not fold(model).modified
    assert serialized(model) == before
    assert fold.details["skipped"] == [
        {"node": "norm", "op": "LayerNormalization", "reason": "Add 'sum_1' reads its output"}
    ]


def test_tied_lm_head_norm_is_skipped_with_the_reason():
    model = tied_head()
    before = serialized(model)
    fold = FoldNormScalesPass()
    assert not fold(model).modified
    assert serialized(model) == before
    (skipped,) = fold.details["skipped"]
    assert skipped["node"] == "norm_gamma" and "tied to the embedding table" in skipped["reason"]


@pytest.mark.parametrize("with_bias", [True, False])
def test_batch_norm_folds_into_the_conv_before_it(with_bias):
    _, model, fold = folded(conv_batch_norm, with_bias=with_bias)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    assert not {"bn_scale", "bn_bias", "bn_mean", "bn_var"} & set(model.graph.initializers)
    assert fold.details["folded"][0]["weights"] == ["conv"]


def test_nothing_to_fold_is_byte_identical_and_folding_twice_changes_nothing():
    plain = factories.mlp()
    before = serialized(plain)
    assert not FoldNormScalesPass()(plain).modified
    assert serialized(plain) == before
    _, model, _ = folded(decomposed_rms_qkv)
    before = serialized(model)
    assert not FoldNormScalesPass()(model).modified
    assert serialized(model) == before


@pytest.mark.slow
def test_exported_qwen2_folds_every_norm_into_its_readers():
    """Torch's export of a random Qwen2 (decomposed RMSNorm, untied LM head, random gammas)."""
    proto = export_tiny_qwen2()
    reference, model = ir.from_proto(proto), ir.from_proto(proto)
    fold = FoldNormScalesPass()
    assert fold(model).modified
    check_valid(model)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int64)}
    assert_lossless(reference, model, feeds)
    assert [n.op_type for n in model.graph] == [n.op_type for n in reference.graph]
    readers = sorted(len(record["weights"]) for record in fold.details["folded"])
    assert readers == [1, 2, 2, 3, 3]  # lm_head; gate/up x 2 layers; q/k/v x 2 layers
    assert fold.details["skipped_norms"] == 0


@pytest.mark.slow
@pytest.mark.model
def test_minilm_post_layer_norms_all_have_residual_readers(minilm_onnx):
    model = ir.load(minilm_onnx)
    fold = FoldNormScalesPass()
    assert not fold(model).modified
    assert fold.details["skipped_norms"] == 13
    assert all(entry["op"] == "LayerNormalization" for entry in fold.details["skipped"])


def test_statistics_collected_before_folding_are_refused():
    """Folding changes what the weight MatMuls read, so H collected on the unfolded graph is wrong for it:
    optimize takes feeds (collected after folding) and refuses ready-made statistics."""
    import lowbit
    from lowbit.runtime.calibration import collect

    model = decomposed_rms_qkv()
    batches = [factories.feeds_for(model, seed=seed) for seed in range(2)]
    recipe = lowbit.Recipe(bits=4, group_size=8, method="gptq", fold_norms=True)
    with pytest.raises(ValueError, match="fold_norms=True changes the activations"):
        lowbit.optimize(decomposed_rms_qkv(), recipe, calibration=collect(decomposed_rms_qkv(), batches))
    folded_result = lowbit.optimize(decomposed_rms_qkv(), recipe, calibration=batches)
    assert [p.name for p in folded_result.report.passes][:3] == [
        "FoldWeightsPass",
        "FoldNormScalesPass",
        "CaptureCalibrationPass",
    ]
