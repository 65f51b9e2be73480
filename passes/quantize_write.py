"""Writing one quantized weight into the graph (QuantizeWeightsPass): its chosen candidate as blocked
DequantizeLinear initializers and nodes, every use rewired to it (a Gemm becomes MatMul [+ Add]), the
float initializer dropped when nothing else reads it, and the ``WeightRecord`` of the report.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from lowbit.ir import analysis, builders
from lowbit.passes import axis_selectors
from lowbit.passes.gemm_to_matmul import replace_gemm
from lowbit.passes.quant.rtn import fit_to_type, relative_error
from lowbit.passes.report import WeightRecord


def write_weight(
    graph: ir.Graph, plan: axis_selectors.WeightPlan, axis: str, names: builders.NameAllocator, method: str
) -> WeightRecord:
    """Replace the weight of ``plan`` by its ``axis`` candidate's QDQ form; the record says what was written
    (``method``: the recipe's; embeddings are RTN unless tied to a calibrated LM head, whose relative output
    error is then the record's)."""
    first = plan.first
    float_dtype = weight_type(first)
    try:
        quantized = fit_to_type(plan.candidates[axis], builders.dequantized_type(float_dtype).numpy())
    except ValueError as error:
        raise ValueError(f"weight {first.weight.name!r} of {first.layer!r}: {error}") from error
    reconstructed = quantized.dequantize()
    # measured before the graph changes: a deferred weight is read from the initializer replaced below
    weight_error = relative_error(plan.weight, reconstructed)
    if plan.choice_errors is not None:  # chosen between other candidates: the written one is measured next
        axis_errors = plan.choice_errors
    else:
        axis_errors = axis_selectors.matrix_errors(plan) if len(plan.candidates) > 1 and plan.calibrated else {}
    if plan.choice_errors is None and axis in axis_errors:  # AdaDim already measured the written candidate
        output_error = axis_errors[axis]
    else:
        output_error = plan.written_output_error(reconstructed)
    qdq = builders.dequantize_linear(names.allocate(first.layer, first.weight.name), quantized, float_dtype)
    for initializer in qdq.initializers:
        graph.register_initializer(initializer)
    graph.insert_before(min((use.node for use in plan.uses), key=_position(graph)), qdq.nodes)
    for use in plan.uses:
        if use.node.op_type == "Gemm":
            replace_gemm(graph, use.node, qdq.output, names)
        else:
            use.node.replace_input_with(use.input_index, qdq.output)
    if first.weight.is_initializer() and not first.weight.uses() and not first.weight.is_graph_output():
        graph.initializers.pop(first.weight.name).const_value = None  # out of the graph: its array may be freed
    return WeightRecord(
        name=first.weight.name or "",
        layer=first.layer,
        kind=first.kind,
        shape=list(plan.shape),
        bits=quantized.bits,
        axis=axis,
        group_size=quantized.block_size,
        symmetric=quantized.symmetric,
        method="rtn" if first.kind == "embedding" and plan.tied_head_hessian is None else method,
        bytes_before=int(math.prod(plan.shape) * float_dtype.itemsize),
        bytes_after=qdq.nbytes,
        relative_error=weight_error,
        output_error=output_error,
        axis_errors=axis_errors,
    )


def weight_type(use: analysis.WeightUse) -> ir.DataType:
    """The weight's float type, also where the file carries no value_info (a tied head's Transpose output)."""
    if use.weight.dtype is not None:
        return use.weight.dtype
    if use.weight.const_value is not None:
        return use.weight.const_value.dtype
    return use.weight.producer().inputs[0].dtype


def _position(graph: ir.Graph):
    order = {id(node): index for index, node in enumerate(graph)}
    return lambda node: order[id(node)]
