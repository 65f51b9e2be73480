"""Issue 16: fusion does not depend on type information. In a file without value_info the intermediate
activations have no declared type; every quantized weight is fused all the same (a MatMul's operands share
one type, and the weight is float32), the fused ops' outputs get their type and shape, the report lists no
unfused weight, and the fused model computes what the portable QDQ model computes (float32 round-off)."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from tests import factories
from tests.parity import run

RTOL = 1e-5  # as tests/passes/test_fuse_qdq.py: |fused - qdq| <= 1e-5 * max|qdq|


def _chain(length: int, relu: bool, seed: int = 0) -> ir.Model:
    """x[2, 5, 24] -> MatMul(W0) [-> Relu] -> MatMul(W1) ... (``length`` weights, widths not multiples of 8)."""
    rng = np.random.default_rng(seed)
    widths = [24, 40, 36, 20][: length + 1]
    x = factories.graph_input("x", [2, 5, widths[0]])
    value, nodes, weights = x, [], []
    for index in range(length):
        weight = factories.constant(
            f"w{index}", rng.standard_normal((widths[index], widths[index + 1])).astype(np.float32)
        )
        last = index == length - 1
        matmul = factories.node("MatMul", [value, weight], f"fc{index}", output="y" if last else None)
        nodes.append(matmul)
        weights.append(weight)
        value = matmul.outputs[0]
        if relu and not last:
            nodes.append(factories.node("Relu", [value], f"act{index}"))
            value = nodes[-1].outputs[0]
    return factories.model([x], [value], nodes, weights)


MODELS = {
    "chain2": lambda: _chain(2, relu=False),
    "chain3": lambda: _chain(3, relu=False),
    "chain2_relu": lambda: _chain(2, relu=True),
    "chain3_relu": lambda: _chain(3, relu=True),
    "mlp_with_biases": factories.mlp,
}


def _without_value_info(model: ir.Model, folder: pathlib.Path) -> pathlib.Path:
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    path = folder / "model.onnx"
    onnx.save(proto, path)
    return path


def _fuse_report(result: lowbit.OptimizeResult) -> dict:
    return next(record for record in result.report.passes if record.name == "FuseQDQPass").details


def _assert_close(fused: np.ndarray, qdq: np.ndarray) -> None:
    np.testing.assert_allclose(fused, qdq, rtol=0, atol=RTOL * float(np.abs(qdq).max()))


@pytest.mark.parametrize("axis", ["oc", "ic"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_weight_is_fused_without_value_info(ops_library, name, axis, tmp_path):
    path = _without_value_info(MODELS[name](), tmp_path)
    loaded = lowbit.load(path)
    assert any(node.outputs[0].dtype is None for node in loaded.graph)  # the case under test
    weights = sum(node.op_type == "MatMul" for node in loaded.graph)
    # the last MatMul makes the graph output; float16 scales: the portable form computes what the fused one does
    recipe = dict(bits=4, group_size=8, axis=axis, include_lm_head=True, scale_dtype="float16")
    portable = lowbit.optimize(lowbit.load(path), lowbit.Recipe(**recipe))
    fused = lowbit.optimize(loaded, lowbit.Recipe(**recipe, fused=True))

    ops = [node.op_type for node in fused.model.graph]
    assert ops.count("QuantMatMul") == weights, ops
    assert "DequantizeLinear" not in ops and "MatMul" not in ops
    details = _fuse_report(fused)
    assert details["unfused"] == {}
    assert sum(details["fused"].values()) == weights
    for node in fused.model.graph:
        if node.op_type == "QuantMatMul":  # typed always; shaped where its activation's shape is known
            output, activation = node.outputs[0], node.inputs[0]
            assert output.dtype == ir.DataType.FLOAT
            if activation.shape is not None:
                assert list(output.shape) == [*activation.shape[:-1], node.attributes.get_int("N")]
    assert fused.model.graph.node(0).outputs[0].shape is not None  # the first reads the graph input
    feeds = factories.feeds_for(MODELS[name]())
    (want,) = run(portable.model, feeds)
    (got,) = run(fused.model, feeds)
    _assert_close(got, want)


def test_tied_embedding_and_head_are_fused_without_value_info(ops_library, tmp_path):
    """Gather(DequantizeLinear(E)) -> QuantGather (sharing the head's codes) needs no declared Gather output
    type either."""
    path = _without_value_info(factories.tied_lm(), tmp_path)
    recipe = dict(bits=4, group_size=16, include_lm_head=True, include_embeddings=True, scale_dtype="float16")
    portable = lowbit.optimize(lowbit.load(path), lowbit.Recipe(**recipe))
    fused = lowbit.optimize(lowbit.load(path), lowbit.Recipe(**recipe, fused=True))
    assert [node.op_type for node in fused.model.graph] == ["QuantGather", "Relu", "QuantMatMul"]
    assert _fuse_report(fused)["unfused"] == {}
    gathered = fused.model.graph.node(0).outputs[0]
    assert gathered.dtype == ir.DataType.FLOAT and list(gathered.shape) == [1, 7, 36]
    feeds = factories.feeds_for(factories.tied_lm())
    (want,) = run(portable.model, feeds)
    (got,) = run(fused.model, feeds)
    _assert_close(got, want)
