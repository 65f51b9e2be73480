"""End-to-end sensitivity of the model's output to each weight's quantization, for size budgets.

``trace(dW^T H dW)`` says how much one matrix's output moves, not how much that matters at the model's
output. ``OutputSensitivity`` measures the latter: one ONNX Runtime session of the float model in which
the weights are graph inputs fed the model's own arrays (``runtime.session.session_feeding_weights``: the
session keeps no copy of them), the model cut to its first graph output. For each weight and each candidate,
the weight alone is fed as its dequantized candidate and the output is compared with the float model's
(computed once):

* ``kl``: the model has an output head (an LM: ``analysis.weight_uses`` finds an ``lm_head``), so its first
  output is logits. The error is the KL divergence ``KL(p_float || p_candidate)`` of the softmax over the last
  axis, averaged over every position of every sample (nats per token).
* ``relative_mse``: otherwise (an encoder's embeddings, any other output, which is not a distribution):
  ``sum((y - y_float)^2) / sum(y_float^2)`` over all samples.

A candidate equal to the float weight gives exactly 0. Costs one forward run per (weight, candidate,
sample): keep the samples few. Weights that a feed cannot replace (not an initializer read directly by
MatMuls: a Gemm's ``transB`` weight, a tied head read through a Transpose, a weight in another float type)
are not measured; ``choose_within_budget`` keeps them at the recipe's width.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import onnx
import onnx.utils
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.ir import analysis
from lowbit.passes import sequential
from lowbit.passes.axis_selectors import WeightPlan
from lowbit.passes.quant.rtn import QuantizedWeight
from lowbit.runtime.calibration import keep_nodes_needed_for
from lowbit.runtime.memory import release_free_memory
from lowbit.runtime.session import (
    WeightFedSession,
    external_data_dirs,
    external_location,
    proto_sharing_initializers,
    proto_tensors,
    session_feeding_weights,
    session_options,
)
from lowbit.runtime.spill import SpilledSamples

#: ``Recipe.budget_sensitivity``: ``output`` = the weight's own output error ``trace(dW^T H dW)``; ``kl`` = the
#: model's output measured end to end (KL of the logits for an LM, relative squared error otherwise).
MEASURES = ("output", "kl")

_OVERRIDABLE_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}


def overridable(plan: WeightPlan) -> bool:
    """Whether a feed can replace ``plan``'s weight: an initializer of a float type that MatMuls read directly
    (so the candidate's ``[K, N]`` reconstruction is the tensor itself)."""
    value = plan.first.weight
    tensor = value.const_value
    return (
        value.is_initializer()
        and not value.is_graph_input()
        and tensor is not None
        and tensor.dtype in _OVERRIDABLE_TYPES
        and tuple(tensor.shape) == plan.shape
        and all(use.node.op_type == "MatMul" and use.weight is value for use in plan.uses)
    )


def output_measure(model: ir.Model) -> str:
    """``kl`` where the model has an output head (its first output is logits), else ``relative_mse``."""
    return "kl" if any(use.kind == "lm_head" for use in analysis.weight_uses(model.graph)) else "relative_mse"


def _starts_and_cuts(
    graph: ir.Graph, plans: Sequence[WeightPlan], proto: onnx.ModelProto
) -> tuple[list[int | None], list[list[str]], str | None]:
    """Per plan, the index of the cut before its decoder layer (None: outside the layers), those cuts (the values
    ``proto``, pruned to the measured output, computes), and why every run takes the whole model (None: it does not):
    no weight in a decoder layer, or a graph that cannot be cut between its layers."""
    layers, _ = sequential.group_layers(plans)
    starts: list[int | None] = [None] * len(plans)
    if not layers:
        return starts, [], "no measured weight lies in a decoder layer"
    try:
        cuts = sequential.layer_cuts(graph, [plan.uses for plan in plans], layers)
    except ValueError as error:  # a weight outside its layer's span
        return starts, [], str(error)
    for number, layer in enumerate(layers):
        for index in layer.indices:
            starts[index] = number
    produced = {name for node in proto.graph.node for name in node.output}
    return starts, [[name for name in cut if name in produced] for cut in cuts[:-1]], None


#: Positions per block of the KL's float64 arithmetic: its working memory is a block's, not the logits' size.
KL_BLOCK_POSITIONS = 16


class _Distribution:
    """What the KL of one sample's logits against its float logits needs of the float ones, computed once:
    ``p`` = softmax (float32), ``p . z`` and ``logsumexp(z)`` per position (``z``: the logits less their maximum),
    the sum of ``p``. ``KL(p || softmax(y)) = p . z - p . y' + (logsumexp(y') - logsumexp(z)) sum(p)`` (``y'``:
    ``y`` less its maximum), so each candidate costs one exponential per logit, not the two of a log-softmax and
    of ``p``. The identity holds for the ``p`` it is computed with, so ``p`` is kept in float32 (half the memory;
    the KL is then weighted by the rounded probabilities) and the rest is float64, a block of positions at a time;
    a candidate whose logits are the float ones gives exactly 0. ``p`` (positions x vocabulary: as large as the
    logits) waits in a temporary file (``runtime.spill``), read back a block at a time: a budget's whole first
    sweep keeps it, and in memory it would take as much as a layer's work."""

    def __init__(self, logits: np.ndarray):
        rows = logits.reshape(-1, logits.shape[-1])
        blocks = _blocks(len(rows))
        self._p = SpilledSamples(len(blocks), what="the budget sensitivity's float probabilities")
        weakref.finalize(self, self._p.close)
        self.p_dot = np.empty(len(rows))
        self.log_sum = np.empty(len(rows))
        self.p_sum = np.empty(len(rows))
        for index, block in enumerate(blocks):
            z = _shifted(rows[block])
            self.log_sum[block] = np.log(np.exp(z).sum(axis=-1))
            p = np.exp(z - self.log_sum[block, None]).astype(np.float32)
            self.p_dot[block] = np.einsum("kv,kv->k", p, z)
            self.p_sum[block] = p.sum(axis=-1, dtype=np.float64)
            self._p[index] = {"p": p}

    def kl(self, logits: np.ndarray) -> float:
        """``KL(p || softmax(logits))`` averaged over positions (nats per token)."""
        rows = logits.reshape(-1, logits.shape[-1])
        total = 0.0
        for index, block in enumerate(_blocks(len(rows))):
            z = _shifted(rows[block])
            p_dot = np.einsum("kv,kv->k", self._p[index]["p"], z)
            log_sum = np.log(np.exp(z, out=z).sum(axis=-1))
            total += float(((self.p_dot[block] - p_dot) + (log_sum - self.log_sum[block]) * self.p_sum[block]).sum())
        return total / len(rows)


def _blocks(count: int) -> list[slice]:
    """``range(count)`` in slices of ``KL_BLOCK_POSITIONS``."""
    return [slice(start, start + KL_BLOCK_POSITIONS) for start in range(0, count, KL_BLOCK_POSITIONS)]


def _shifted(logits: np.ndarray) -> np.ndarray:
    """The logits in float64 less their maximum over the last axis (a new array)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z


class OutputSensitivity:
    """Sessions of the float ``model`` with the weights of ``plans`` overridable, and its first output's float
    values on ``samples`` (feed dicts) as the session in use computes them, the reference. ``measured``: the positions in ``plans`` of the
    weights it measures (``overridable`` ones that the first output depends on); ``error`` and ``table`` count
    positions in that list. Make it before any weight of ``model`` changes and drop it after (the sessions read
    the model's arrays).

    A weight in a decoder layer changes nothing before that layer, so its runs start there: the values that cross
    into the layer (``sequential.layer_cuts``) are computed once per sample and wait in a temporary file
    (``runtime.spill``) until their layer comes, and a session of the rest of the model (one at a time, made when
    a weight of its layer is first measured) takes them as inputs; the weights before its cut are let go of then
    (``MemoryFiles.release``: those of a loaded model are read again only for a whole-model session). Weights
    outside the decoder layers, and every weight of a graph that cannot be cut between its layers, run the whole
    model, in a session made when they are measured (none is kept beside the rest-of-model sessions)."""

    def __init__(self, model: ir.Model, plans: Sequence[WeightPlan], samples: Sequence[dict[str, np.ndarray]]):
        if not samples:
            raise ValueError("an end-to-end sensitivity needs calibration samples")
        if not model.graph.outputs:
            raise ValueError("the model has no graph output to measure")
        self.measure = output_measure(model)
        self.output = model.graph.outputs[0].name
        self._data_dirs = external_data_dirs(model)
        proto, self._memory_files = proto_sharing_initializers(model)
        del proto.graph.output[1:]
        keep_nodes_needed_for(proto.graph, [self.output])
        initializers = {tensor.name for tensor in proto.graph.initializer}
        self.measured = [
            i for i, plan in enumerate(plans) if overridable(plan) and plan.first.weight.name in initializers
        ]
        self.names = [plans[i].first.weight.name for i in self.measured]
        self.dtypes = [_OVERRIDABLE_TYPES[plans[i].first.weight.const_value.dtype] for i in self.measured]
        #: Per measured position, the index of the decoder layer its runs start from (None: the whole model);
        #: why every run takes the whole model, or None.
        self.start_layers, self._cuts, self.whole_model_reason = _starts_and_cuts(
            model.graph, [plans[i] for i in self.measured], proto
        )
        self._extractor = onnx.utils.Extractor(proto) if self._cuts else None
        #: The whole model with the cuts' values as outputs too (the extractor keeps ``proto``; the weights are
        #: shared, not copied), for ``_whole_session``.
        self._whole = onnx.ModelProto()
        self._whole.CopyFrom(proto)
        self._cut_names = list(dict.fromkeys(name for cut in self._cuts for name in cut))
        self._whole.graph.output.extend(onnx.ValueInfoProto(name=name) for name in self._cut_names)
        session = self._whole_session()
        self.input_names = session.input_names  # what a caller feeds (the weights are fed by the sessions)
        inputs = set(self.input_names)
        self.samples = [{name: value for name, value in sample.items() if name in inputs} for sample in samples]
        #: Per cut and sample (``cut * len(samples) + sample``), the float values entering the cut's layer.
        self._float_cuts = SpilledSamples(
            len(self._cuts) * len(self.samples), what="the budget sensitivity's float values at the layer cuts"
        )
        weakref.finalize(self, self._float_cuts.close)
        self._energy = 0.0  # relative_mse's denominator (a KL needs none: no float64 square of the logits)
        for index, sample in enumerate(self.samples):
            values = dict(zip([self.output, *self._cut_names], session.run([self.output, *self._cut_names], sample)))
            output = values.pop(self.output)
            if self.measure != "kl":
                self._energy += float(np.square(output, dtype=np.float64).sum())
            del output
            for number, cut in enumerate(self._cuts):
                self._float_cuts[number * len(self.samples) + index] = {name: values[name] for name in cut}
            del values
        del session
        #: The rest of the model from one cut: (cut index, session, its float outputs as the measure compares them:
        #: arrays, or ``_Distribution`` for ``kl``; their ``(shape, dtype)``; the cut's float values per sample).
        self._suffix: tuple[int | None, WeightFedSession, list, list, list] | None = None
        #: The cut values under the last ``context`` (a shallow copy of it, the values per sample).
        self._context_stream: tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]] | None = None

    def _session(self, proto: onnx.ModelProto) -> WeightFedSession:
        """A session on ``proto`` (consumed) whose weights are graph inputs fed the model's arrays (no copy of them
        lives in the session), the measured ones among them, so that a feed replaces them."""
        options = session_options()
        options.enable_cpu_mem_arena = False  # two sessions live at once: no arena keeps a run's buffers after it
        return session_feeding_weights(
            proto, self._data_dirs, options, memory_files=self._memory_files, also=self.names
        )

    def _whole_session(self) -> WeightFedSession:
        """A session of the whole model, the cuts' values among its outputs."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self._whole)
        return self._session(proto)

    def _session_from(self, start: int | None) -> tuple[WeightFedSession, list, list, list]:
        """The session that runs from cut ``start`` (None: the whole model), its float outputs (computed by that
        session, kept while it is the current one) in the form the measure compares (``_Distribution`` for ``kl``),
        their ``(shape, dtype)``, and per sample the float values it takes at the cut (none for the whole model)."""
        if self._suffix is None or self._suffix[0] != start:
            self._suffix = None  # one rest-of-model session at a time
            if start is None:
                session, streams = self._whole_session(), [{} for _ in self.samples]
            else:
                proto = self._extractor.extract_model([*self.input_names, *self._cuts[start]], [self.output])
                # the weights before the cut are let go of (read again only where a whole-model session needs them)
                self._memory_files.release({external_location(tensor) for tensor in proto_tensors(proto.graph)})
                release_free_memory()  # they were read into the heap: their pages go back to the system
                session = self._session(proto)
                count = len(self.samples)
                streams = [self._float_cuts[start * count + index] for index in range(count)]
            reference, layouts = [], []
            for sample, stream in zip(self.samples, streams):  # one sample's logits in memory at a time
                output = self._run(session, {}, sample, stream)
                layouts.append((output.shape, output.dtype))
                reference.append(_Distribution(output) if self.measure == "kl" else output)
                del output
            self._suffix = (start, session, reference, layouts, streams)
        return self._suffix[1:]

    def _run(self, session: WeightFedSession, weights, sample, stream) -> np.ndarray:
        return np.asarray(session.run([self.output], {**sample, **stream, **weights})[0])

    def _context_values(self, context: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every sample's values at every cut with the weights as ``context`` sets them, by a session of the whole
        model; computed again when the context holds other arrays than the last one (the same arrays are taken to
        hold the same values)."""
        cached = None if self._context_stream is None else self._context_stream[0]
        if cached is None or cached.keys() != context.keys() or any(context[k] is not cached[k] for k in context):
            self._context_stream = None
            session, names = self._whole_session(), self._cut_names
            values = [dict(zip(names, session.run(names, {**sample, **context}))) for sample in self.samples]
            self._context_stream = (dict(context), values)
        return self._context_stream[1]

    def error(self, position: int, weight: np.ndarray, context: dict[str, np.ndarray] | None = None) -> float:
        """The output's error with measured weight ``position``'s weight replaced by ``weight`` (``[K, N]``), the
        others float, or as ``context`` (``contexts``: feeds by weight name) gives them."""
        start = self.start_layers[position]
        session, reference, layouts, streams = self._session_from(start)
        if context and start is not None:
            streams = self._context_values(context)
        feed = {**(context or {}), self.names[position]: np.ascontiguousarray(weight, dtype=self.dtypes[position])}
        total, output = 0.0, None
        for index, (sample, stream) in enumerate(zip(self.samples, streams)):
            # ONNX Runtime writes each sample's output into one buffer of this call (read once, then overwritten)
            # instead of allocating it and handing over a copy; none is kept between calls
            if output is None or (output.shape, output.dtype) != layouts[index]:
                output = None  # the old buffer goes before the new one is made
                output = np.empty(*layouts[index])
            session.run_into(self.output, {**sample, **stream, **feed}, output)
            if self.measure == "kl":
                total += reference[index].kl(output) / len(self.samples)
            else:
                total += float(np.square(output.astype(np.float64) - reference[index]).sum())
        if self.measure != "kl":
            total /= self._energy if self._energy > 0 else 1.0
        return max(total, 0.0)

    def table(
        self,
        candidates: Sequence[Sequence[QuantizedWeight]],
        chosen: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
    ) -> list[list[float]]:
        """``error`` of every measured weight (row, in ``measured`` order) at every candidate (column), with a
        progress bar. ``chosen`` (a column per row): measured in the context of that mix, every other weight at
        its chosen candidate instead of float, so that what one weight costs is judged beside the others'
        errors (they compound at low widths). ``positions``: the rows are these measured weights only (without
        a context), e.g. one layer's in a sweep."""
        if positions is None:
            positions = range(len(candidates))
        elif chosen is not None:
            raise ValueError("a context sets every measured weight: measure all of them")
        if len(positions) != len(candidates):
            raise ValueError(f"{len(candidates)} rows of candidates for {len(positions)} positions")
        context = None if chosen is None else self.contexts(candidates, chosen)
        errors: list[list[float]] = [[] for _ in candidates]
        desc = f"budget sensitivity ({self.measure}{', in context' if chosen is not None else ''})"
        # Layer by layer, so that each rest-of-model session is made once.
        starts = [self.start_layers[position] for position in positions]
        order = sorted(range(len(candidates)), key=lambda row: (starts[row] is None, starts[row] or 0, row))
        with tqdm(total=sum(len(row) for row in candidates), desc=desc, unit="run") as bar:
            for row in order:
                for candidate in candidates[row]:
                    errors[row].append(self.error(positions[row], candidate.dequantize(), context))
                    bar.update()
        return errors

    def contexts(self, candidates: Sequence[Sequence[QuantizedWeight]], chosen: Sequence[int]) -> dict[str, np.ndarray]:
        """Feeds that set every measured weight to its ``chosen`` candidate."""
        return {
            name: np.ascontiguousarray(row[column].dequantize(), dtype=dtype)
            for name, dtype, row, column in zip(self.names, self.dtypes, candidates, chosen, strict=True)
        }
