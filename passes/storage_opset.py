"""The storage opset: what QuantizeWeightsPass checks and changes so that ONNX Runtime accepts the file.

The blocked DequantizeLinear of the quantized weights needs opset 21 (25 for 2-bit) and IR version 10
(11). ``check_convertible`` refuses, before any weight is written, a model with an op that does not exist
(or is deprecated) in that opset; ``require_storage_support`` raises the opset with onnxscript's version
converter once the weights are written, after rewriting the signatures the converter leaves as they are
(``adapt_signatures``: ``axes`` and ``split`` attributes that became inputs), and refuses a result that
onnx.checker would not accept (``invalid_nodes``), naming the nodes.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime.capi.onnxruntime_pybind11_state as ort_state

from lowbit.ir import analysis, builders


def unsupported_ops(model: ir.Model, opset: int) -> list[str]:
    """'<op> node <name>' for every default-domain node (subgraphs included) whose op does not exist in
    ``opset`` or is deprecated there (Upsample past 9, Scatter past 10): ONNX Runtime refuses those."""
    found = []
    for graph in model.graphs():
        for node in graph:
            if node.domain not in analysis.DEFAULT_DOMAINS:
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                if not _runtime_kernel(node.op_type, opset):
                    found.append(f"{node.op_type} node {node.name!r} (no such op in opset {opset})")
                continue
            if schema.deprecated:
                found.append(f"{node.op_type} node {node.name!r} (deprecated since opset {schema.since_version})")
    return found


@functools.cache
def _runtime_default_domain_kernels() -> dict[str, list[tuple[int, int]]]:
    """Op name -> opset ranges of ONNX Runtime's CPU kernels registered in the default domain."""
    kernels: dict[str, list[tuple[int, int]]] = {}
    for kernel in ort_state.get_all_opkernel_def():
        if kernel.domain == "" and kernel.provider == "CPUExecutionProvider":
            kernels.setdefault(kernel.op_name, []).append(tuple(kernel.version_range))
    return kernels


def runtime_only_op(op_type: str, opset: int) -> bool:
    """An op that ONNX does not define but ONNX Runtime runs in the default domain at ``opset`` (its contrib
    ops registered there, e.g. ``SimplifiedLayerNormalization``, which onnxruntime-genai's builder writes)."""
    try:
        onnx.defs.get_schema(op_type, opset, "")
        return False
    except onnx.defs.SchemaError:
        return _runtime_kernel(op_type, opset)


def _runtime_kernel(op_type: str, opset: int) -> bool:
    """Whether ONNX Runtime's CPU provider has a default-domain kernel for ``op_type`` at ``opset``."""
    return any(low <= opset <= high for low, high in _runtime_default_domain_kernels().get(op_type, ()))


def check_convertible(model: ir.Model, target: int) -> None:
    """Refuse a model whose ops do not exist in the storage opset ``target`` (when it must be raised to it)."""
    current = analysis.default_opset(model)
    if current is not None and current >= target:
        return
    unsupported = unsupported_ops(model, target)
    if unsupported:
        raise ValueError(
            f"the quantized weights need opset {target} (the model has {current}), and these ops do not exist there "
            f"(ONNX Runtime would refuse the file): {'; '.join(unsupported[:5])}; replace them (e.g. Upsample by Resize, "
            "Scatter by ScatterElements) before quantizing"
        )


#: Ops whose ``axes`` attribute became an input, and the opset where it did (onnxscript's version
#: converter only raises the opset number of these; ONNX Runtime then refuses the attribute).
_AXES_TO_INPUT = {
    **dict.fromkeys(
        (
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        ),
        18,
    ),
    "ReduceSum": 13,
    "Squeeze": 13,
    "Unsqueeze": 13,
}


def adapt_signatures(model: ir.Model, current: int, target: int) -> None:
    """Rewrite the nodes whose signature changed between ``current`` and ``target`` and that onnxscript's
    converter leaves as they are: ``axes`` attributes that became inputs, Split's ``split`` attribute
    (an input from 13) and its ``num_outputs`` (required without ``split`` from 18)."""
    names = builders.NameAllocator(model.graph)
    for graph in model.graphs():
        for node in list(graph):
            if node.domain != "":
                continue
            if node.op_type in _AXES_TO_INPUT and current < _AXES_TO_INPUT[node.op_type] <= target:
                attribute_to_input(graph, node, "axes", 1, names)
            elif node.op_type == "Split":
                if current < 13 <= target:
                    attribute_to_input(graph, node, "split", 1, names)
                split_given = len(node.inputs) > 1 and node.inputs[1] is not None
                if current < 18 <= target and not split_given and "num_outputs" not in node.attributes:
                    node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))


def attribute_to_input(
    graph: ir.Graph, node: ir.Node, attribute: str, index: int, names: builders.NameAllocator
) -> None:
    """Move an int-list attribute of ``node`` to input ``index`` (a Constant node before it)."""
    value = node.attributes.pop(attribute, None)
    if value is None:
        return
    constant = ir.node(
        "Constant",
        [],
        attributes={"value": ir.tensor(np.asarray(value.as_ints(), dtype=np.int64))},
        name=names.fresh_node(f"{node.name or node.op_type}.{attribute}"),
    )
    constant.outputs[0].name = names.fresh(f"{node.name or node.op_type}.{attribute}")
    graph.insert_before(node, constant)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, constant.outputs[0])


def invalid_nodes(model: ir.Model, opset: int) -> list[str]:
    """'<op> node <name>: <complaint>' of the default-domain nodes onnx.checker refuses at ``opset``."""
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version or onnx.IR_VERSION
    context.opset_imports = {"": opset}
    found = []
    for graph in model.graphs():
        for node in graph:
            if node.domain != "" or analysis.subgraphs(node):  # a subgraph's own nodes are visited as well
                continue
            if runtime_only_op(node.op_type, opset):  # onnx.checker knows no schema for it; ORT runs it
                continue
            try:
                onnx.checker.check_node(ir.serde.serialize_node(node), context)
            except onnx.checker.ValidationError as error:
                found.append(f"{node.op_type} node {node.name!r}: {str(error).strip().splitlines()[0]}")
    return found


def require_storage_support(model: ir.Model, bits: int) -> None:
    """Raise the default-domain opset and IR version to what the quantized storage types need, and check
    that every node's op exists in that opset."""
    target = builders.required_opset(bits)
    analysis.normalize_default_domain(model)
    current = model.opset_imports.get("", None)
    if current is None or current < target:
        import onnxscript.version_converter  # here: its memory is not held while the weights are quantized

        try:
            if current is not None:
                adapt_signatures(model, current, target)
            onnxscript.version_converter.convert_version(model, target)
        except Exception as error:  # the converter raises many types; name the cause
            raise ValueError(f"could not convert the model from opset {current} to {target}: {error}") from error
        model.opset_imports[""] = max(model.opset_imports.get("", target), target)
        invalid = unsupported_ops(model, model.opset_imports[""]) or invalid_nodes(model, model.opset_imports[""])
        if invalid:
            raise ValueError(
                f"converting the model from opset {current} to {target} left nodes that opset does not accept "
                f"(ONNX Runtime would refuse the file): {'; '.join(invalid[:5])}"
            )
    model.ir_version = max(model.ir_version or 0, builders.required_ir_version(bits))
