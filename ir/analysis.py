"""Graph queries the passes share: which nodes are weight MatMuls, LM heads and embeddings, and the
module path each node came from."""

from __future__ import annotations

import ast
import dataclasses

import numpy as np
import onnx_ir as ir

#: Node metadata marking the float MatMuls of a residual-stream rotation (RotateResidualPass): no weights.
ROTATION_KEY = "lowbit.rotation"
#: Module-path leaf names that mark an output projection onto the vocabulary.
LM_HEAD_NAMES = frozenset({"lm_head", "embed_out", "output_projection"})
#: Weight types the passes quantize (bfloat16 and double are quantized in float32 and cast back).
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
DEFAULT_DOMAINS = ("", "ai.onnx")
_NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclasses.dataclass
class WeightUse:
    """A node that multiplies activations by a constant 2-D weight.

    ``kind`` is ``"matmul"`` (MatMul with B[K, N]), ``"gemm"`` (Gemm, transB handled by the caller),
    ``"lm_head"`` (an output head: a MatMul named like an LM head, tied to an embedding table, or whose
    output is a graph output) or ``"embedding"`` (a Gather from a [V, D] table).
    """

    node: ir.Node
    weight: ir.Value
    input_index: int
    kind: str
    layer: str


def module_path(node: ir.Node) -> str:
    """The PyTorch module a node came from (torch.onnx metadata), else the node's name."""
    scopes = node.metadata_props.get(_NAME_SCOPES_KEY)
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        # The last scope is the op itself ("linear"); the one before is the owning module.
        if len(names) >= 2 and names[-2]:
            return names[-2]
    return node.name or "<unnamed>"


def constant_array(value: ir.Value | None):
    """The NumPy value of a constant (initializer or Constant output), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def initializer_bytes(graph: ir.Graph) -> int:
    """Bytes of all initializer tensors of ``graph`` (as stored: 4-bit types count half a byte)."""
    return sum(value.const_value.nbytes for value in graph.initializers.values() if value.const_value is not None)


def is_constant_weight(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.dtype in FLOAT_TYPES
        and len(value.const_value.shape) == 2
    )


def _is_tied_to_gather(value: ir.Value) -> bool:
    """True when ``value`` is Transpose(table), ``table`` a constant weight that a Gather also reads (tied
    embeddings); a table already quantized (made by a DequantizeLinear) is no weight any more."""
    producer = value.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return False
    source = producer.inputs[0]
    return is_constant_weight(source) and any(use.node.op_type == "Gather" for use in source.uses())


def _is_lm_head(node: ir.Node, weight: ir.Value, layer: str) -> bool:
    if layer.rsplit(".", 1)[-1] in LM_HEAD_NAMES:
        return True
    if _is_tied_to_gather(weight):
        return True
    return any(output.is_graph_output() for output in node.outputs)


def weight_uses(graph: ir.Graph) -> list[WeightUse]:
    """Every weight MatMul / Gemm / LM head / embedding Gather of the main graph, in graph order.

    A MatMul counts when its B input is a constant 2-D float tensor, or (for a tied LM head) a Transpose
    of an embedding table that a Gather also reads; its A input must not be constant. The float rotations
    of RotateResidualPass (node metadata ``ROTATION_KEY``) are not weights.
    """
    uses: list[WeightUse] = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or ROTATION_KEY in node.metadata_props:
            continue
        layer = module_path(node)
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) >= 2:
            activation, weight = node.inputs[0], node.inputs[1]
            if activation is None or activation.const_value is not None or weight is None:
                continue
            tied = node.op_type == "MatMul" and _is_tied_to_gather(weight)
            if not (is_constant_weight(weight) or tied):
                continue
            if _is_lm_head(node, weight, layer):
                kind = "lm_head"
            else:
                kind = "gemm" if node.op_type == "Gemm" else "matmul"
            uses.append(WeightUse(node, weight, 1, kind, layer))
        elif node.op_type == "Gather" and len(node.inputs) == 2:
            table = node.inputs[0]
            if is_constant_weight(table) and node.attributes.get_int("axis", 0) == 0:
                uses.append(WeightUse(node, table, 0, "embedding", layer))
    return uses


def weight_value_array(use: WeightUse):
    """The weight as a NumPy array: the constant itself, or the transposed table of a tied LM head."""
    direct = constant_array(use.weight)
    if direct is not None:
        return direct
    producer = use.weight.producer()
    table = constant_array(producer.inputs[0])
    return table.T


def weight_shape_kn(use: WeightUse) -> tuple[int, int]:
    """``[K, N]`` of the weight as its node reads it (a Gemm's transB undone), from the tensors' shapes: no value is
    read (a weight that ``lowbit.load`` left in its file stays there)."""
    if use.weight.const_value is not None:
        shape = tuple(use.weight.const_value.shape)
    else:  # a tied head: the table, transposed
        shape = tuple(use.weight.producer().inputs[0].const_value.shape)[::-1]
    return shape[::-1] if stores_weight_transposed(use.node) else shape


def weight_layout(node: ir.Node) -> tuple:
    """How a node reads its weight: op, transB and alpha (a shared weight must be read one way)."""
    if node.op_type != "Gemm":
        return (node.op_type, 0, 1.0)
    return ("Gemm", node.attributes.get_int("transB", 0), node.attributes.get_float("alpha", 1.0))


def stores_weight_transposed(node: ir.Node) -> bool:
    """Whether ``node`` reads its weight stored ``[N, K]`` (a Gemm's B with transB)."""
    return bool(weight_layout(node)[1])


def gemm_weight_kn(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """Gemm's B as the [K, N] operand of an equivalent MatMul, with alpha folded in."""
    if node.attributes.get_int("transB", 0):
        weight = weight.T
    return weight * np.float32(node.attributes.get_float("alpha", 1.0))


def default_opset(model: ir.Model, default: int | None = None) -> int | None:
    """The model's default-domain opset, whether the file spells the domain ``""`` or ``"ai.onnx"``."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", default))


def normalize_default_domain(model: ir.Model) -> bool:
    """Spell the default domain ``""`` everywhere (opset import, nodes of every graph and function), as
    the version converter and the builders expect; True when anything changed."""
    changed = False
    if "ai.onnx" in model.opset_imports:
        version = model.opset_imports.pop("ai.onnx")
        model.opset_imports[""] = max(version, model.opset_imports.get("", version))
        changed = True
    graphs = list(model.graphs()) + list(model.functions.values())
    for graph in graphs:
        for node in graph:
            if node.domain == "ai.onnx":
                node.domain = ""
                changed = True
    return changed


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node's attributes hold (If branches, Loop/Scan bodies)."""
    found = []
    for attribute in node.attributes.values():
        if attribute.is_ref():
            continue
        if attribute.type == ir.AttributeType.GRAPH:
            found.append(attribute.value)
        elif attribute.type == ir.AttributeType.GRAPHS:
            found.extend(attribute.value)
    return found


def _constant_origin(value: ir.Value, memo: dict) -> str | None:
    """How ``value`` is made when it does not depend on any graph input: ``"constant"`` (an initializer
    or Constant output), ``"computed"`` (nodes on constants, run at every inference), ``"quantized"``
    (behind a DequantizeLinear: a weight already quantized); None for an activation."""
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = None  # a cycle is no constant
    if value.is_graph_input():
        origin = None
    elif value.const_value is not None:
        origin = "constant"
    else:
        producer = value.producer()
        if producer is None:
            origin = None  # an outer-scope value of a subgraph, or an unknown input
        elif producer.op_type == "Constant" and producer.domain in DEFAULT_DOMAINS:
            origin = "constant"
        elif producer.op_type == "DequantizeLinear" or producer.domain not in DEFAULT_DOMAINS or subgraphs(producer):
            origin = "quantized" if producer.op_type == "DequantizeLinear" else None
        else:
            inputs = [_constant_origin(input_, memo) for input_ in producer.inputs if input_ is not None]
            if not inputs or any(origin is None for origin in inputs):
                origin = None
            elif "quantized" in inputs:
                origin = "quantized"
            else:
                origin = "computed"
    memo[key] = origin
    return origin


def unquantizable_weights(graph: ir.Graph, weight_nodes: set[int]) -> list[tuple[ir.Node, ir.Value, str]]:
    """(node, weight, reason) of every MatMul / Gemm (subgraphs included) that multiplies by a constant
    operand that ``weight_uses`` does not offer for quantization (``weight_nodes``: ids of the nodes it
    does); weights already quantized are not listed."""
    found = []
    memo: dict = {}

    def visit(current: ir.Graph, inside: ir.Node | None) -> None:
        for node in current:
            for subgraph in subgraphs(node):
                visit(subgraph, inside or node)
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
                continue
            if id(node) in weight_nodes or ROTATION_KEY in node.metadata_props:  # the rotation pass reports those
                continue
            activation, weight = node.inputs[0], node.inputs[1]
            if weight is None or activation is None:
                continue
            origin = _constant_origin(weight, memo)
            if origin is None or origin == "quantized":
                continue
            reason = _unquantizable_reason(node, activation, weight, origin, inside, memo)
            found.append((node, weight, reason))

    visit(graph, None)
    return found


def _unquantizable_reason(node, activation, weight, origin, inside, memo) -> str:
    if inside is not None:
        return f"inside a subgraph of {inside.op_type} {inside.name!r}: weights of subgraphs are not quantized"
    if _constant_origin(activation, memo) is not None:
        return "both operands are constants (a constant product, not a weight multiplication)"
    if origin == "computed":
        producer = weight.producer()
        return (
            f"the weight is computed at run time by {producer.op_type} {producer.name!r} from constants and was not "
            "folded into an initializer (FoldWeightsPass folds Transpose/Cast/Reshape/scalar arithmetic)"
        )
    if weight.dtype is not None and weight.dtype not in FLOAT_TYPES:
        return f"the weight's type {weight.dtype.name} is not a float type"
    shape = weight.const_value.shape if weight.const_value is not None else weight.shape
    if shape is not None and len(shape) != 2:
        return f"the weight has shape {list(shape)}: only 2-D weights are quantized"
    if weight.const_value is None:
        return "the weight is a Constant node's output, not an initializer (FoldWeightsPass turns it into one)"
    return "not recognised as a weight multiplication"
