"""Calibration: run the float model in ONNX Runtime and stream statistics of every weight's input.

The activation input of every weight MatMul/Gemm becomes a graph output of a *copy* of the model, whose own
outputs, and the nodes that only they need (an LM's head), are dropped; each calibration batch is run once and
folded into a ``HessianAccumulator`` (``H = X^T X``, a float64 sum of float32 sums of the products, each over
``FLOAT32_ROWS`` rows of the stream; per-channel abs-max and mean |x|; token count). Memory is O(sum of K^2)
whatever the number of batches. Statistics are keyed by the activation's value name, so weights that read the
same input (q/k/v, gate/up) share one H.

For the sequential mode (``lowbit.passes.sequential``) ``collect`` can keep every feed dict (token ids:
small) and collect only the activations that the sweep does not measure itself.

The passes find the statistics of a model with ``calibration_of(model)`` (CaptureCalibrationPass stores
them with ``set_calibration``): kept in ``model.meta``, in memory, never serialized.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Set
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from lowbit.ir import analysis
from lowbit.passes.quant.hessian import HessianAccumulator
from lowbit.runtime.session import (
    WeightFedSession,
    external_data_dirs,
    proto_sharing_initializers,
    session_feeding_weights,
    session_from_proto,
    session_options,
)
from lowbit.runtime.threads import NO_SPINNING, one_blas_thread


@dataclasses.dataclass
class CalibrationStats:
    """Per-activation statistics; ``for_use`` finds the ones a weight's node reads."""

    by_activation: dict[str, HessianAccumulator]
    batches: int = 0
    #: The first few feed dicts, kept for selectors that re-run subgraphs (small: token ids).
    samples: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    #: Every feed dict, kept only on request (``keep_feeds``): the sequential mode runs them again.
    feeds: list[dict[str, np.ndarray]] | None = None
    #: Seconds ``collect`` spent running the model (``"onnxruntime"``) and waiting for its outputs to be folded
    #: (``"statistics"``: the folding not done while the model ran the next batch).
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {"onnxruntime": 0.0, "statistics": 0.0})

    def for_use(self, use: analysis.WeightUse) -> HessianAccumulator:
        name = use.node.inputs[0].name
        if name not in self.by_activation:
            raise KeyError(
                f"no calibration statistics for the input {name!r} of {use.layer!r}; "
                "collect them on the same graph (after FoldWeightsPass) that is being quantized"
            )
        return self.by_activation[name]


_CALIBRATION_KEY = "lowbit.calibration"


def calibration_of(model: ir.Model) -> CalibrationStats | None:
    """The calibration statistics kept with ``model`` (``set_calibration``), or None."""
    return model.meta.get(_CALIBRATION_KEY)


def set_calibration(model: ir.Model, stats: CalibrationStats) -> None:
    """Keep ``stats`` with ``model`` for the passes that run after (in memory, never serialized)."""
    model.meta[_CALIBRATION_KEY] = stats


def weight_activations(model: ir.Model) -> dict[str, int]:
    """Activation value name -> input channels K, for every weight MatMul/Gemm (not embeddings)."""
    activations: dict[str, int] = {}
    for use in analysis.weight_uses(model.graph):
        if use.kind == "embedding":
            continue
        activations[use.node.inputs[0].name] = analysis.weight_shape_kn(use)[0]
    return activations


def _session_with_outputs(
    model: ir.Model, names: list[str], providers: list[str] | None, *, feed_weights: bool = False
) -> ort.InferenceSession | WeightFedSession:
    """A session whose outputs are ``names`` only: the model's own outputs are dropped and so is every node
    that none of ``names`` depends on (an LM's head, the last layers past the last weight asked for), which
    ONNX Runtime would otherwise run for nothing. Its threads sleep between runs (``threads.NO_SPINNING``),
    leaving the cores to the statistics. ``feed_weights``: the weights are inputs fed the model's arrays
    (``session_feeding_weights``: no copy of them in the session, none prepacked, so the activations may differ in
    the last bits from those of a session that holds them, as the layer sweep's sessions do)."""
    proto, memory = proto_sharing_initializers(model)
    existing = {output.name: output for output in proto.graph.output}
    outputs = [existing[name] if name in existing else onnx.ValueInfoProto(name=name) for name in names]
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)
    keep_nodes_needed_for(proto.graph, names)
    options = session_options()
    options.add_session_config_entry(*NO_SPINNING)
    if feed_weights:
        return session_feeding_weights(proto, external_data_dirs(model), options, providers, memory_files=memory)
    return session_from_proto(proto, external_data_dirs(model), options, providers, consume=True, memory_files=memory)


def keep_nodes_needed_for(graph: onnx.GraphProto, names: list[str]) -> None:
    """Remove (in place) the nodes of ``graph`` that no value of ``names`` depends on, and the initializers
    only they read. Names a node's subgraphs read from the outer scope count as its inputs."""
    needed = set(names)
    kept = 0
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            kept += 1
            needed.update(name for name in node.input if name)
            needed.update(_outer_names(node))
    if kept == len(graph.node):
        return
    # Deleted in place: extending a repeated field copies its messages, and the initializers hold the weights.
    for index in reversed(range(len(graph.node))):
        if not any(output in needed for output in graph.node[index].output):
            del graph.node[index]
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in needed:
            del graph.initializer[index]


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Every value name read inside ``node``'s subgraphs (a superset of what they read from outside)."""
    found: set[str] = set()
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in subgraph.node:
                found.update(name for name in inner.input if name)
                found.update(_outer_names(inner))
    return found


def collect(
    model: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    providers: list[str] | None = None,
    total: int | None = None,
    keep_samples: int = 4,
    keep_feeds: bool = False,
    only: Set[str] | None = None,
    diagonals: Set[str] = frozenset(),
) -> CalibrationStats:
    """Run ``model`` on every feed dict of ``batches`` and accumulate the weight-input statistics;
    the first ``keep_samples`` feed dicts are kept in ``samples``, all of them in ``feeds`` with
    ``keep_feeds``. ``only``: the activations to collect (default: all; none: the model is not run); ``diagonals``:
    more activations of which only ``diag(H)`` is collected (``HessianAccumulator(diagonal_only=True)``). The
    statistics of each batch are computed on a thread with BLAS on one thread (``threads.one_blas_thread``: same
    results) while the session, whose threads sleep between runs, runs the next batch. A session that collects
    diagonals only is fed the model's weights instead of holding a copy of them; one that collects a full H holds
    them, as the layer sweep's sessions do, whose H must be the same to the last bit."""
    activations = weight_activations(model)
    if not activations:
        raise ValueError("the model has no weight MatMul/Gemm to calibrate")
    full = set(activations) if only is None else set(activations) & set(only)
    diagonal = (set(activations) & set(diagonals)) - full
    names = sorted(full | diagonal)
    sess = _session_with_outputs(model, names, providers, feed_weights=not full) if names else None
    stats = CalibrationStats(
        {name: HessianAccumulator(activations[name], diagonal_only=name in diagonal) for name in names},
        feeds=[] if keep_feeds else None,
    )
    with RunBehind() as folder:
        for feeds in tqdm(batches, desc="calibration", unit="batch", total=total):
            if sess is not None:
                start = time.perf_counter()
                values = sess.run(names, dict(feeds))
                stats.seconds["onnxruntime"] += time.perf_counter() - start
                folder.submit(_fold, stats, names, values)
                del values
            kept = {name: np.asarray(value) for name, value in feeds.items()}
            if len(stats.samples) < keep_samples:
                stats.samples.append(kept)
            if keep_feeds:
                stats.feeds.append(kept)
            stats.batches += 1
    stats.seconds["statistics"] += folder.waited
    if stats.batches == 0:
        raise ValueError("calibration got no batches")
    return stats


class RunBehind:
    """Runs work on one thread while the caller goes on with the next step (NumPy, BLAS and ONNX Runtime release
    the GIL): each run's outputs folded into statistics while the next batch runs (``collect``), a decoder layer
    quantized while the next one is calibrated (``sequential.LayerSweep``). One piece of work at a time, in
    submission order, with BLAS on one thread (``threads.one_blas_thread``), so the results are the same bits as
    done in the loop. ``waited``: seconds the caller spent waiting for it, i.e. the time its steps did not hide."""

    def __init__(self):
        self.waited = 0.0
        self._pending: Future | None = None
        self._blas = one_blas_thread()
        self._pool = ThreadPoolExecutor(1)

    def __enter__(self) -> RunBehind:
        self._blas.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)
            self._blas.__exit__(*exc)

    def submit(self, work, *args) -> None:
        """Run ``work(*args)`` once the previous work is done (waiting for it here, its exception raised here)."""
        self.wait()
        self._pending = self._pool.submit(work, *args)

    def wait(self) -> None:
        """Wait for the work submitted last (raising its exception)."""
        if self._pending is not None:
            start = time.perf_counter()
            self._pending.result()
            self.waited += time.perf_counter() - start
            self._pending = None


def _fold(stats: CalibrationStats, names: list[str], values: list[np.ndarray]) -> None:
    """Fold one run's outputs (the activations ``names``) into their accumulators."""
    for name, value in zip(names, values):
        stats.by_activation[name].update(value)
