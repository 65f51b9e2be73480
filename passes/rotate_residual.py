"""RotateResidualPass: carry a transformer's residual stream rotated by a random orthogonal ``Q``, folded
into the weights at compile time (QuaRot's and SpinQuant's R1; QuIP#'s incoherence processing).

With the norms' scales folded into their readers (FoldNormScalesPass), an RMSNorm commutes with any
orthogonal ``Q``: it divides each row by its root mean square, which ``Q`` preserves. So the stream can be
carried as ``x Q`` instead of ``x``: the embedding table becomes ``T Q``, every weight MatMul writing into the
stream (attention output, down projection) ``W Q`` in its columns (a bias ``b Q``), every weight MatMul
reading it through a norm (q/k/v, gate/up) ``Q^T W`` in its rows. The float model computes the same
function up to round-off, but the readers' rows no longer carry the stream's few huge channels one by one:
each row mixes all of them, so the low-bit grids of those weights are not stretched by outliers.

The stream is traced from each embedding Gather, op by op: an ``Add`` extends it (its other operand must be
a writer, else a float MatMul by ``Q`` rotates that operand in), ``Cast``/``Identity``, a multiplication by a
per-row or scalar factor and an ``RMSNormalization`` with unit scale keep it rotated, a square reduced over
the channel axis (the norm's ``mean(x^2)``) is unchanged. Any other reader (a norm whose scale did not fold,
as before a tied LM head; a LayerNorm, whose mean subtraction does not commute with ``Q``; a graph output)
gets the unrotated value from a float MatMul by ``Q^T``. A table that another node also reads (tied
embeddings) is not rotated: a float MatMul by ``Q`` follows its Gather. Those MatMuls carry the node
metadata ``lowbit.rotation``, are no weights to quantize (``analysis.weight_uses``) and are listed in the
report, since they stay in float. ``Q`` is stored once per stream width (the ``Q^T`` reader transposes it).

Run after FoldNormScalesPass and before calibration: the statistics must describe the rotated activations.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from lowbit.ir import analysis
from lowbit.ir.builders import NameAllocator, add_initializer, replace_graph_output, set_input_constant
from lowbit.passes.base import LowbitPass
from lowbit.passes.quant.rotation import random_orthogonal
from lowbit.passes.report import SkippedWeight

#: Node metadata key of the float MatMuls this pass inserts ("into_stream" or "out_of_stream").
ROTATION_KEY = analysis.ROTATION_KEY
PASS_THROUGH_OPS = frozenset({"Cast", "Identity"})
REDUCTIONS_OF_SQUARES = frozenset({"ReduceMean", "ReduceSum"})
NORMS_OF_ROWS = frozenset({"ReduceSumSquare", "ReduceL2"})
UNIT_SCALE_NORMS = frozenset({("", "RMSNormalization"), ("com.microsoft", "SimplifiedLayerNormalization")})


class NotRotatable(Exception):
    """This stream cannot be rotated; the message says why."""


Usage = tuple[ir.Node, int]


@dataclasses.dataclass
class _Plan:
    """What rotating one stream changes; nothing is changed until the whole stream is traced."""

    seed: ir.Node
    width: int
    stream: dict[ir.Value, None] = dataclasses.field(default_factory=dict)  # an ordered set
    entered: ir.Value | None = None  # the seed's output when its table is shared: rotated by a float MatMul
    rows: list[analysis.WeightUse] = dataclasses.field(default_factory=list)
    columns: list[analysis.WeightUse] = dataclasses.field(default_factory=list)
    tables: list[ir.Value] = dataclasses.field(default_factory=list)
    biases: list[Usage] = dataclasses.field(default_factory=list)
    exits: dict[ir.Value, list[Usage]] = dataclasses.field(default_factory=dict)
    entries: dict[ir.Value, list[Usage]] = dataclasses.field(default_factory=dict)
    pending: list[tuple[ir.Value, Usage]] = dataclasses.field(default_factory=list)

    def exit(self, value: ir.Value, usage: Usage) -> None:
        self.exits.setdefault(value, []).append(usage)


def _is_channel_axis(node: ir.Node, rank: int | None) -> bool:
    """True when the reduction ``node`` reduces exactly the last axis."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = analysis.constant_array(node.inputs[1])
        if axes is None:
            return False
        axes = [int(axis) for axis in np.asarray(axes).reshape(-1)]
    else:
        attribute = node.attributes.get("axes")
        axes = [int(axis) for axis in attribute.value] if attribute is not None else []
    if len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _static_rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _is_square_of(node: ir.Node, value: ir.Value) -> bool:
    if node.op_type == "Mul":
        return node.inputs[0] is value and node.inputs[1] is value
    if node.op_type == "Pow":
        exponent = analysis.constant_array(node.inputs[1])
        return node.inputs[0] is value and exponent is not None and exponent.size == 1 and float(exponent) == 2.0
    return False


def _row_factor(factor: ir.Value, stream: dict) -> bool:
    """True when ``factor`` scales whole rows (a scalar, a constant of equal entries, or a static last axis
    of 1): then ``(x Q) * factor == (x * factor) Q``."""
    if factor in stream:
        return False
    array = analysis.constant_array(factor)
    if array is not None:
        return array.size == 1 or bool(np.all(array == array.reshape(-1)[0]))
    shape = factor.shape
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


class RotateResidualPass(LowbitPass):
    """Rotate each residual stream (traced from an embedding Gather) by a random orthogonal matrix."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        uses = analysis.weight_uses(graph)
        matmuls = {use.node: use for use in uses if use.kind in ("matmul", "lm_head") and use.node.op_type == "MatMul"}
        names = NameAllocator(graph)
        rotations = _Rotations(graph, names, self.seed)
        rotated, skipped = [], []
        for seed in [use for use in uses if use.kind == "embedding"]:
            try:
                plan = self._trace(seed, matmuls)
            except NotRotatable as reason:
                skipped.append({"node": seed.node.name, "reason": str(reason)})
                continue
            rotated.append(self._apply(graph, plan, rotations, names))
        self.details = {"rotated_streams": len(rotated), "streams": rotated, "skipped_streams": skipped}
        self.skipped = [
            SkippedWeight(
                name=entry["rotation"],
                layer=entry["node"],
                kind="rotation",
                reason=f"the residual stream's rotation {entry['direction'].replace('_', ' ')}: an exact float "
                "MatMul (RotateResidualPass), kept in float",
            )
            for stream in rotated
            for entry in stream["float_rotations"]
        ]
        return ir.passes.PassResult(model, modified=bool(rotated))

    # -- tracing ---------------------------------------------------------------------------------------------

    def _trace(self, seed: analysis.WeightUse, matmuls: dict) -> _Plan:
        table = seed.weight
        output = seed.node.outputs[0]
        plan = _Plan(seed=seed.node, width=int(table.const_value.shape[1]))
        if len(table.uses()) == 1 and table.is_initializer() and not table.is_graph_input():
            plan.tables.append(table)
        else:
            plan.entered = output
        plan.stream[output] = None
        queue = [output]
        while queue:
            value = queue.pop(0)
            if value.is_graph_output():
                plan.exit(value, (None, -1))
            for usage in value.uses():
                # Whatever joins a stream traced before this one enters it through a marked MatMul: stop there, so
                # that no weight turns twice.
                if ROTATION_KEY in usage.node.metadata_props:
                    raise NotRotatable(f"{usage.node.name!r} rotates it into the stream of another table")
                for extended in self._follow(value, usage.node, usage.idx, plan, matmuls):
                    if extended not in plan.stream:
                        plan.stream[extended] = None
                        queue.append(extended)
        for value, usage in plan.pending:
            self._contribution(value, usage, plan, matmuls)
        if not plan.rows:
            raise NotRotatable("no weight MatMul reads the stream through a norm whose scale folded to 1")
        return plan  # a weight that reads and writes the stream turns on both sides: Q^T W Q

    def _follow(self, value: ir.Value, node: ir.Node, index: int, plan: _Plan, matmuls: dict) -> list[ir.Value]:
        """The values through which ``node`` (reading ``value`` at ``index``) carries the stream on; records
        what else the node needs (a rotated weight, an exit) in ``plan``."""
        op, domain = node.op_type, node.domain if node.domain != "ai.onnx" else ""
        if (domain, op) in UNIT_SCALE_NORMS and index == 0:
            scale = analysis.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
            has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
            last_axis = node.attributes.get_int("axis", -1) in (-1, (_static_rank(value) or 0) - 1)
            if scale is not None and np.all(scale == 1) and not has_bias and last_axis:
                return [node.outputs[0]]
        elif domain == "":
            if op == "Add" and len(node.inputs) == 2:
                other = node.inputs[1 - index]
                if other is not value:
                    plan.pending.append((other, (node, 1 - index)))
                return [node.outputs[0]]
            if op in PASS_THROUGH_OPS:
                return [node.outputs[0]]
            if op in NORMS_OF_ROWS and _is_channel_axis(node, _static_rank(value)):
                return []
            if _is_square_of(node, value) and self._reduced_over_channels(node, value):
                return []
            if op in ("Mul", "Div") and len(node.inputs) == 2 and (op == "Mul" or index == 0):
                if _row_factor(node.inputs[1 - index], plan.stream):
                    return [node.outputs[0]]
            if op == "MatMul" and index == 0 and node in matmuls:
                use = matmuls[node]
                if use.weight.is_initializer() and len(use.weight.uses()) == 1:  # an untied LM head too
                    plan.rows.append(use)
                    return []
        plan.exit(value, (node, index))
        return []

    @staticmethod
    def _reduced_over_channels(square: ir.Node, value: ir.Value) -> bool:
        output = square.outputs[0]
        readers = output.uses()
        return (
            bool(readers)
            and not output.is_graph_output()
            and all(
                usage.idx == 0
                and usage.node.op_type in REDUCTIONS_OF_SQUARES
                and _is_channel_axis(usage.node, _static_rank(value))
                for usage in readers
            )
        )

    def _contribution(self, value: ir.Value, usage: Usage, plan: _Plan, matmuls: dict) -> None:
        """``value`` is added into the stream at ``usage``: rotate the weight that writes it (and its bias on
        the way), else rotate ``value`` itself with a float MatMul."""
        if value in plan.stream:
            return
        producer = value.producer()
        single = len(value.uses()) == 1 and not value.is_graph_output()
        if single and producer is not None and producer in matmuls:
            use = matmuls[producer]
            if use.kind == "matmul" and use.weight.is_initializer() and len(use.weight.uses()) == 1:
                plan.columns.append(use)
                return
        if (
            single
            and producer is not None
            and producer.op_type == "Add"
            and producer.domain in analysis.DEFAULT_DOMAINS
        ):
            constants = [analysis.constant_array(operand) for operand in producer.inputs]
            for index, bias in enumerate(constants):
                other = producer.inputs[1 - index]
                if bias is not None and constants[1 - index] is None and bias.shape[-1:] == (plan.width,):
                    if bias.ndim == 1 or all(dim == 1 for dim in bias.shape[:-1]):
                        plan.biases.append((producer, index))
                        self._contribution(other, (producer, 1 - index), plan, matmuls)
                        return
        plan.entries.setdefault(value, []).append(usage)

    # -- rewriting -------------------------------------------------------------------------------------------

    @staticmethod
    def _apply(graph: ir.Graph, plan: _Plan, rotations: _Rotations, names: NameAllocator) -> dict:
        rotation = rotations.array(plan.width)
        dtype = plan.seed.inputs[0].dtype
        for use in plan.rows:
            _replace(use.weight, rotation.T @ use.weight.const_value.numpy().astype(np.float64))
        for use in plan.columns:
            _replace(use.weight, use.weight.const_value.numpy().astype(np.float64) @ rotation)
        for table in plan.tables:
            _replace(table, table.const_value.numpy().astype(np.float64) @ rotation)
        for node, index in plan.biases:
            bias = analysis.constant_array(node.inputs[index]).astype(np.float64)
            rotated = (bias.reshape(-1, plan.width) @ rotation).reshape(bias.shape)
            set_input_constant(graph, node, index, rotated, names.fresh(f"{node.name}_rotated_bias"))
        inserted = []
        if plan.entered is not None:
            exits = {(id(node), index) for node, index in plan.exits.pop(plan.entered, [])}
            into = _matmul(graph, names, plan.entered, rotations.stored(plan.width, dtype), "into_stream")
            for usage in list(plan.entered.uses()):
                if usage.node is not into and (id(usage.node), usage.idx) not in exits:
                    usage.node.replace_input_with(usage.idx, into.outputs[0])  # exits keep the unrotated value
            inserted.append(into)
        for value, usages in plan.entries.items():
            into = _matmul(graph, names, value, rotations.stored(plan.width, dtype), "into_stream")
            for node, index in usages:
                node.replace_input_with(index, into.outputs[0])
            inserted.append(into)
        for value, usages in plan.exits.items():
            out = _matmul(graph, names, value, rotations.transposed(plan.width, dtype), "out_of_stream")
            for node, index in usages:
                if node is None:
                    replace_graph_output(graph, value, out.outputs[0])
                else:
                    node.replace_input_with(index, out.outputs[0])
            inserted.append(out)
        return {
            "seed": plan.seed.name,
            "width": plan.width,
            "rows_rotated": [use.layer for use in plan.rows],
            "columns_rotated": [use.layer for use in plan.columns],
            "tables_rotated": [table.name for table in plan.tables],
            "biases_rotated": len(plan.biases),
            "float_rotations": [
                {
                    "node": node.name,
                    "direction": node.metadata_props[ROTATION_KEY],
                    "reads": node.inputs[0].name,
                    "rotation": node.inputs[1].name,
                }
                for node in inserted
            ],
        }


class _Rotations:
    """One ``Q`` per stream width (the same seed gives the same matrix), stored in the graph only where a
    float MatMul needs it, and ``Transpose(Q)`` made once (ONNX Runtime folds it when the session loads)."""

    def __init__(self, graph: ir.Graph, names: NameAllocator, seed: int) -> None:
        self.graph, self.names, self.seed = graph, names, seed
        self._arrays: dict[int, np.ndarray] = {}
        self._stored: dict[tuple, ir.Value] = {}

    def array(self, width: int) -> np.ndarray:
        if width not in self._arrays:
            self._arrays[width] = random_orthogonal(width, self.seed)
        return self._arrays[width]

    def stored(self, width: int, dtype: ir.DataType) -> ir.Value:
        key = (width, dtype, False)
        if key not in self._stored:
            name = self.names.fresh(f"lowbit_rotation_{width}")
            self._stored[key] = add_initializer(self.graph, name, self.array(width).astype(dtype.numpy()))
        return self._stored[key]

    def transposed(self, width: int, dtype: ir.DataType) -> ir.Value:
        key = (width, dtype, True)
        if key not in self._stored:
            q = self.stored(width, dtype)
            node = ir.node("Transpose", [q], attributes={"perm": [1, 0]}, name=self.names.fresh_node(f"{q.name}_T"))
            node.outputs[0].name = self.names.fresh(f"{q.name}_T")
            node.outputs[0].shape, node.outputs[0].type = ir.Shape([width, width]), q.type
            self.graph.insert_before(next(iter(self.graph)), node)
            self._stored[key] = node.outputs[0]
        return self._stored[key]


def _replace(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array.astype(value.dtype.numpy())), name=value.name)


def _matmul(graph: ir.Graph, names: NameAllocator, value: ir.Value, rotation: ir.Value, direction: str) -> ir.Node:
    """A float ``MatMul(value, rotation)`` right after ``value``'s producer, marked as a rotation."""
    base = value.name or "stream"
    node = ir.node("MatMul", [value, rotation], name=names.fresh_node(f"{base}_{direction}"))
    node.metadata_props[ROTATION_KEY] = direction
    node.outputs[0].name = names.fresh(f"{base}_{direction}")
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(next(iter(graph)), node)
    return node
