"""Seeded model factories built with onnx_ir: small, fast, no binary fixtures."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

FLOAT = ir.DataType.FLOAT


def constant(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.tensor(array).dtype),
        const_value=ir.tensor(array, name=name),
    )


def graph_input(name: str, shape: list, dtype: ir.DataType = FLOAT) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))


def model(inputs, outputs, nodes, initializers, opset: int = 20) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": opset}, name="test")
    result = ir.Model(graph, ir_version=10)
    ShapeInferencePass()(result)  # typed, shaped intermediates, as an exporter writes them
    return result


def node(op: str, inputs, name: str, output: str | None = None, **attributes) -> ir.Node:
    result = ir.node(op, inputs, attributes=attributes, name=name)
    result.outputs[0].name = output or f"{name}_out"
    return result


def mlp(seed: int = 0, k: int = 40, hidden: int = 72, n: int = 24, batch: list | None = None) -> ir.Model:
    """x[..., K] -> MatMul(W1) + b1 -> Relu -> MatMul(W2) + b2 -> y[..., N]; dims not multiples of 8."""
    rng = np.random.default_rng(seed)
    batch = batch if batch is not None else [3, 5]
    x = graph_input("x", [*batch, k])
    w1 = constant("w1", rng.standard_normal((k, hidden)).astype(np.float32))
    b1 = constant("b1", rng.standard_normal(hidden).astype(np.float32))
    w2 = constant("w2", rng.standard_normal((hidden, n)).astype(np.float32))
    b2 = constant("b2", rng.standard_normal(n).astype(np.float32))
    mm1 = node("MatMul", [x, w1], "fc1")
    add1 = node("Add", [mm1.outputs[0], b1], "fc1_bias")
    relu = node("Relu", [add1.outputs[0]], "act")
    mm2 = node("MatMul", [relu.outputs[0], w2], "fc2")
    add2 = node("Add", [mm2.outputs[0], b2], "fc2_bias", output="y")
    return model([x], [add2.outputs[0]], [mm1, add1, relu, mm2, add2], [w1, b1, w2, b2])


def transposed_weight(seed: int = 0, k: int = 33, n: int = 20) -> ir.Model:
    """x @ Cast(Transpose(W[N, K])): the layout/type ops an exporter may leave on a weight."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [2, k])
    w = constant("w_nk", rng.standard_normal((n, k)).astype(np.float16))
    transpose = node("Transpose", [w], "w_t", perm=[1, 0])
    cast = node("Cast", [transpose.outputs[0]], "w_cast", to=FLOAT)
    matmul = node("MatMul", [x, cast.outputs[0]], "proj", output="y")
    return model([x], [matmul.outputs[0]], [transpose, cast, matmul], [w])


def gemm(seed: int = 0, k: int = 30, n: int = 17, trans_b: int = 1, alpha: float = 0.5, beta: float = 2.0) -> ir.Model:
    rng = np.random.default_rng(seed)
    x = graph_input("x", [4, k])
    b_shape = (n, k) if trans_b else (k, n)
    w = constant("w", rng.standard_normal(b_shape).astype(np.float32))
    c = constant("c", rng.standard_normal(n).astype(np.float32))
    g = node("Gemm", [x, w, c], "gemm", output="y", transB=trans_b, alpha=alpha, beta=beta)
    return model([x], [g.outputs[0]], [g], [w, c])


def tied_lm(seed: int = 0, vocab: int = 50, dim: int = 36) -> ir.Model:
    """ids -> Gather(E) -> Relu -> MatMul(Transpose(E)) -> logits: a tied embedding / LM head."""
    rng = np.random.default_rng(seed)
    ids = graph_input("ids", [1, 7], ir.DataType.INT64)
    table = constant("embed", rng.standard_normal((vocab, dim)).astype(np.float32))
    gather = node("Gather", [table, ids], "embed_tokens")
    relu = node("Relu", [gather.outputs[0]], "act")
    transpose = node("Transpose", [table], "tie", perm=[1, 0])
    head = node("MatMul", [relu.outputs[0], transpose.outputs[0]], "lm_head", output="logits")
    return model([ids], [head.outputs[0]], [gather, relu, transpose, head], [table])


def shared_weight(seed: int = 0, k: int = 16) -> ir.Model:
    """Two MatMuls read the same [K, K] weight."""
    rng = np.random.default_rng(seed)
    x = graph_input("x", [2, k])
    w = constant("w", rng.standard_normal((k, k)).astype(np.float32))
    first = node("MatMul", [x, w], "first")
    second = node("MatMul", [first.outputs[0], w], "second", output="y")
    return model([x], [second.outputs[0]], [first, second], [w])


def with_export_metadata(model, name_length: int = 40):
    """``model`` with long node names and per-node metadata, as torch.onnx writes them (graph bytes that a
    megabyte budget must count)."""
    for node in model.graph:
        node.name = f"{node.name}.{'m' * name_length}"
        node.metadata_props["pkg.torch.onnx.stack_trace"] = "File model.py, line 1, in forward\n" * 8
        node.metadata_props["pkg.torch.onnx.name_scopes"] = str(["", "model", node.name])
    return model


def feeds_for(m: ir.Model, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (token ids below 50 for int64 inputs)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in m.graph.inputs:
        shape = [int(d) for d in value.shape]
        if value.dtype == ir.DataType.INT64:
            feeds[value.name] = rng.integers(0, 50, shape).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def calibrated_mlp_files(folder, recipe):
    """``mlp.onnx``, its optimized form under ``recipe`` (4 calibration batches) and the report, written to
    ``folder``: ``(original, optimized, report path, OptimizeResult)``, for the viewer's tests."""
    import lowbit

    original, optimized, report = folder / "mlp.onnx", folder / "mlp.optimized.onnx", folder / "report.json"
    lowbit.save(mlp(), original)
    calibration = [feeds_for(mlp(), seed) for seed in range(4)]
    result = lowbit.optimize(lowbit.load(original), recipe, calibration=calibration)
    lowbit.save(result.model, optimized)
    report.write_text(result.report.to_json())
    return original, optimized, report, result
