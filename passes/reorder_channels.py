"""ReorderChannelsPass: permute weights' input channels so that large-activation channels sit together,
folded into the producers at compile time: the graph keeps the same nodes, only constants change.

For each weight MatMul (the *target*) the pass walks back from its input through elementwise ops
(SiLU/GELU/bias Add/gating Mul...), layout ops (Reshape, Transpose, Unsqueeze, Squeeze, Expand) and the
attention MatMul ``probs @ V`` to the weight MatMuls that produce it (the *sources*: gate/up for
down_proj, v_proj for o_proj). It then tracks, op by op, which source channel and which *slice* every
position holds (``passes/quant/reorder.py``): the attention's heads are slices, since each head has its
own probabilities, so V's channels may move only within a head, and with grouped-query attention a
KV head's permutation reaches every query head that reads it. The permutation (sorted by calibration
abs-max or ``diag(H)`` of the target's input) goes into the sources' output columns (and per-channel
constants such as biases on the way), its induced position map into the target's rows and into the
target input's calibration statistics, so QuantizeWeightsPass and GPTQ see the reordered activation.

Where the path cannot be proven (an input read from the residual stream through a norm, as for
q/k/v/gate/up, a value that also feeds another op, a shared weight, an unknown shape) the target is
left as it is and the report says why. Lossless before quantization (float round-off only). Needs the
statistics of CaptureCalibrationPass: run it after that pass.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from lowbit.ir import analysis
from lowbit.passes.base import LowbitPass
from lowbit.passes.quant import reorder
from lowbit.runtime.calibration import calibration_of, set_calibration

#: Elementwise ops of one data input whose output position k depends on input position k only.
UNARY_OPS = frozenset(
    {
        "Relu",
        "Sigmoid",
        "Tanh",
        "Gelu",
        "Erf",
        "Neg",
        "Abs",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Softplus",
        "Softsign",
        "Identity",
        "Cast",
        "Elu",
        "LeakyRelu",
        "Selu",
        "Celu",
        "HardSigmoid",
        "HardSwish",
        "Mish",
        "Sin",
        "Cos",
    }
)
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand"})
#: Consumers that read only a tensor's shape: a permutation cannot change what they compute.
SHAPE_READERS = frozenset({"Shape", "Size"})


class PermutationNotFoldable(Exception):
    """The permutation of one target cannot be folded; the message says why."""


@dataclasses.dataclass
class Layout:
    """Which source channel (``channel``) of which slice (``slice``) each position of a tensor holds.

    Both arrays have the tensor's rank; an axis the channel does not vary along has size 1 (a *free*
    axis: batch, sequence, broadcast copies), any other axis has the tensor's static size.
    """

    channel: np.ndarray
    slice: np.ndarray

    def __post_init__(self) -> None:
        self.channel, self.slice = (np.array(a) for a in np.broadcast_arrays(self.channel, self.slice))
        for axis in range(self.channel.ndim):  # an axis neither array varies along is free
            if self.channel.shape[axis] > 1 and all(_constant_along(a, axis) for a in (self.channel, self.slice)):
                self.channel, self.slice = self.channel.take([0], axis), self.slice.take([0], axis)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.channel.shape

    def aligned(self, rank: int) -> Layout:
        """The layout broadcast (numpy rules) to ``rank`` axes."""
        if rank < self.channel.ndim:
            raise PermutationNotFoldable(f"rank {self.channel.ndim} tensor broadcast to rank {rank}")
        extra = (1,) * (rank - self.channel.ndim)
        return Layout(self.channel.reshape(extra + self.shape), self.slice.reshape(extra + self.shape))

    def map(self, function) -> Layout:
        return Layout(function(self.channel), function(self.slice))

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(channel, slice) per position of a tensor whose channels all lie on its last axis."""
        if any(size > 1 for size in self.shape[:-1]):
            raise PermutationNotFoldable(f"channels spread over several axes {self.shape}")
        return self.channel.reshape(-1), self.slice.reshape(-1)


def _constant_along(array: np.ndarray, axis: int) -> bool:
    return bool(np.all(array == array.take([0], axis)))


def _same_dim(a, b) -> bool:
    """Equal known dimensions (an unnamed symbolic dimension equals nothing)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return not isinstance(a, int) and not isinstance(b, int) and a.value is not None and a.value == b.value


def _dims(value: ir.Value) -> list:
    if value.shape is None:
        raise PermutationNotFoldable(f"{value.name!r} has no shape (run shape inference)")
    return list(value.shape)


def _static(dims: list, what: str) -> list[int]:
    if not all(isinstance(d, int) for d in dims):
        raise PermutationNotFoldable(f"{what} has dynamic dimensions {dims} where channels are regrouped")
    return dims


def _axes(node: ir.Node, rank: int) -> list[int] | None:
    """Unsqueeze/Squeeze axes (input since opset 13, attribute before), normalised to ``[0, rank)``."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = analysis.constant_array(node.inputs[1])
        if array is None:
            raise PermutationNotFoldable(f"{node.op_type} {node.name!r} has non-constant axes")
        axes = array.tolist()
    elif "axes" in node.attributes:
        axes = list(node.attributes.get_ints("axes"))
    else:
        return None
    return sorted(a % rank for a in axes)


def _reshape(layout: Layout, node: ir.Node) -> Layout:
    """Reshape keeps the common leading and trailing dimensions; channels may only regroup in between."""
    before, after = _dims(node.inputs[0]), _dims(node.outputs[0])
    head = 0
    while head < min(len(before), len(after)) and _same_dim(before[head], after[head]):
        head += 1
    tail = 0
    while tail < min(len(before), len(after)) - head and _same_dim(before[-1 - tail], after[-1 - tail]):
        tail += 1
    middle_in, middle_out = before[head : len(before) - tail], after[head : len(after) - tail]
    shape = layout.shape
    outer, inner = shape[:head], shape[len(shape) - tail :]
    if all(size == 1 for size in shape[head : len(shape) - tail]):
        return layout.map(lambda a: a.reshape(outer + (1,) * len(middle_out) + inner))
    sizes_in = _static(middle_in, f"Reshape {node.name!r} input")
    sizes_out = _static(middle_out, f"Reshape {node.name!r} output")
    if math.prod(sizes_in) != math.prod(sizes_out):
        raise PermutationNotFoldable(f"Reshape {node.name!r}: shapes {before} -> {after} do not match")
    full = outer + tuple(sizes_in) + inner
    return layout.map(lambda a: np.broadcast_to(a, full).reshape(outer + tuple(sizes_out) + inner))


def _expand(layout: Layout, node: ir.Node) -> Layout:
    dims = _dims(node.outputs[0])
    layout = layout.aligned(len(dims))
    for size, dim in zip(layout.shape, dims):
        if size > 1 and dim != size:
            raise PermutationNotFoldable(f"Expand {node.name!r} changes a channel axis ({size} -> {dim})")
    return layout


def _attention_matmul(layout: Layout, node: ir.Node) -> Layout:
    """``probs @ V``: V's last axis passes through; its batch axes meet per-head probabilities (slices)."""
    rank = len(_dims(node.outputs[0]))
    if layout.channel.ndim < 2 or layout.shape[-2] > 1:
        raise PermutationNotFoldable(f"MatMul {node.name!r} sums over channels of its right operand")
    layout = layout.aligned(rank)
    pinned = [axis for axis in range(rank - 2) if layout.shape[axis] > 1]
    if not pinned:
        return layout
    sizes = [layout.shape[axis] for axis in pinned]
    grid = np.indices(layout.shape)
    index = np.ravel_multi_index([grid[axis] for axis in pinned], sizes)
    return Layout(layout.channel, layout.slice * math.prod(sizes) + index)


@dataclasses.dataclass
class Component:
    """One foldable permutation: sources, the chain of ops, the targets that read its end ``x``."""

    x: ir.Value
    targets: list[analysis.WeightUse]
    sources: list[analysis.WeightUse]
    nodes: list[ir.Node]
    layouts: dict[ir.Value, Layout]
    constants: list[tuple[ir.Node, int]]  # per-channel constant inputs on the chain


class ReorderChannelsPass(LowbitPass):
    """Sort input channels by calibration ``criterion`` (``absmax`` or ``hessian``) where the
    permutation folds into the producing weights; leave other weights as they are, with a reason."""

    def __init__(self, criterion: str = "absmax"):
        super().__init__()
        if criterion not in reorder.CRITERIA:
            raise ValueError(f"criterion must be one of {reorder.CRITERIA}, got {criterion!r}")
        self.criterion = criterion

    needs_calibration = True

    def calibration_use(self) -> str:
        return f"it sorts channels by their {self.criterion}"

    def ranked_inputs(self, graph: ir.Graph) -> set[str]:
        """The activations whose statistics the sort reads (abs-max and ``diag(H)`` only, never the full H): the
        inputs of the weights whose permutation folds into their producers."""
        return {component.x.name for component in self._components(graph)[0]}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        statistics = calibration_of(model)
        # The permuted statistics belong to this model only: the caller's object may serve other models.
        statistics = dataclasses.replace(statistics, by_activation=dict(statistics.by_activation))
        set_calibration(model, statistics)
        components, skipped = self._components(model.graph)
        reordered = []
        for component in components:
            record = self._apply(model.graph, component, statistics)
            if record is not None:
                reordered.append(record)
        self.details = {
            "criterion": self.criterion,
            "reordered_weights": sum(len(record["targets"]) for record in reordered),
            "permuted_sources": sum(len(record["sources"]) for record in reordered),
            "permuted_constants": sum(record["constants"] for record in reordered),
            "skipped_weights": len(skipped),
            "reordered": reordered,
            "skipped": skipped,
        }
        return ir.passes.PassResult(model, modified=bool(reordered))

    def _apply(self, graph: ir.Graph, component: Component, statistics) -> dict | None:
        """Sort ``component``'s channels by the criterion and fold the permutation; None when already sorted."""
        x = component.x
        if x.name not in statistics.by_activation:
            raise KeyError(
                f"no calibration statistics for {x.name!r}: collect them on this graph (after FoldNormScalesPass)"
            )
        channel, slice_ = component.layouts[x].flat()
        width = component.sources[0].weight.const_value.shape[1]
        scores = reorder.source_scores(
            reorder.position_scores(statistics.by_activation[x.name], self.criterion), channel, width
        )
        classes = reorder.interchangeable_classes(channel, slice_, width)
        permutation = reorder.sorting_permutation(scores, classes)
        if np.array_equal(permutation, np.arange(width)):
            return None
        q, constants = _apply_fold(graph, component, permutation)
        statistics.by_activation[x.name] = reorder.permute_statistics(statistics.by_activation[x.name], q)
        return {
            "input": x.name,
            "targets": [use.layer for use in component.targets],
            "sources": [use.layer for use in component.sources],
            "channels": width,
            "classes": int(classes.max()) + 1,
            "moved": int(np.count_nonzero(q != np.arange(len(q)))),
            "constants": constants,
        }

    def _components(self, graph: ir.Graph) -> tuple[list[Component], list[dict]]:
        """Every weight input whose permutation provably folds into its producers, and a record per weight whose
        permutation does not."""
        uses = analysis.weight_uses(graph)
        producers = {use.node: use for use in uses if use.kind != "embedding"}
        by_input: dict[ir.Value, list[analysis.WeightUse]] = {}
        for use in uses:
            if use.kind != "embedding":
                by_input.setdefault(use.node.inputs[0], []).append(use)
        components, skipped = [], []
        for x, targets in by_input.items():
            try:
                components.append(self._trace(x, targets, producers))
            except PermutationNotFoldable as reason:
                skipped += [{"layer": use.layer, "weight": use.weight.name, "reason": str(reason)} for use in targets]
        return components, skipped

    @staticmethod
    def _fixed(use: analysis.WeightUse) -> str | None:
        """Why ``use``'s weight cannot be permuted, or None for a plain MatMul owning a constant weight."""
        if use.kind == "lm_head":
            return f"{use.layer!r} is an output head"
        if use.node.op_type != "MatMul":
            return f"{use.layer!r} is a {use.node.op_type}, not a MatMul"
        if len(use.weight.uses()) != 1:
            return f"the weight of {use.layer!r} is shared with another node"
        if not use.weight.is_initializer():  # a Constant node's output: its attribute, not const_value, is saved
            return f"the weight of {use.layer!r} is a Constant node's output, not an initializer"
        return None

    def _trace(self, x: ir.Value, targets: list[analysis.WeightUse], producers: dict) -> Component:
        """The chain from the sources to ``x``, with every position's layout; PermutationNotFoldable when unprovable."""
        for use in targets:
            if self._fixed(use):
                raise PermutationNotFoldable(self._fixed(use))
        chain: set[ir.Node] = set()
        found: list[analysis.WeightUse] = []
        stack, seen = [x], set()
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            if value.const_value is not None:
                raise PermutationNotFoldable(f"reaches the constant {value.name!r}")
            producer = value.producer()
            if producer is None:
                raise PermutationNotFoldable(f"reads the graph input {value.name!r}")
            if producer in producers:
                source = producers[producer]
                if self._fixed(source):
                    raise PermutationNotFoldable(f"its producer cannot be permuted: {self._fixed(source)}")
                found.append(source)
                continue
            stack += self._walked_inputs(producer)
            chain.add(producer)
        nodes = [node for node in x.graph if node in chain]  # graph order is topological
        self._check_consumers(x, targets, nodes, found)
        layouts: dict[ir.Value, Layout] = {}
        for use in found:
            output = use.node.outputs[0]
            rank = len(_dims(output))
            width = use.weight.const_value.shape[1]
            layouts[output] = Layout(np.arange(width).reshape((1,) * (rank - 1) + (width,)), np.zeros(1, np.int64))
        constants: list[tuple[ir.Node, int]] = []
        for node in nodes:
            layouts[node.outputs[0]] = self._propagate(node, layouts, constants)
        channel, slice_ = layouts[x].flat()
        if len(channel) != targets[0].weight.const_value.shape[0]:
            raise PermutationNotFoldable(f"input positions {len(channel)} != weight rows")
        if not reorder.positions_are_distinct(channel, slice_):
            raise PermutationNotFoldable("the input repeats a channel within one slice")
        return Component(x, targets, found, nodes, layouts, constants)

    @staticmethod
    def _walked_inputs(node: ir.Node) -> list[ir.Value]:
        """The inputs that carry source channels into ``node``; raises for ops the pass cannot see through."""
        if node.domain not in ("", "ai.onnx"):
            raise PermutationNotFoldable(f"reaches {node.domain}::{node.op_type} {node.name!r}")
        if node.op_type in UNARY_OPS or node.op_type in LAYOUT_OPS:
            return [node.inputs[0]]
        if node.op_type in BINARY_OPS and len(node.inputs) == 2:
            walked = [value for value in node.inputs if value is not None and value.const_value is None]
            if not walked:
                raise PermutationNotFoldable(f"{node.op_type} {node.name!r} reads only constants")
            return walked
        if node.op_type == "MatMul":  # probs @ V: V carries the channels, probs are per-head weights
            return [node.inputs[1]]
        raise PermutationNotFoldable(
            f"its input depends on {node.op_type} {node.name!r}, which mixes or drops channels"
        )

    @staticmethod
    def _check_consumers(x: ir.Value, targets, nodes: list[ir.Node], sources) -> None:
        """Every value on the chain feeds only the chain, the targets (``x``) or shape readers."""
        members = set(nodes)
        target_nodes = {use.node for use in targets}
        for value in [use.node.outputs[0] for use in sources] + [node.outputs[0] for node in nodes]:
            if value.is_graph_output():
                raise PermutationNotFoldable(f"{value.name!r} is a graph output")
            for usage in value.uses():
                node = usage.node
                if node.op_type in SHAPE_READERS:
                    continue
                if node in members and not (node.op_type == "MatMul" and usage.idx != 1):
                    continue
                if value is x and node in target_nodes and usage.idx == 0:
                    continue
                raise PermutationNotFoldable(f"{value.name!r} also feeds {node.op_type} {node.name!r}")
        for node in nodes:
            if len(node.outputs) != 1:
                raise PermutationNotFoldable(f"{node.op_type} {node.name!r} has several outputs")

    @staticmethod
    def _propagate(node: ir.Node, layouts: dict[ir.Value, Layout], constants: list) -> Layout:
        """The layout of ``node``'s output from its inputs' (PermutationNotFoldable when channels would mix)."""
        source = layouts.get(node.inputs[0])
        op = node.op_type
        if op in UNARY_OPS:
            return source
        if op == "Transpose":
            rank = source.channel.ndim
            perm = node.attributes.get_ints("perm", list(reversed(range(rank))))
            return source.map(lambda a: a.transpose(perm))
        if op == "Unsqueeze":
            axes = _axes(node, len(_dims(node.outputs[0])))
            return source.map(lambda a: np.expand_dims(a, axes))
        if op == "Squeeze":
            axes = _axes(node, source.channel.ndim)
            if axes is None:
                axes = [axis for axis, dim in enumerate(_dims(node.inputs[0])) if dim == 1]
            if any(source.shape[axis] > 1 for axis in axes):
                raise PermutationNotFoldable(f"Squeeze {node.name!r} removes a channel axis")
            return source.map(lambda a: np.squeeze(a, tuple(axes)))
        if op == "Reshape":
            return _reshape(source, node)
        if op == "Expand":
            return _expand(source, node)
        if op == "MatMul":
            return _attention_matmul(layouts[node.inputs[1]], node)
        return _elementwise(node, layouts, constants)


def _elementwise(node: ir.Node, layouts: dict[ir.Value, Layout], constants: list) -> Layout:
    """Binary elementwise op: chain inputs must agree position by position; constants broadcast or are
    per-channel along a flat last axis (then they are permuted with the channels)."""
    rank = len(_dims(node.outputs[0]))
    chained = [layouts[value].aligned(rank) for value in node.inputs if value in layouts]
    first = chained[0]
    for other in chained[1:]:
        if other.shape != first.shape or not (
            np.array_equal(other.channel, first.channel) and np.array_equal(other.slice, first.slice)
        ):
            raise PermutationNotFoldable(f"{node.op_type} {node.name!r} combines differently ordered channels")
    for index, value in enumerate(node.inputs):
        if value in layouts:
            continue
        dims = (1,) * (rank - len(value.const_value.shape)) + tuple(value.const_value.shape)
        if all(dim == 1 or size == 1 for dim, size in zip(dims, first.shape)):
            continue  # broadcast along every channel axis: the same for every channel
        channel, slice_ = first.flat()  # raises unless the channels lie on the last axis alone
        if dims[-1] != first.shape[-1] or not reorder.positions_are_distinct(channel, slice_):
            raise PermutationNotFoldable(
                f"{node.op_type} {node.name!r}: constant {value.name!r} {dims} vs channels {first.shape}"
            )
        constants.append((node, index))
    return first


def _apply_fold(graph: ir.Graph, component: Component, permutation: np.ndarray) -> tuple[np.ndarray, int]:
    """Permute the sources' columns, chain constants and targets' rows; return the targets' ``q``."""
    for use in component.sources:
        _set_constant(use.weight, use.weight.const_value.numpy()[:, permutation])
    for node, index in component.constants:
        channel, slice_ = component.layouts[node.outputs[0]].flat()
        q = reorder.position_permutation(channel, slice_, permutation)
        value = node.inputs[index]
        permuted = value.const_value.numpy()[..., q]
        if len(value.uses()) == 1:
            _set_constant(value, permuted)
        else:  # shared (exporters merge equal constants): this node gets its own copy
            copy = ir.Value(
                name=f"{value.name}_reordered_{node.name}",
                shape=ir.Shape(permuted.shape),
                type=ir.TensorType(value.dtype),
                const_value=ir.tensor(permuted, name=f"{value.name}_reordered_{node.name}"),
            )
            graph.register_initializer(copy)
            node.replace_input_with(index, copy)
    channel, slice_ = component.layouts[component.x].flat()
    q = reorder.position_permutation(channel, slice_, permutation)
    for use in component.targets:
        _set_constant(use.weight, use.weight.const_value.numpy()[q, :])
    return q, len(component.constants)


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
