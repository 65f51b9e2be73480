"""Issue 16: odd but plausible inputs a user met. Weights of every float type, behind Constant /
Transpose nodes, in files without value_info (quantized, or reported as left in float with why); float16
weights whose grid overflows float16; norm folding without shape information; the default domain spelled
"ai.onnx" and opsets whose ops the storage opset lacks; subgraph names that collide with the ones the
quantizer makes. Each outcome is checked against an independent expectation: NumPy's RTN of the
float32-cast weight, ONNX Runtime's run of the float model, onnx.checker."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.ir import builders
from lowbit.passes.fold_norm_scales import FoldNormScalesPass
from lowbit.passes.quant.rtn import expand_groups, fit_to_type, quantize_rtn
from lowbit.passes.quant.scheme import SUPPORTED_BITS, QuantScheme
from lowbit.runtime.session import session_options

RNG_SEED = 0
K, N = 16, 8


def _model(nodes, inputs, outputs, initializers, opset=20, domain="", ir_version=10, value_info=True) -> ir.Model:
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid(domain, opset)],
        ir_version=ir_version,
    )
    if value_info:
        proto = onnx.shape_inference.infer_shapes(proto)
    else:
        del proto.graph.value_info[:]
    return ir.serde.deserialize_model(proto)


def _weight(dtype=np.float32, seed=RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((K, N)).astype(dtype)


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    if array.dtype == ml_dtypes.bfloat16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(array, name)


def _mlp(weight: np.ndarray, *, via: str = "initializer", elem=TensorProto.FLOAT, **kwargs) -> ir.Model:
    """x[2, K] @ W -> Relu -> y; W an initializer, a Constant node's output, or Transpose(W^T)."""
    x = helper.make_tensor_value_info("x", elem, [2, K])
    y = helper.make_tensor_value_info("y", elem, [2, N])
    nodes, initializers = [], []
    if via == "constant":
        nodes.append(helper.make_node("Constant", [], ["w"], name="w_const", value=_tensor("w", weight)))
    elif via == "transpose":
        initializers.append(_tensor("w_t", np.ascontiguousarray(weight.T)))
        nodes.append(helper.make_node("Transpose", ["w_t"], ["w"], name="w_transpose", perm=[1, 0]))
    else:
        initializers.append(_tensor("w", weight))
    nodes += [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
    ]
    return _model(nodes, [x], [y], initializers, **kwargs)


def _run(model: ir.Model, feeds) -> list[np.ndarray]:
    """ONNX Runtime with float activations (MatMulNBits accuracy level 0)."""
    options = session_options(matmulnbits_accuracy_level=0)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options).run(None, feeds)


def _dequantized(model: ir.Model) -> tuple[np.ndarray, ir.Node]:
    """W_hat from the one DequantizeLinear's initializers (NumPy, float32), and the node."""
    (node,) = [node for node in model.graph if node.op_type == "DequantizeLinear"]
    codes = node.inputs[0].const_value.numpy().astype(np.int64)
    scales = node.inputs[1].const_value.numpy().astype(np.float32)
    axis, block = node.attributes.get_int("axis", 1), node.attributes.get_int("block_size", 0)
    zero = (
        np.zeros_like(scales, dtype=np.int64)
        if len(node.inputs) < 3
        else node.inputs[2].const_value.numpy().astype(np.int64)
    )
    centered = codes - expand_groups(zero, block, axis, codes.shape)
    return centered.astype(np.float32) * expand_groups(scales, block, axis, codes.shape), node


def _reference(weight: np.ndarray, **recipe) -> np.ndarray:
    """NumPy RTN of the float32-cast weight, as the recipe asks."""
    recipe = {"bits": 4, "group_size": 128, "axis": "oc", "symmetric": False, **recipe}
    scheme = QuantScheme(recipe["bits"], recipe["group_size"], recipe["axis"], recipe["symmetric"])
    return quantize_rtn(weight.astype(np.float32), scheme).dequantize()


def _optimize(model: ir.Model, **recipe) -> lowbit.OptimizeResult:
    return lowbit.optimize(model, lowbit.Recipe(**recipe))


# --- class 4: weights of every float type and form are quantized or reported -----------------------


@pytest.mark.parametrize(
    "dtype, elem, target",
    [
        (np.float64, TensorProto.DOUBLE, ir.DataType.DOUBLE),
        (ml_dtypes.bfloat16, TensorProto.BFLOAT16, ir.DataType.BFLOAT16),
    ],
)
def test_bfloat16_and_double_weights_are_quantized_in_float32_and_cast_back(dtype, elem, target):
    weight = _weight(np.float32).astype(dtype)
    model = _mlp(weight, elem=elem)
    result = _optimize(model)
    assert [record.name for record in result.report.weights] == ["w"] and not result.report.skipped
    w_hat, dequantize = _dequantized(model)
    np.testing.assert_array_equal(w_hat, _reference(weight))
    (cast,) = [use.node for use in dequantize.outputs[0].uses()]
    assert cast.op_type == "Cast" and cast.outputs[0].dtype == target
    assert next(node for node in model.graph if node.op_type == "MatMul").inputs[1] is cast.outputs[0]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_double_model_runs_in_onnx_runtime_close_to_the_float_model():
    weight = _weight(np.float64)
    float_model = _mlp(weight, elem=TensorProto.DOUBLE)
    x = np.random.default_rng(1).standard_normal((2, K))
    (expected,) = _run(float_model, {"x": x})
    model = _mlp(weight, elem=TensorProto.DOUBLE)
    _optimize(model)
    (actual,) = _run(model, {"x": x})
    assert actual.dtype == np.float64
    np.testing.assert_allclose(actual, np.maximum(x @ _reference(weight).astype(np.float64), 0), rtol=1e-5, atol=1e-5)
    assert np.abs(actual - expected).max() < 0.5 * np.abs(expected).max()


def test_double_weight_beyond_the_float32_range_is_refused_by_name():
    weight = _weight(np.float64)
    weight[0, 0] = 1e300
    with pytest.raises(ValueError, match="'w'.*float32 range"):
        _optimize(_mlp(weight, elem=TensorProto.DOUBLE))


@pytest.mark.parametrize(
    "via, value_info", [("constant", True), ("constant", False), ("transpose", False), ("transpose", True)]
)
def test_weights_behind_constant_and_transpose_nodes_are_quantized_without_value_info(via, value_info):
    weight = _weight()
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    (expected,) = _run(_mlp(weight), {"x": x})
    model = _mlp(weight, via=via, value_info=value_info)
    result = _optimize(model)
    assert [record.layer for record in result.report.weights] == ["fc"] and not result.report.skipped
    w_hat, _ = _dequantized(model)
    np.testing.assert_array_equal(w_hat, _reference(weight))
    (actual,) = _run(model, {"x": x})
    np.testing.assert_allclose(actual, np.maximum(x @ w_hat, 0), rtol=1e-5, atol=1e-5)
    assert np.abs(actual - expected).max() < 0.5 * np.abs(expected).max()


def test_every_constant_matmul_weight_is_quantized_or_reported_with_a_reason():
    """A weight in an If branch, a 3-D weight, a weight computed by a node that does not fold, an int
    weight: each is in the report's list of weights left in float, and the plain one is quantized."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "y_if", "y3", "y_sin")]
    branch_weight = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w_branch")
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_branch"], ["then_out"], name="branch_fc")],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
        [branch_weight],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["else_out"], name="else_id")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
        helper.make_node("If", ["cond"], ["y_if"], name="branch", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("MatMul", ["x", "w3"], ["y3"], name="batched"),
        helper.make_node("Sin", ["w_raw"], ["w_sin"], name="sin"),
        helper.make_node("MatMul", ["x", "w_sin"], ["y_sin"], name="sin_fc"),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(rng.standard_normal((3, K, N)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w_raw"),
    ]
    model = _model(nodes, [x], outputs, initializers)
    result = _optimize(model)
    assert [record.name for record in result.report.weights] == ["w"]
    reasons = {skipped.layer: skipped.reason for skipped in result.report.skipped}
    assert set(reasons) == {"branch_fc", "batched", "sin_fc"}
    assert "subgraph" in reasons["branch_fc"] and "'branch'" in reasons["branch_fc"]
    assert "2-D" in reasons["batched"]
    assert "Sin" in reasons["sin_fc"] and "run time" in reasons["sin_fc"]
    summary = result.report.summary()
    assert all(f"left in float: {layer}" in summary for layer in reasons)


# --- class 5: reconstructed weights stay in the model's float range ------------------------------


def _fp16_weight_near_the_limit() -> np.ndarray:
    weight = _weight(np.float16)
    weight[:, 0] = 65504
    weight[::2, 1] = -65504
    weight[1::2, 2] = -65504
    weight[:, 3] = np.float16(65504) * np.linspace(-1, 1, K).astype(np.float16)
    return weight


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_float16_weights_near_65504_dequantize_to_finite_values_close_to_the_float_model(bits, symmetric, axis):
    weight = _fp16_weight_near_the_limit()
    x = (np.random.default_rng(1).standard_normal((2, K)) * 1e-3).astype(np.float16)
    (expected,) = _run(_mlp(weight, elem=TensorProto.FLOAT16), {"x": x})
    assert np.isfinite(expected).all()
    model = _mlp(weight, elem=TensorProto.FLOAT16)
    _optimize(model, bits=bits, symmetric=symmetric, axis=axis, group_size=4)
    w_hat, dequantize = _dequantized(model)
    assert np.isfinite(w_hat.astype(np.float16)).all()
    step = np.abs(np.diff(np.unique(w_hat), prepend=0)).max()
    assert np.abs(w_hat - weight.astype(np.float32)).max() <= 131008 / ((1 << bits) - 1) + 1e-3 * step
    (actual,) = _run(model, {"x": x})
    assert np.isfinite(actual).all()
    reference = np.maximum(x.astype(np.float32) @ w_hat, 0)
    np.testing.assert_allclose(actual.astype(np.float32), reference, rtol=2e-2, atol=2e-2 * np.abs(reference).max())


def test_fit_to_type_keeps_float16_reconstructions_finite_and_within_one_step():
    rng = np.random.default_rng(3)
    weight = rng.uniform(-65504, 65504, (64, 32)).astype(np.float16).astype(np.float32)
    weight[0] = -65504
    for bits in SUPPORTED_BITS:
        for symmetric in (False, True):
            quantized = quantize_rtn(weight, QuantScheme(bits, 8, "ic", symmetric))
            assert not np.isfinite(quantized.dequantize().astype(np.float16)).all() or bits == 8
            fitted = fit_to_type(quantized, np.float16)
            w_hat = fitted.dequantize()
            assert np.isfinite(w_hat.astype(np.float16)).all()
            assert np.array_equal(fitted.scales, fitted.scales.astype(np.float16).astype(np.float32))
            assert (np.abs(w_hat - weight) <= fitted.expand(fitted.scales) * 1.001).all()


def test_float16_scales_below_the_smallest_subnormal_do_not_become_zero():
    weight = np.full((4, 4), 1e-7, np.float32)
    weight[0, 0] = 0
    fitted = fit_to_type(quantize_rtn(weight, QuantScheme(4, -1, "oc", False)), np.float16)
    assert (fitted.scales > 0).all() and np.array_equal(
        fitted.scales, fitted.scales.astype(np.float16).astype(np.float32)
    )


# --- class 6: passes that need shapes the file does not carry ------------------------------------


def _layer_norm_mlp(value_info: bool) -> ir.Model:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])
    initializers = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, K).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normed"], name="ln", axis=-1),
        helper.make_node("MatMul", ["normed", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
    ]
    return _model(nodes, [x], [y], initializers, value_info=value_info)


@pytest.mark.parametrize("value_info", [False, True])
def test_layer_norm_with_bias_folds_without_value_info(value_info):
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    (expected,) = _run(_layer_norm_mlp(True), {"x": x})
    model = _layer_norm_mlp(value_info)
    fold = FoldNormScalesPass()
    assert fold(model).modified and fold.details["bias_adds"] == 1
    (actual,) = _run(model, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    model = _layer_norm_mlp(value_info)
    result = _optimize(model, fold_norms=True)
    assert len(result.report.weights) == 1
    assert np.isfinite(_run(model, {"x": x})[0]).all()


# --- class 7: opsets ----------------------------------------------------------------------------------


def test_default_domain_spelled_ai_onnx_converts_and_runs():
    weight = _weight()
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    model = _mlp(weight, domain="ai.onnx", opset=17)
    result = _optimize(model)
    assert len(result.report.weights) == 1
    assert model.opset_imports.get("") >= 21 and "ai.onnx" not in model.opset_imports
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    w_hat, _ = _dequantized(model)
    np.testing.assert_array_equal(w_hat, _reference(weight))
    np.testing.assert_allclose(_run(model, {"x": x})[0], np.maximum(x @ w_hat, 0), rtol=1e-5, atol=1e-5)


def _deprecated_op_model(op: str) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, K])
    initializers = [numpy_helper.from_array(_weight(), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc")]
    if op == "Upsample":
        initializers.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        nodes.append(helper.make_node("Upsample", ["h", "scales"], ["y"], name="up", mode="nearest"))
        y, opset = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 2 * N]), 9
    else:
        initializers += [
            numpy_helper.from_array(np.zeros((1, 1, 1, N), np.int64), "indices"),
            numpy_helper.from_array(np.ones((1, 1, 1, N), np.float32), "updates"),
        ]
        nodes.append(helper.make_node("Scatter", ["h", "indices", "updates"], ["y"], name="scatter", axis=2))
        y, opset = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, N]), 10
    return _model(nodes, [x], [y], initializers, opset=opset, ir_version=7)


@pytest.mark.parametrize("op, node", [("Upsample", "up"), ("Scatter", "scatter")])
def test_ops_missing_from_the_storage_opset_are_refused_before_anything_changes(op, node):
    model = _deprecated_op_model(op)
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(ValueError, match=rf"{op} node '{node}'"):
        _optimize(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_onnx_runtime_ops_of_the_default_domain_survive_the_storage_opset():
    """onnxruntime-genai's builder writes SimplifiedLayerNormalization in the default domain: ONNX has no such
    op, ONNX Runtime runs it at every opset, so 2-bit storage (opset 25) must neither refuse nor break it."""
    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])
    gamma = np.linspace(0.5, 1.5, K, dtype=np.float32)
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["h"], name="norm", axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["h", "w"], ["z"], name="fc"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    weight = _weight()
    initializers = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(weight, "w")]
    model = _model(nodes, [x], [y], initializers, opset=21, value_info=False)
    _optimize(model, bits=2)
    assert model.opset_imports[""] == 25
    feeds = {"x": rng.standard_normal((2, K)).astype(np.float32)}
    normed = feeds["x"] / np.sqrt(np.mean(np.square(feeds["x"]), axis=-1, keepdims=True) + 1e-6) * gamma
    w_hat, _ = _dequantized(model)
    np.testing.assert_array_equal(w_hat, _reference(weight, bits=2))
    np.testing.assert_allclose(_run(model, feeds)[0], np.maximum(normed @ w_hat, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [13, 15, 17])
def test_older_opsets_convert_to_a_model_onnx_runtime_runs(opset):
    """ReduceMean's axes moved from attribute to input at 18: the converter must rewrite it."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("ReduceMean", ["h"], ["y"], name="mean", axes=[-1]),
    ]
    model = _model(
        nodes, [x], [y], [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")], opset=opset
    )
    _optimize(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feeds = {"x": rng.standard_normal((2, K)).astype(np.float32)}
    w_hat, _ = _dequantized(model)
    np.testing.assert_allclose(
        _run(model, feeds)[0], (feeds["x"] @ w_hat).mean(-1, keepdims=True), rtol=1e-5, atol=1e-5
    )


# --- class 8: names unique across subgraphs --------------------------------------------------------


def _colliding_subgraph_model() -> ir.Model:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])
    taken = ["fc.dequantized", "fc.scales", "fc.qweight", "fc.zero_points", "fc.DequantizeLinear"]
    then_nodes = [helper.make_node("Relu", ["h"], [taken[0]], name="then_relu")]
    then_nodes += [
        helper.make_node("Neg", [a], [b], name=f"then_{i}") for i, (a, b) in enumerate(zip(taken, taken[1:]))
    ]
    then_graph = helper.make_graph(
        then_nodes, "then", [], [helper.make_tensor_value_info(taken[-1], TensorProto.FLOAT, [2, N])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["fc.scales"], name="fc.DequantizeLinear")],
        "else",
        [],
        [helper.make_tensor_value_info("fc.scales", TensorProto.FLOAT, [2, N])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    return _model(nodes, [x], [y], initializers)


def test_new_names_are_unique_across_subgraphs():
    model = _colliding_subgraph_model()
    subgraph_names = set()
    for graph in model.graphs():
        if graph is not model.graph:
            subgraph_names |= {output.name for node in graph for output in node.outputs}
    result = _optimize(model)
    assert len(result.report.weights) == 1
    main_names = {output.name for node in model.graph for output in node.outputs} | set(model.graph.initializers)
    assert not (main_names - {"h", "y"}) & subgraph_names
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    w_hat, _ = _dequantized(model)
    (actual,) = _run(model, {"x": x})
    h = x @ w_hat
    np.testing.assert_allclose(
        actual, np.negative(np.negative(np.negative(np.negative(np.maximum(h, 0))))), rtol=1e-5, atol=1e-5
    )


def test_name_allocator_sees_subgraph_names():
    model = _colliding_subgraph_model()
    names = builders.NameAllocator(model.graph)
    base = names.allocate("fc", "w")
    assert base != "fc" and not any(
        f"{base}{tail}" in builders.graph_names(model.graph) for tail in (".scales", ".dequantized")
    )
    assert names.fresh("fc.scales") == "fc.scales_2"


def test_a_conversion_that_leaves_invalid_nodes_is_refused_naming_the_node(monkeypatch):
    """The guard after conversion: without the axes adapter, ReduceMean keeps an attribute opset 21 lacks."""
    from lowbit.passes import storage_opset

    monkeypatch.setattr(storage_opset, "adapt_signatures", lambda model, current, target: None)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("ReduceMean", ["h"], ["y"], name="mean", axes=[-1]),
    ]
    model = _model(nodes, [x], [y], [numpy_helper.from_array(_weight(), "w")], opset=17)
    with pytest.raises(ValueError, match="ReduceMean node 'mean'"):
        _optimize(model)
