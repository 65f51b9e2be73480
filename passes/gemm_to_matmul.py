"""Gemm -> MatMul [+ Add]: how QuantizeWeightsPass rewrites a Gemm whose weight it quantized.

The quantized weight is already ``alpha * B`` in the ``[K, N]`` layout of a MatMul (transB and alpha are
folded into it before quantization: ``analysis.gemm_weight_kn``), so the Gemm becomes
``MatMul(A, DQ(B'))``, plus ``Add(beta * C)`` when it has a bias (beta folded into a new constant).

Not onnxscript's rewriter rule (``onnxscript.rewriter.rules.common.gemm_to_matmul_add_rule``): that rule
matches only ``Reshape -> Gemm(alpha=1, beta=1) -> Reshape`` and keeps B as it is, while every Gemm here
has its own transB, alpha and beta, already applied to the weight being written
(tests/passes/test_gemm_to_matmul.py shows the rule leaves such Gemms alone).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.ir import builders


def replace_gemm(graph: ir.Graph, gemm: ir.Node, weight: ir.Value, names: builders.NameAllocator) -> None:
    """Gemm(A, B, C) -> MatMul(A, ``weight``) [+ Add(beta * C)], keeping the output's name; ``weight`` is
    the Gemm's ``alpha * op(B)`` as ``[K, N]``."""
    activation = gemm.inputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    matmul = ir.node("MatMul", [activation, weight], name=names.fresh_node(f"{gemm.name}.MatMul"))
    new_nodes = [matmul]
    result = matmul.outputs[0]
    if bias is not None:
        beta = gemm.attributes.get_float("beta", 1.0)
        if beta != 1.0:
            scaled = ir.tensor(bias.const_value.numpy() * np.asarray(beta, dtype=bias.dtype.numpy()))
            name = names.fresh(f"{gemm.name}.bias")  # the Gemm's own bias may already carry that name
            bias = ir.Value(name=name, shape=bias.shape, type=bias.type, const_value=scaled)
            graph.register_initializer(bias)
        matmul.outputs[0].name = names.fresh(f"{gemm.name}.MatMul_out")
        add = ir.node("Add", [result, bias], name=names.fresh_node(f"{gemm.name}.Add"))
        new_nodes.append(add)
        result = add.outputs[0]
    old_output = gemm.outputs[0]
    result.type, result.shape = old_output.type, old_output.shape
    graph.insert_before(gemm, new_nodes)
    ir.convenience.replace_all_uses_with(old_output, result, replace_graph_outputs=True)
    output_name = old_output.name
    graph.remove(gemm, safe=True)
    result.name = output_name
