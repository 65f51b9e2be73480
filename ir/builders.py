"""Build the portable (stock ONNX) form of one quantized weight: initializers for codes, scales and zero
points, and a blocked ``DequantizeLinear`` that reconstructs the float weight.

Storage types: asymmetric codes are unsigned with a zero point of the same type; symmetric codes are
signed with no zero point. 3-bit codes have no ONNX type and are stored in (U)INT4: correct, 4-bit size
(so are 2-bit per-OC codes where N is not a multiple of 4: see ``storage_bits``).
INT4/UINT4/INT8/UINT8 need opset 21 and IR version 10; INT2/UINT2 need opset 25 and IR version 11.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from lowbit.ir import analysis
from lowbit.passes.quant.rtn import QuantizedWeight

_UNSIGNED = {2: ir.DataType.UINT2, 4: ir.DataType.UINT4, 8: ir.DataType.UINT8}
_SIGNED = {2: ir.DataType.INT2, 4: ir.DataType.INT4, 8: ir.DataType.INT8}


def storage_bits(quantized: QuantizedWeight) -> int:
    """Bits of the ONNX code type: the narrowest that holds the codes (3 bits in 4, 5 and 6 in 8), and 4 for
    2-bit per-OC codes of a weight whose N is not a multiple of 4: ONNX Runtime 1.32 folds
    ``DequantizeLinear(2-bit, axis=0) + MatMul`` into ``MatMulNBits`` with wrong results then (found by
    tests/fuzz)."""
    if quantized.bits == 2 and quantized.block_axis == 0 and quantized.codes.shape[1] % 4:
        return 4
    return min(bits for bits in _UNSIGNED if bits >= quantized.bits)


def required_opset(bits: int) -> int:
    return 25 if bits == 2 else 21


def required_ir_version(bits: int) -> int:
    return 11 if bits == 2 else 10


#: Float types a DequantizeLinear writes (opset 21 also allows bfloat16, which ONNX Runtime's CPU kernels
#: do not implement); other weight types (bfloat16, double) are dequantized to float32 and cast.
DEQUANTIZE_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})


def dequantized_type(float_dtype: ir.DataType) -> ir.DataType:
    """The type the DequantizeLinear of a ``float_dtype`` weight writes (its scales' type)."""
    return float_dtype if float_dtype in DEQUANTIZE_TYPES else ir.DataType.FLOAT


@dataclasses.dataclass
class QdqWeight:
    """The initializers and the nodes (a DequantizeLinear, then a Cast where the weight's type is not one
    DequantizeLinear writes) that stand for one quantized weight."""

    initializers: list[ir.Value]
    node: ir.Node
    cast: ir.Node | None = None

    @property
    def nodes(self) -> list[ir.Node]:
        return [self.node] if self.cast is None else [self.node, self.cast]

    @property
    def output(self) -> ir.Value:
        return (self.cast or self.node).outputs[0]

    @property
    def nbytes(self) -> int:
        return sum(value.const_value.nbytes for value in self.initializers)


def _initializer(name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.Tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def dequantize_linear(base_name: str, quantized: QuantizedWeight, float_dtype: ir.DataType) -> QdqWeight:
    """Blocked ``DequantizeLinear(codes, scales[, zero_points], axis, block_size)`` for ``quantized``.

    ``base_name`` prefixes the new initializer and value names; the caller keeps them unique. The output
    has the weight's type ``float_dtype``: a bfloat16 or double weight is dequantized to float32 (its
    scales float32) and cast.
    """
    scale_type = dequantized_type(float_dtype)
    scale_array = quantized.scales.astype(scale_type.numpy())
    if quantized.symmetric:
        codes = _initializer(f"{base_name}.qweight", quantized.signed_codes(), _SIGNED[storage_bits(quantized)])
        inputs = [codes, _initializer(f"{base_name}.scales", scale_array)]
    else:
        code_type = _UNSIGNED[storage_bits(quantized)]
        codes = _initializer(f"{base_name}.qweight", quantized.codes, code_type)
        zero_points = _initializer(f"{base_name}.zero_points", quantized.zero_points, code_type)
        inputs = [codes, _initializer(f"{base_name}.scales", scale_array), zero_points]
    node = ir.node(
        "DequantizeLinear",
        inputs,
        attributes={"axis": quantized.block_axis, "block_size": quantized.block_size},
        name=f"{base_name}.DequantizeLinear",
    )
    output = node.outputs[0]
    output.name = f"{base_name}.dequantized"
    output.type = ir.TensorType(scale_type)
    output.shape = ir.Shape(quantized.codes.shape)
    cast = None
    if scale_type != float_dtype:
        output.name = f"{base_name}.dequantized_float"
        cast = ir.node("Cast", [output], attributes={"to": float_dtype}, name=f"{base_name}.Cast")
        cast.outputs[0].name = f"{base_name}.dequantized"
        cast.outputs[0].type = ir.TensorType(float_dtype)
        cast.outputs[0].shape = ir.Shape(quantized.codes.shape)
    return QdqWeight(inputs, node, cast)


#: The names ``NameAllocator.allocate`` derives from a base name.
_TAILS = (".qweight", ".scales", ".zero_points", ".dequantized", ".dequantized_float")


def graph_and_subgraphs(graph: ir.Graph):
    """``graph``, then the subgraphs of its nodes (If/Loop/Scan bodies), recursively."""
    graphs = [graph]
    while graphs:
        current = graphs.pop()
        yield current
        for node in current:
            graphs.extend(analysis.subgraphs(node))


def graph_names(graph: ir.Graph) -> set[str]:
    """Every value name of ``graph`` and of the subgraphs of its nodes (If/Loop/Scan bodies, recursively):
    ONNX Runtime needs names unique across a graph and the subgraphs that see it (outer-scope reads)."""
    names: set[str] = set()
    for current in graph_and_subgraphs(graph):
        names |= {value.name for value in current.initializers.values()}
        names |= {value.name for value in current.inputs}
        names |= {value.name for value in current.outputs}
        for node in current:
            names |= {output.name for output in node.outputs}
            names |= {value.name for value in node.inputs if value is not None}
    names.discard(None)
    return names


def node_names(graph: ir.Graph) -> set[str]:
    """Every node name of ``graph`` and its subgraphs."""
    names = {node.name for current in graph_and_subgraphs(graph) for node in current}
    names.discard(None)
    return names


class NameAllocator:
    """Readable, unique base names for new initializers (module path, else the weight's name), unique
    across the whole graph, its subgraphs included; and unique node names (``fresh_node``)."""

    def __init__(self, graph: ir.Graph):
        self.taken = graph_names(graph)
        self.nodes = node_names(graph)

    def allocate(self, layer: str, weight_name: str | None) -> str:
        base = re.sub(r"[^A-Za-z0-9_.]", "_", layer or weight_name or "weight")
        tails = (*_TAILS, ".DequantizeLinear", ".Cast")
        candidate = unique_name(
            base, lambda name: any(f"{name}{tail}" in self.taken or f"{name}{tail}" in self.nodes for tail in tails)
        )
        self.taken |= {f"{candidate}{tail}" for tail in _TAILS}
        self.nodes |= {f"{candidate}.DequantizeLinear", f"{candidate}.Cast"}
        return candidate

    def fresh_node(self, name: str) -> str:
        """A node name not yet taken."""
        return fresh_name(name, self.nodes)

    def fresh(self, name: str) -> str:
        """A value name not yet taken (``fresh_name``)."""
        return fresh_name(name, self.taken)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer ``name`` (already unique in ``graph``) holding ``array`` in its own type."""
    value = _initializer(name, array)
    graph.register_initializer(value)
    return value


def set_input_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    """Give ``node`` input ``index`` the value ``array`` in that input's type: in place when no other node reads
    it, else as a new initializer ``name``."""
    value = node.inputs[index]
    array = np.ascontiguousarray(array.astype(value.dtype.numpy()))
    if len(value.uses()) == 1 and value.is_initializer():
        value.const_value = ir.tensor(array, name=value.name)
    else:
        node.replace_input_with(index, add_initializer(graph, name, array))


def replace_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` becomes the graph output that ``old`` was, under ``old``'s name (the graph's interface keeps
    its names; ``old`` takes ``new``'s)."""
    for index, output in enumerate(graph.outputs):
        if output is old:
            graph.outputs[index] = new
            old_name, new_name = old.name, new.name
            old.name, new.name = None, None  # free the names before swapping (names are unique in a graph)
            old.name, new.name = new_name, old_name


def fresh_name(name: str, taken: set[str]) -> str:
    """``name``, else ``name_2``, ``name_3``, ...: the first one not in ``taken`` (added to it)."""
    candidate = unique_name(name, taken.__contains__)
    taken.add(candidate)
    return candidate


def unique_name(name: str, is_taken: Callable[[str], bool], *, separator: str = "_", first: int = 2) -> str:
    """``name``, else ``name{separator}{first}``, the next number, ...: the first that ``is_taken`` refuses
    (the one loop every new lowbit name goes through)."""
    candidate, suffix = name, first
    while is_taken(candidate):
        candidate, suffix = f"{name}{separator}{suffix}", suffix + 1
    return candidate
