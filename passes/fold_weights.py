"""FoldWeightsPass: evaluate constant subgraphs on weights at compile time.

Exporters leave layout and type ops on initializers (``Transpose(W)``, ``Cast(W)``, ``Reshape(W, shape)``,
``Mul(W, c)``). Folding them turns the weight into a plain initializer that the quantizer can see and
removes work from every inference. Lossless: the folded values are computed by ONNX's reference
implementation of the same op.

A node is folded when all its inputs are constants, its output is a float tensor that is not a graph
output, and folding duplicates no large tensor: an input with more than ``SHARED_LIMIT`` elements must
have no other consumer (a tied embedding's ``Transpose`` stays, or the file would carry the table twice).
A MatMul's bias ``Add`` is not folded: its input is an activation, and ONNX Runtime fuses it as it is.
Every ``Constant`` node of the main graph (not a graph output) becomes an initializer first, so that a
weight written as a Constant, or transposed / cast from one, is a weight the quantizer sees. The types
come from the constants and the ops themselves (a Cast's ``to``), not from value_info: a file without
shape information folds the same. A default domain spelled ``"ai.onnx"`` is respelled ``""`` (the
version converter and onnx_ir's unused-opset cleanup know only that spelling).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from lowbit.ir.analysis import DEFAULT_DOMAINS, FLOAT_TYPES, constant_array, default_opset, normalize_default_domain
from lowbit.passes.base import LowbitPass

FOLDABLE_OPS = frozenset(
    {"Transpose", "Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Mul", "Div", "Add", "Sub", "Neg"}
)
SHARED_LIMIT = 1024


def _evaluate(node: ir.Node, opset: int) -> list:
    proto = ir.serde.serialize_node(node)
    feeds = {value.name: constant_array(value) for value in node.inputs if value is not None}
    return ReferenceEvaluator(proto, opsets={"": opset, "ai.onnx": opset}).run(None, feeds)


def _constant_tensor(node: ir.Node):
    """A Constant node's tensor as it is stored (``value``), else its value evaluated (``value_float`` ...)."""
    value = node.attributes.get("value")
    if value is not None and value.type == ir.AttributeType.TENSOR:
        return value.as_tensor()
    return None


class FoldWeightsPass(LowbitPass):
    """Replace constant float subgraphs (layout, cast, scalar arithmetic on initializers) by initializers."""

    @staticmethod
    def _output_type(node: ir.Node) -> ir.DataType | None:
        """The type a foldable node writes, from its inputs and attributes (value_info may be missing)."""
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            return None if to is None else ir.DataType(to.as_int())
        first = node.inputs[0] if node.inputs else None
        return None if first is None else first.dtype

    def _foldable(self, node: ir.Node) -> bool:
        if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1:
            return False
        if node.op_type == "Constant":
            return not node.outputs[0].is_graph_output()
        if node.op_type not in FOLDABLE_OPS:
            return False
        output = node.outputs[0]
        if output.is_graph_output() or self._output_type(node) not in FLOAT_TYPES:
            return False
        inputs = [value for value in node.inputs if value is not None]
        if not inputs or any(value.const_value is None or value.is_graph_input() for value in inputs):
            return False
        # Folding a node whose large input has other consumers would keep both copies.
        return all(value.const_value.size <= SHARED_LIMIT or len(value.uses()) == 1 for value in inputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = default_opset(model, 1)
        folded: list[str] = []
        for node in list(graph):
            if not self._foldable(node):
                continue
            tensor = _constant_tensor(node) if node.op_type == "Constant" else None
            if tensor is None:
                (array,) = _evaluate(node, opset)
                array = np.ascontiguousarray(array)  # Transpose returns a view; byte-hashing passes need C order
                tensor = ir.tensor(array)
            output = node.outputs[0]
            sources = [value for value in node.inputs if value is not None]
            folded_value = ir.Value(shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            ir.convenience.replace_all_uses_with(output, folded_value)
            graph.remove(node, safe=True)
            folded_value.name = folded_value.const_value.name = output.name
            output.name = None
            graph.register_initializer(folded_value)
            for source in sources:
                if source.is_initializer() and not source.uses() and not source.is_graph_output():
                    graph.initializers.pop(source.name)
            folded.append(f"{node.op_type} {node.name}")
        respelled = normalize_default_domain(model)
        self.details = {"folded_nodes": len(folded), "folded": folded, "respelled_default_domain": respelled}
        return ir.passes.PassResult(model, modified=bool(folded) or respelled)
