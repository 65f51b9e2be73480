"""SplitOutliersPass: dense-and-sparse decomposition (SqueezeLLM) and layer splitting (SplitQuant) of
weights, before QuantizeWeightsPass quantizes them.

Runs after CaptureCalibrationPass (the sensitivity criterion reads the diagonal of the Hessian of each
weight's input, the split decision the Hessian) and before QuantizeWeightsPass. Every new MatMul reads the
same activation as the original one, so the calibration statistics (keyed by activation name) serve it too. Lossless: the graph
computes ``x @ W`` up to float32 round-off; the weights are decomposed exactly (``passes/quant/outliers.py``).

**Dense and sparse** (``outlier_fraction > 0``): the top fraction of each weight's entries (by ``|w|`` or
by ``H_kk * w**2``) leave the weight, which keeps zeros in their place and is quantized next; the outliers
stay exact float32 in a side branch of standard ONNX, added to the MatMul's output. The branch works on
the transposed activations, so that every gather moves a whole row of tokens, and sums each output
channel's products as a difference of a running sum (the outliers are stored column by column, CSC)::

    xt = Transpose(Reshape(x, [-1, K]))                  # [K, T], one per activation (q/k/v share it)
    c  = CumSum(Mul(Gather(xt, rows), values), exclusive) # [nnz + 1, T]: running sum of x[:, k_i] * v_i
    y  = y_dense + Reshape(Transpose(c[ptr[1:]] - c[ptr[:-1]]), Shape(y_dense))

The README ("Outliers and layer split, measured") gives their cost on SmolLM2. Alternatives, timed per weight against its quantized MatMul: ``ScatterND(reduction="add")`` on the
transposed output was as fast but is racy in ONNX Runtime's CPU kernel when indices repeat (several
outliers in one output channel, always the case here): wrong sums that change from run to run
(microsoft/onnxruntime#18048). ``ScatterElements`` on the last axis took 1.7-12x, an ELL gather (every
output channel padded to the longest) 10-130x, since a few output channels hold most outliers; a
dense ``[used rows, N]`` slice (the outliers' rows are nearly all rows) stores a float32 weight again.
The running sum is float32; its round-off, measured with activation channels 100x the others, stays
below 2e-6 of the largest sparse output. The file holds ``rows`` (smallest unsigned type for K),
``values`` (float32) and the column ``pointers`` ``[N + 1]``: 6 bytes an outlier for K <= 65536. Neither
the branch nor its constants look like a weight to ``lowbit.ir.analysis.weight_uses``.

**Layer split** (``split=True``): k-means on the values cuts the (remaining) weight into lower, middle and
upper clusters; the middle one stays in the original MatMul, the other two get MatMuls of their own on
the same input, and the three outputs are added. Each is then quantized with its own ranges. A weight is
split only where RTN under ``scheme`` (each candidate axis, the best of them) lowers the weight's output
error ``trace(dW^T H dW)`` (with calibration; else the Frobenius weight error) by at least
``split_min_gain`` times: the split triples the weight's bytes and MatMul work. The three cluster weights are
tensors computed when read (``ir.LazyTensor`` over the weight and the clusters' value bounds): until
QuantizeWeightsPass replaces them, the split model holds at most what the model held (a weight that
``lowbit.load`` reads from its file when needed is read again), and the quantizing sweep computes one layer's
clusters at a time.

Output heads stay whole unless ``include_lm_head`` (a tied head never: its table is shared with the
embedding); embeddings are never touched. A Gemm keeps its (dense or middle) weight and gets the
branches on its output, which already holds the bias. The details list, per weight, the outliers kept
(nnz, bytes), the split decision (errors, gain, cluster sizes), and every weight left alone with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.ir import analysis
from lowbit.ir.builders import NameAllocator, fresh_name
from lowbit.kernels.model import OUTLIER_TYPES
from lowbit.passes import sequential
from lowbit.passes.axis_selectors import WeightPlan, weight_source
from lowbit.passes.base import LowbitPass
from lowbit.passes.quant import outliers
from lowbit.passes.quant.hessian import HessianAccumulator
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.runtime.calibration import calibration_of, collect

#: CumSum appeared in opset 11.
MIN_OPSET = 11
#: The node metadata copied to new nodes: the module path (``analysis.module_path``); the rest (stack
#: traces, class names) takes about 1 kB a node.
_SCOPE_KEYS = ("pkg.torch.onnx.name_scopes",)
#: ``Value.meta`` key naming which CSC array of a sparse branch an initializer holds (not saved in the file).
OUTLIER_ARRAY_KEY = "lowbit.outlier_array"


class SplitOutliersPass(LowbitPass):
    """Move each weight's outliers to an exact sparse side branch and/or split it into three clusters."""

    def __init__(
        self,
        *,
        outlier_fraction: float = 0.0,
        criterion: str = "magnitude",
        split: bool = False,
        scheme: QuantScheme | None = None,
        candidate_axes: tuple[str, ...] | None = None,
        split_min_gain: float = 2.0,
        include_lm_head: bool = False,
    ):
        super().__init__()
        outliers.outlier_count(1, outlier_fraction)  # validates the fraction
        if criterion not in outliers.CRITERIA:
            raise ValueError(f"criterion must be one of {outliers.CRITERIA}, got {criterion!r}")
        if split and scheme is None:
            raise ValueError("split=True needs the quantization scheme, to measure what the split gains")
        if split_min_gain <= 0:
            raise ValueError(f"split_min_gain must be positive, got {split_min_gain}")
        self.outlier_fraction = outlier_fraction
        self.criterion = criterion
        self.split = split
        self.scheme = scheme
        self.candidate_axes = candidate_axes or ((scheme.group_axis,) if scheme else ())
        self.split_min_gain = split_min_gain
        self.include_lm_head = include_lm_head
        self._records: dict[str, list[dict]] = {}

    @property
    def needs_calibration(self) -> bool:
        return self.outlier_fraction > 0 and self.criterion == "sensitivity"

    def calibration_use(self) -> str:
        return "the sensitivity criterion ranks weights by H_kk * w**2"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.outlier_fraction == 0 and not self.split:
            return ir.passes.PassResult(model, modified=False)
        statistics = calibration_of(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        targets, skipped = self._targets(model.graph)
        self._records = {"outliers": [], "split": [], "skipped": skipped}  # not `skipped`: run_pipeline reads that name
        if targets and self.outlier_fraction > 0 and opset < MIN_OPSET:
            raise ValueError(
                f"dense-and-sparse needs opset {MIN_OPSET} or later (CumSum), the model has "
                f"{opset}; convert it first (onnxscript.version_converter)"
            )
        writer = _BranchWriter(model.graph)
        reads_statistics = statistics is not None and (self.split or self.needs_calibration)
        swept = [
            uses
            for uses in targets
            if reads_statistics and self._sweeps(statistics.by_activation.get(uses[0].node.inputs[0].name))
        ]
        by_layer = self._rewrite_by_layer(model, writer, swept, statistics) if swept else None
        swept_ids = {id(uses[0].weight) for uses in swept}
        for uses in tqdm(targets, desc="split outliers", unit="weight", leave=False):
            if id(uses[0].weight) not in swept_ids:
                accumulator = statistics.for_use(uses[0]) if reads_statistics else None
                self._rewrite(writer, uses, self._weight_kn(uses[0]), *self._statistics_read(accumulator))
        sparse_records, split_records = self._records["outliers"], self._records["split"]
        self.details = {
            "outlier_fraction": self.outlier_fraction,
            "criterion": self.criterion,
            "weights_with_outliers": len(sparse_records),
            "nnz": sum(record["nnz"] for record in sparse_records),
            "sparse_bytes": sum(record["bytes"] for record in sparse_records),
            "weights_split": sum(record["split"] for record in split_records),
            "split_bytes": writer.split_bytes,
            "split_min_gain": self.split_min_gain,
            "nodes_added": writer.nodes_added,
            **({"calibration_by_layer": by_layer} if by_layer else {}),
            **self._records,
        }
        return ir.passes.PassResult(model, modified=writer.nodes_added > 0)

    def ranked_inputs(self, graph: ir.Graph) -> set[str]:
        """The activations whose ``diag(H)`` the sensitivity ranking reads: the inputs of the weights it splits."""
        if not self.needs_calibration or self.split:  # the layer split gets full Hessians, diagonals included
            return set()
        return {uses[0].node.inputs[0].name for uses in self._targets(graph)[0]}

    def _sweeps(self, accumulator: HessianAccumulator | None) -> bool:
        """Whether a weight's Hessian comes from this pass's own layer sweep: the layer split reads the full H,
        and the calibration pass left it to the sweep (only the diagonal, or nothing, was collected)."""
        return self.split and (accumulator is None or accumulator.diagonal_only)

    def _statistics_read(self, accumulator: HessianAccumulator | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(H, diag(H))`` as far as this pass reads them (the split reads H, the sensitivity ranking the diagonal)."""
        if accumulator is None:
            return None, None
        return (
            accumulator.hessian if self.split else None,
            accumulator.diagonal if self.needs_calibration else None,
        )

    def _rewrite_by_layer(
        self, model: ir.Model, writer: _BranchWriter, targets: list[list[analysis.WeightUse]], statistics
    ) -> dict:
        """Split the decoder layers' weights one layer at a time on the float model's Hessians
        (``sequential.LayerSweep``, float stream: those of the whole model, one layer's alive at a time); weights
        outside the layers, or all of them where the layers' inputs would outgrow the limit, on Hessians of the
        whole model collected for them here. Returns what the report says of it."""
        if statistics.feeds is None:
            raise ValueError("the layer split reads every weight's full H: pass calibration feeds, or full statistics")
        plans = [WeightPlan(uses, weight_source(uses[0], self._weight_kn), None) for uses in targets]
        layers, rest = sequential.group_layers(plans)
        if layers:
            sequential.infer_missing_types(model)  # the sweep cuts the layers out as subgraphs
        rewritten = 0

        def split_layer(layer: sequential.Layer, step: sequential.LayerStep) -> dict[str, np.ndarray]:
            nonlocal rewritten
            for index in layer.indices:
                plan = plans[index]
                self._rewrite(writer, plan.uses, plan.weight, plan.hessian, np.diagonal(plan.hessian))
                plan.release_arrays()  # one layer's Hessians alive at a time, the replaced weight freed
                rewritten += 1
            return {}

        details = {"layers": len(layers), "refused": None}
        try:
            if layers:
                sequential.LayerSweep(model, plans, layers, statistics.feeds, stream="float").run(split_layer)
        except sequential.StreamTooLarge as error:
            if rewritten:  # a later layer's inputs grew: too late to go back
                raise
            details["refused"] = f"{error} (calibrated whole instead)"
            rest = list(range(len(plans)))
        if rest:
            inputs = {plans[index].first.node.inputs[0].name for index in rest}
            whole = collect(model, statistics.feeds, only=inputs, keep_samples=0)
            for index in rest:
                plan = plans[index]
                self._rewrite(writer, plan.uses, plan.weight, *self._statistics_read(whole.for_use(plan.first)))
        return details

    def _targets(self, graph: ir.Graph) -> tuple[list[list[analysis.WeightUse]], list[dict]]:
        """The uses of every weight to rewrite, grouped by weight, and a record of each weight left alone."""
        groups: dict[int, list[analysis.WeightUse]] = {}
        for use in analysis.weight_uses(graph):
            if use.kind != "embedding":
                groups.setdefault(id(use.weight), []).append(use)
        targets, skipped = [], []
        for uses in groups.values():
            reason = self._skip_reason(uses)
            if reason is None:
                targets.append(uses)
            else:
                first = uses[0]
                skipped.append({"name": first.weight.name or "", "layer": first.layer, "reason": reason})
        return targets, skipped

    def _skip_reason(self, uses: list[analysis.WeightUse]) -> str | None:
        first = uses[0]
        if not first.weight.is_initializer() or first.weight.const_value is None:
            return "tied output head (its table is shared with the embedding)"
        if any(use.kind == "lm_head" for use in uses) and not self.include_lm_head:
            return "output head left in float (include_lm_head=True splits it)"
        if len({analysis.weight_layout(use.node) for use in uses}) > 1:
            return "shared by nodes that read it in different layouts"
        if any(use.node.op_type == "Gemm" and use.node.attributes.get_int("transA", 0) for use in uses):
            return "Gemm with transA=1"
        if len(first.weight.uses()) != len(uses) or first.weight.is_graph_output():
            return "the weight has readers other than weight MatMuls"
        if self.outlier_fraction > 0 and first.weight.dtype != ir.DataType.FLOAT:
            # the sparse branch keeps float32 outliers and sums them in float32; quantized as a whole instead
            return f"dense-and-sparse needs a float32 weight, this one is {first.weight.dtype.name}"
        return None

    @staticmethod
    def _weight_kn(first: analysis.WeightUse) -> np.ndarray:
        """The weight as ``[K, N]`` float32."""
        return _as_kn(first.node, analysis.weight_value_array(first))

    def _rewrite(
        self,
        writer: _BranchWriter,
        uses: list[analysis.WeightUse],
        weight: np.ndarray,
        hessian: np.ndarray | None,
        diagonal: np.ndarray | None,
    ) -> None:
        """Split one weight (``weight``: its ``[K, N]`` float32 value, ``_weight_kn``): its outliers ranked on
        ``diagonal`` (``diag(H)``, sensitivity criterion), its clusters judged on ``hessian`` (the layer split)."""
        first = uses[0]
        name, layer = first.weight.name or "", first.layer
        if not np.isfinite(weight).all():
            raise ValueError(f"weight {name!r} of {layer!r} contains NaN or Inf; fix the model before quantizing")
        if self.outlier_fraction > 0 and first.weight.dtype != ir.DataType.FLOAT:
            raise NotImplementedError(
                f"dense-and-sparse keeps float32 outliers and sums them in float32; weight {name!r} of {layer!r} "
                f"is {first.weight.dtype.name}"
            )
        remaining, sparse = weight, None
        if self.outlier_fraction > 0:
            scores = outliers.outlier_scores(weight, self.criterion, diagonal if self.needs_calibration else None)
            remaining, sparse = outliers.split_dense_sparse(weight, scores, self.outlier_fraction)
        bounds = self._split(name, layer, remaining, hessian) if self.split else None
        if (sparse is None or sparse.nnz == 0) and bounds is None:
            return
        nodes = [use.node for use in uses]
        if sparse is not None and sparse.nnz:
            nbytes = writer.add_sparse(nodes, name, sparse)
            record = {"name": name, "layer": layer, "shape": list(weight.shape), "nnz": sparse.nnz, "bytes": nbytes}
            self._records["outliers"].append(record)
        remainder = _remainder(first, remaining, sparse)
        if bounds is None:
            writer.keep_in_weight(uses, remainder)
        else:
            clusters = _Clusters.of(first, remainder, remaining.shape, bounds)
            writer.add_split(nodes, name, clusters)
            writer.keep_cluster_in_weight(uses, clusters)

    def _split(self, name: str, layer: str, weight: np.ndarray, hessian: np.ndarray | None) -> np.ndarray | None:
        """The clusters' value bounds (``outliers.cluster_bounds``) when splitting gains ``split_min_gain``, else
        None; recorded either way."""
        bounds = outliers.cluster_bounds(weight, _CLUSTERS)
        parts = outliers.cluster_parts(weight, bounds)
        schemes = [dataclasses.replace(self.scheme, group_axis=axis, method="rtn") for axis in self.candidate_axes]
        base_error, split_error = (
            min(outliers.quantization_error(weight, candidate, scheme, hessian) for scheme in schemes)
            for candidate in ([weight], parts)
        )
        gain = base_error / split_error if split_error > 0 else float("inf")
        chosen = gain >= self.split_min_gain
        self._records["split"].append(
            {
                "name": name,
                "layer": layer,
                "base_error": base_error,
                "split_error": split_error,
                "gain": gain,
                "split": bool(chosen),
                "cluster_sizes": [int(np.count_nonzero(part)) for part in parts],
            }
        )
        return bounds if chosen else None


def _as_kn(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The value of ``node``'s weight operand as ``[K, N]`` float32 (a Gemm's layout and alpha applied)."""
    weight = np.asarray(weight, dtype=np.float32)
    return analysis.gemm_weight_kn(node, weight) if node.op_type == "Gemm" else weight


def _remainder(
    first: analysis.WeightUse, remaining: np.ndarray, sparse: outliers.SparseOutliers | None
) -> Callable[[], np.ndarray]:
    """What gives a weight's ``[K, N]`` float32 remainder (``remaining``: outliers zeroed) once the pass is done:
    ``remaining`` itself, or, for a weight that ``lowbit.load`` reads from its file when needed, the weight read
    again with its outliers zeroed (the same array), so that the model holds no weight the sweep has not reached."""
    source = first.weight.const_value
    if not isinstance(source, ir.LazyTensor):
        return lambda: remaining

    def read() -> np.ndarray:
        weight = _as_kn(first.node, source.numpy())
        if sparse is None or not sparse.nnz:
            return weight
        weight = weight.copy()
        weight[sparse.rows, sparse.cols] = 0.0
        return weight

    return read


#: Clusters of a layer split: lower, middle (kept in the original MatMul), upper.
_CLUSTERS = 3


@dataclasses.dataclass(frozen=True)
class _Clusters:
    """A split weight's clusters as tensors computed when read (``ir.LazyTensor``): until QuantizeWeightsPass
    replaces them, the model holds the clusters' bounds and what gives the weight, not three float arrays of its
    size: the weight's arrays, or, for a weight read from its file when needed (``lowbit.load``) and split without
    outliers, nothing (read again for each layer's clusters)."""

    remainder: Callable[[], np.ndarray]  # [K, N] float32, outliers zeroed: what the MatMul computes (a Gemm's alpha in)
    stored: Callable[[], np.ndarray]  # the weight as its initializer holds it: its type, a Gemm's layout and values
    bounds: np.ndarray  # outliers.cluster_bounds of the remainder
    shape: tuple[int, ...]  # [K, N]
    stored_shape: tuple[int, ...]
    dtype: np.dtype  # the initializer's
    transposed: bool  # ``stored`` is [N, K] (a Gemm's B with transB)
    #: Each cluster's array while anything holds it: the readers of one layer (the sweep's session, the plan, the
    #: axis selector's sessions) share one copy.
    _alive: weakref.WeakValueDictionary = dataclasses.field(default_factory=weakref.WeakValueDictionary)

    @staticmethod
    def of(
        first: analysis.WeightUse, remainder: Callable[[], np.ndarray], shape: tuple[int, ...], bounds: np.ndarray
    ) -> _Clusters:
        """The clusters of ``first``'s weight (``remainder``: ``_remainder``, of ``shape``), made before the
        initializer is replaced by the kept cluster, which reads this."""
        source = first.weight.const_value
        stored_array = None if isinstance(source, ir.LazyTensor) else source.numpy()

        def stored() -> np.ndarray:
            return source.numpy() if stored_array is None else stored_array

        dtype, transposed = source.dtype.numpy(), analysis.stores_weight_transposed(first.node)
        return _Clusters(remainder, stored, bounds, tuple(shape), tuple(source.shape), dtype, transposed)

    def part(self, cluster: int, name: str) -> ir.LazyTensor:
        """Cluster ``cluster`` (0 = lowest) for a MatMul of its own: ``[K, N]`` in the weight's type (its values,
        exact in it)."""

        def compute() -> np.ndarray:
            return outliers.cluster_part(self.remainder(), self.bounds, cluster).astype(self.dtype)

        return self._lazy(cluster, compute, self.shape, name)

    def kept(self, name: str) -> ir.LazyTensor:
        """The middle cluster in the initializer's own layout and values: the weight zeroed elsewhere."""

        def compute() -> np.ndarray:
            weight = self.remainder()
            mask = (outliers.cluster_labels(weight, self.bounds) == _CLUSTERS // 2) & (weight != 0)
            return np.where(mask.T if self.transposed else mask, self.stored(), np.zeros((), self.dtype))

        return self._lazy(_CLUSTERS // 2, compute, self.stored_shape, name)

    def _lazy(self, cluster: int, compute: Callable[[], np.ndarray], shape, name: str) -> ir.LazyTensor:
        def evaluate() -> ir.Tensor:
            array = self._alive.get(cluster)
            if array is None:
                array = self._alive[cluster] = compute()
            return ir.tensor(array, name=name)

        return ir.LazyTensor(evaluate, dtype=ir.DataType.from_numpy(self.dtype), shape=ir.Shape(shape), name=name)


class _BranchWriter:
    """Graph edits of the pass: unique names, shared transposed activations, output rewiring."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.name = NameAllocator(graph).fresh  # a value name not yet in the graph
        self.node_names = {node.name for node in graph}
        self.transposed: dict[int, ir.Value] = {}
        self.nodes_added = 0
        self.split_bytes = 0  # float bytes of the cluster weights added by layer splits

    def constant(self, base: str, array: np.ndarray | Callable[[str], ir.TensorProtocol]) -> ir.Value:
        """A new initializer named after ``base``: ``array``, or the tensor ``array(name)`` makes."""
        name = self.name(base)
        tensor = array(name) if callable(array) else ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def node(self, op: str, inputs: list[ir.Value], like: ir.Node, label: str, **attributes) -> ir.Node:
        """A node named after ``like`` and carrying its module path, so it stays in its module."""
        scopes = {key: like.metadata_props[key] for key in _SCOPE_KEYS if key in like.metadata_props}
        # unique: the pass may run twice, and ONNX Runtime refuses repeated node names
        name = fresh_name(f"{like.name}.{label}", self.node_names)
        node = ir.node(op, inputs, attributes=attributes, name=name, metadata_props=scopes)
        node.outputs[0].name = self.name(f"{like.outputs[0].name}.{label}")
        self.nodes_added += 1
        return node

    def keep_in_weight(self, uses: list[analysis.WeightUse], remainder: Callable[[], np.ndarray]) -> None:
        """Zero the weight outside ``remainder()`` (``[K, N]``: the dense remainder). A Gemm's B keeps its own layout
        and values (alpha stays in the Gemm; QuantizeWeightsPass folds it later). A weight read from its file when
        needed is zeroed when read, again each time."""
        weight, transposed = uses[0].weight, analysis.stores_weight_transposed(uses[0].node)
        source, name = weight.const_value, weight.name

        def kept() -> ir.Tensor:
            mask = remainder() != 0
            original = source.numpy()
            return ir.tensor(
                np.where(mask.T if transposed else mask, original, np.zeros((), original.dtype)), name=name
            )

        if isinstance(source, ir.LazyTensor):
            weight.const_value = ir.LazyTensor(kept, source.dtype, source.shape, name=name)
        else:
            weight.const_value = kept()

    def keep_cluster_in_weight(self, uses: list[analysis.WeightUse], clusters: _Clusters) -> None:
        """Let the weight hold the middle cluster (a Gemm's B in its own layout and values)."""
        weight = uses[0].weight
        weight.const_value = clusters.kept(weight.name)

    def _extend_output(self, matmul: ir.Node, build) -> None:
        """Insert ``build(y) -> (nodes, new_y)`` after ``matmul`` and let every reader of ``y`` read ``new_y``
        (which takes ``y``'s name, so calibration statistics and graph outputs keep their names)."""
        output = matmul.outputs[0]
        readers = list(output.uses())
        nodes, result = build(output)
        self.graph.insert_after(matmul, nodes)
        for reader, index in readers:
            reader.replace_input_with(index, result)
        for position, graph_output in enumerate(self.graph.outputs):
            if graph_output is output:
                self.graph.outputs[position] = result
        result.type, result.shape = output.type, output.shape
        name, result.name = output.name, None
        output.name = self.name(f"{name}.partial")
        result.name = name

    def add_split(self, nodes: list[ir.Node], name: str, clusters: _Clusters) -> None:
        """MatMuls on the lower and upper clusters, added to each MatMul's (middle-cluster) output."""
        labels = ("low", "high")
        extra = [
            self.constant(f"{name}.split_{label}", functools.partial(clusters.part, cluster))
            for label, cluster in zip(labels, (0, _CLUSTERS - 1))
        ]
        self.split_bytes += sum(value.const_value.nbytes for value in extra)

        def build(output: ir.Value, matmul: ir.Node):
            products = [
                self.node("MatMul", [matmul.inputs[0], weight], matmul, f"split_{label}")
                for label, weight in zip(labels, extra)
            ]
            first = self.node("Add", [output, products[0].outputs[0]], matmul, "split_add_low")
            second = self.node("Add", [first.outputs[0], products[1].outputs[0]], matmul, "split_add_high")
            return [*products, first, second], second.outputs[0]

        for matmul in nodes:
            self._extend_output(matmul, lambda output, matmul=matmul: build(output, matmul))

    def add_sparse(self, nodes: list[ir.Node], name: str, sparse: outliers.SparseOutliers) -> int:
        """The exact sparse side branch after each MatMul; returns the bytes its constants take in the file.

        Stored: the CSC form (``rows``, ``values`` with one trailing zero entry, column ``pointers``) in
        the smallest unsigned types; the index decoding (Cast, Slice) is constant-folded by ONNX Runtime.
        """
        k, n = sparse.shape
        rows = self.constant(f"{name}.outlier_rows", np.append(sparse.rows, 0).astype(_index_type(k)))
        values = self.constant(f"{name}.outlier_values", np.append(sparse.values, np.float32(0))[:, None])
        pointer_array = sparse.column_pointers().astype(_index_type(sparse.nnz + 1))
        pointers = self.constant(f"{name}.outlier_pointers", pointer_array)
        for array, value in (("rows", rows), ("values", values), ("pointers", pointers)):
            value.meta[OUTLIER_ARRAY_KEY] = array
        like = nodes[0]
        rows_cast = self.node("Cast", [rows], like, "outliers.rows", to=ir.DataType.INT64)
        pointers_cast = self.node("Cast", [pointers], like, "outliers.pointers", to=ir.DataType.INT64)
        bounds = []
        for label, start, stop in (("starts", 0, n), ("ends", 1, n + 1)):
            limits = [self.int64(f"{name}.outlier_slice", [v]) for v in (start, stop, 0)]
            bounds.append(self.node("Slice", [pointers_cast.outputs[0], *limits], like, f"outliers.{label}"))
        # Right before the first reader, not at the top: the nodes carry the reader's module path, and the
        # sequential calibration mode needs each decoder layer's nodes in one span of graph order.
        readers = set(nodes)
        self.graph.insert_before(
            next(node for node in self.graph if node in readers), [rows_cast, pointers_cast, *bounds]
        )
        starts, ends = (bound.outputs[0] for bound in bounds)
        axis = self.int64(f"{name}.outlier_axis", 0)

        def build(output: ir.Value, matmul: ir.Node):
            activations = self._transposed_input(matmul, k)
            gather = self.node("Gather", [activations, rows_cast.outputs[0]], matmul, "outliers.gather", axis=0)
            products = self.node("Mul", [gather.outputs[0], values], matmul, "outliers.mul")
            running = self.node("CumSum", [products.outputs[0], axis], matmul, "outliers.cumsum", exclusive=1)
            upper = self.node("Gather", [running.outputs[0], ends], matmul, "outliers.upper", axis=0)
            lower = self.node("Gather", [running.outputs[0], starts], matmul, "outliers.lower", axis=0)
            sums = self.node("Sub", [upper.outputs[0], lower.outputs[0]], matmul, "outliers.sums")
            transposed = self.node("Transpose", [sums.outputs[0]], matmul, "outliers.transpose", perm=[1, 0])
            shape = self.node("Shape", [output], matmul, "outliers.shape")
            shaped = self.node("Reshape", [transposed.outputs[0], shape.outputs[0]], matmul, "outliers.reshape")
            total = self.node("Add", [output, shaped.outputs[0]], matmul, "outliers.add")
            return [gather, products, running, upper, lower, sums, transposed, shape, shaped, total], total.outputs[0]

        for matmul in nodes:
            self._extend_output(matmul, lambda output, matmul=matmul: build(output, matmul))
        return sum(value.const_value.nbytes for value in (rows, values, pointers))

    def int64(self, base: str, value) -> ir.Value:
        return self.constant(base, np.array(value, np.int64))

    def _transposed_input(self, matmul: ir.Node, k: int) -> ir.Value:
        """``Transpose(Reshape(x, [-1, K]))`` of the MatMul's input: once per activation, after its producer."""
        activation = matmul.inputs[0]
        if id(activation) not in self.transposed:
            flat_x = self.int64(f"{activation.name}.outlier_shape", [-1, k])
            flat = self.node("Reshape", [activation, flat_x], matmul, "outliers.flatten_input")
            transposed = self.node("Transpose", [flat.outputs[0]], matmul, "outliers.transpose_input", perm=[1, 0])
            producer = activation.producer()
            if producer is not None:
                self.graph.insert_after(producer, [flat, transposed])
            else:
                self.graph.insert_before(next(iter(self.graph)), [flat, transposed])
            self.transposed[id(activation)] = transposed.outputs[0]
        return self.transposed[id(activation)]


def fused_outlier_bytes(value: ir.Value) -> int | None:
    """Bytes that lowbit::QuantMatMul stores for a sparse branch's initializer ``value`` (its CSC arrays at the
    op's types, ``OUTLIER_TYPES``, without the branch's trailing zero entry), None for any other value."""
    array = value.meta.get(OUTLIER_ARRAY_KEY)
    if array is None or value.const_value is None:
        return None
    entries = value.const_value.size - (array != "pointers")
    return entries * np.dtype(OUTLIER_TYPES[array]).itemsize


def _index_type(length: int) -> type:
    """The smallest unsigned type that indexes ``length`` channels."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if length - 1 <= np.iinfo(dtype).max:
            return dtype
    return np.int64
