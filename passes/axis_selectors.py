"""AdaDim axis selectors: given per-OC and per-IC candidates of every weight, choose one axis per weight.

* ``matrix`` — per weight, the candidate with the lower output error ``trace(dW^T H dW)``: the weight's
  own output on the calibration tokens, with every other weight in float.
* ``block`` (the default) — the AdaDim paper's: the error at the output of the weight's *parent module* (attention for
  q/k/v/o, MLP for gate/up/down), measured by running that subgraph in ONNX Runtime on captured
  calibration inputs, choosing greedily inside the module (start from ``matrix``, flip one weight at a
  time, keep a flip when it lowers the module's output error). q/k/v interact through softmax and
  gate/up through the gating product: the module output sees that, a per-matrix error does not.
* ``layer`` — ours: the same greedy search on the output of the whole decoder layer (the residual
  stream after it), so attention and MLP choices are judged together on what the next layer reads.

Graph selectors judge only plain MatMul weights stored as initializers; any other weight keeps its
``matrix`` choice. Modules are found from module paths: torch.onnx metadata, else slashed node names
(``/model/layers.0/attn/qkv_proj/MatMul``, as the onnxruntime-genai builder writes them). A graph with
neither gets ``matrix`` choices everywhere, with a warning, and the pass details count the weights in no
module (``unmatched``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx.utils
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from lowbit.ir import analysis
from lowbit.passes.quant.adadim import lowest, output_error, relative, relative_output_error
from lowbit.passes.quant.rtn import QuantizedWeight
from lowbit.passes.quant.scheme import SELECTORS
from lowbit.runtime.calibration import keep_nodes_needed_for
from lowbit.runtime.memory import release_free_memory
from lowbit.runtime.session import (
    NO_PREPACKING,
    external_data_dirs,
    proto_sharing_initializers,
    session_from_proto,
    session_options,
)
from lowbit.runtime.threads import NO_SPINNING


@dataclasses.dataclass(frozen=True)
class DeferredWeight:
    """A weight read when first needed (``WeightPlan.weight``): a lazily computed or read initializer (a layer
    split's cluster, a weight of a loaded file: ``ir.LazyTensor``), which a layer sweep then holds one layer at a
    time."""

    shape: tuple[int, ...]  # [K, N]
    load: Callable[[], np.ndarray]


def weight_source(
    use: analysis.WeightUse, read: Callable[[analysis.WeightUse], np.ndarray]
) -> np.ndarray | DeferredWeight:
    """A plan's ``source``: ``read(use)`` (its ``[K, N]`` float32 value) now, or, where the initializer is computed or
    read from its file when asked (``ir.LazyTensor``), when the plan first needs it."""
    if not isinstance(use.weight.const_value, ir.LazyTensor):
        return read(use)
    return DeferredWeight(analysis.weight_shape_kn(use), functools.partial(read, use))


@dataclasses.dataclass
class WeightPlan:
    """One weight to quantize: its uses, its [K, N] value (``weight``: ``source``, read where deferred), its
    input's H and the candidates per axis."""

    uses: list[analysis.WeightUse]
    source: np.ndarray | DeferredWeight
    hessian: np.ndarray | None
    candidates: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)
    #: The candidates' output errors, kept when the chosen candidate is replaced afterwards (choice by RTN).
    choice_errors: dict[str, float] | None = None
    #: Output errors measured so far, each with the candidate and Hessian it was measured on (``output_errors``;
    #: None once released).
    _measured: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    #: Whether ``hessian`` was dropped once measured (``release_hessian``).
    _released: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)
    #: The deferred weight ``source`` was read from (``weight``), to read again after ``release_candidates``.
    _deferred: DeferredWeight | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def first(self) -> analysis.WeightUse:
        return self.uses[0]

    @property
    def weight(self) -> np.ndarray:
        """The [K, N] float32 value (a deferred one read now, kept until ``release_candidates`` or ``release_arrays``)."""
        if isinstance(self.source, DeferredWeight):
            self._deferred, self.source = self.source, self.source.load()
        return self.source

    @property
    def shape(self) -> tuple[int, ...]:
        """``[K, N]``, without reading a deferred weight."""
        return tuple(self.source.shape)

    @property
    def calibrated(self) -> bool:
        """Whether the plan has its input's H, or had it before ``release_hessian``."""
        return self.hessian is not None or self._released

    def release_hessian(self) -> None:
        """Measure what the axis choice and the report read of H (every candidate's output error, the output
        energy), then drop this plan's reference to it. A plan with one candidate keeps it: the report measures
        the candidate as written (``rtn.fit_to_type`` may change it)."""
        if self.hessian is None or len(self.candidates) < 2:
            return
        self.output_errors()
        self.output_energy()
        self._measured = {key: (candidate, None, error) for key, (candidate, _, error) in self._measured.items()}
        self.hessian = None
        self._released = True

    def keep_candidate(self, axis: str) -> None:
        """Drop every candidate but ``axis``'s, and the other candidates that the measured errors hold."""
        self.candidates = {axis: self.candidates[axis]}
        for key in [key for key in self._measured if key not in (None, axis)]:
            del self._measured[key]

    def release_candidates(self) -> None:
        """Let go of the candidates and H once measured (a budget's sweep measures every width of a layer, then
        quantizes the chosen one again), and of a deferred weight (read again then); the errors the report lists
        (``choice_errors``) stay."""
        self.hessian, self.candidates, self._measured = None, {}, {}
        if self._deferred is not None:
            self.source = self._deferred

    def release_arrays(self) -> None:
        """Let go of the float weight, its candidates and H once the weight is written (the layer-by-layer sweep:
        what a layer held is freed before the next one is quantized); the plan serves nothing after."""
        self.source = np.empty((0, 0), np.float32)
        self.hessian, self.candidates, self._measured, self.choice_errors = None, {}, {}, None

    def session_input(self, axis: str) -> np.ndarray:
        """The ``axis`` candidate, dequantized, in the weight initializer's own type (fp16, bf16, float64 or
        float32): what a subgraph session that reads the weight takes as its input."""
        dtype = self.first.weight.dtype
        array = self.candidates[axis].dequantize()
        return array if dtype is None else array.astype(dtype.numpy())

    def output_errors(self) -> dict[str, float]:
        """``trace(dW^T H dW)`` of every candidate, each measured once (the axis choice and the report both ask)."""
        return {axis: self._measure(axis, candidate) for axis, candidate in self.candidates.items()}

    def output_energy(self) -> float:
        """``trace(W^T H W)``, measured once."""
        return self._measure(None, None)

    @property
    def tied_head_hessian(self) -> np.ndarray | None:
        """H of the input of an LM head that reads this weight transposed (a tied embedding table), or None."""
        return None

    def written_output_error(self, reconstructed: np.ndarray) -> float | None:
        """The relative output error of ``reconstructed`` (the weight as written): on this weight's H, else on a
        tied head's H; None without calibration."""
        if self.hessian is not None:
            return relative(output_error(self.weight, reconstructed, self.hessian), self.output_energy())
        if self.tied_head_hessian is not None:
            return relative_output_error(self.weight.T, reconstructed.T, self.tied_head_hessian)
        return None

    def _measure(self, key: str | None, candidate: QuantizedWeight | None) -> float:
        cached = self._measured.get(key)
        if cached is None or cached[0] is not candidate or cached[1] is not self.hessian:
            approx = np.zeros_like(self.weight) if candidate is None else candidate.dequantize()
            cached = self._measured[key] = (candidate, self.hessian, output_error(self.weight, approx, self.hessian))
        return cached[2]


def matrix_errors(plan: WeightPlan) -> dict[str, float]:
    """Relative output error ``trace(dW^T H dW) / trace(W^T H W)`` of every candidate."""
    energy = plan.output_energy()
    return {axis: relative(error, energy) for axis, error in plan.output_errors().items()}


def select_matrix(plans: list[WeightPlan]) -> list[str]:
    """Per weight, the axis with the lower output error (ties: the first candidate, i.e. per-OC)."""
    return [
        lowest(plan.output_errors()) if len(plan.candidates) > 1 and plan.calibrated else next(iter(plan.candidates))
        for plan in plans
    ]


def dotted_path(path: str) -> str:
    """A module path in torch's dotted form. Node names of graphs made without torch's name scopes (the
    onnxruntime-genai model builder, the TorchScript exporter) spell the module as a slashed path ending in
    the op: ``/model/layers.0/attn/qkv_proj/MatMul`` -> ``model.layers.0.attn.qkv_proj``. Others pass as they are."""
    if not path.startswith("/"):
        return path
    parts = [part for part in path.split("/") if part]
    return ".".join(parts[:-1]) if len(parts) > 1 else (parts[0] if parts else path)


def node_module(node: ir.Node) -> str:
    """The module a node belongs to, dotted (``analysis.module_path`` through ``dotted_path``)."""
    return dotted_path(analysis.module_path(node))


def parent_module(path: str) -> str | None:
    """``a.b.self_attn.q_proj`` -> ``a.b.self_attn`` (the block a weight belongs to); builder node names too
    (``/model/layers.0/attn/qkv_proj/MatMul`` -> ``model.layers.0.attn``)."""
    path = dotted_path(path)
    return path.rsplit(".", 1)[0] if "." in path else None


def decoder_layer(path: str) -> str | None:
    """``m.model.layers.3.mlp.up_proj`` -> ``m.model.layers.3`` (prefix through the first index); builder node
    names too (``/model/layers.3/mlp/up_proj/MatMul`` -> ``model.layers.3``)."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", dotted_path(path))
    return match.group(1) if match else None


def _in_module(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


@dataclasses.dataclass
class Module:
    """A subgraph (one module) with its boundary values and the weight plans inside it."""

    name: str
    inputs: list[str]
    outputs: list[str]
    plan_indices: list[int]


def _module_boundaries(graph: ir.Graph, paths: dict[int, str], module: str) -> tuple[list[str], list[str]]:
    """Names of the non-constant values a module reads from outside, and of those it hands out."""
    inside = [node for node in graph if _in_module(paths[id(node)], module)]
    inside_ids = {id(node) for node in inside}
    produced = {output.name for node in inside for output in node.outputs}
    inputs: dict[str, None] = {}
    read_outside: dict[str, ir.Value] = {}
    graph_outputs: dict[str, ir.Value] = {}
    for node in inside:
        for value in node.inputs:
            if value is not None and value.name not in produced and value.const_value is None:
                inputs.setdefault(value.name)
        for output in node.outputs:
            if any(id(use.node) not in inside_ids for use in output.uses()):
                read_outside.setdefault(output.name, output)
            elif output.is_graph_output():
                graph_outputs.setdefault(output.name, output)
    # A KV-cache graph's attention also hands out its present keys/values as graph outputs. The module's
    # output is what the rest of the graph reads (as in a graph without a cache); a graph output that no
    # node outside reads counts only when it depends on a weight that the read outputs do not.
    judged = _weights_behind(list(read_outside.values()), inside_ids)
    extra = [name for name, value in graph_outputs.items() if _weights_behind([value], inside_ids) - judged]
    return list(inputs), [*read_outside, *extra]


def _weights_behind(values: list[ir.Value], inside_ids: set[int]) -> set[str]:
    """Names of the initializers that the module's nodes read on the way to ``values``."""
    found: set[str] = set()
    stack, seen = list(values), set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_initializer():
            found.add(value.name)
        producer = value.producer()
        if producer is not None and id(producer) in inside_ids:
            stack.extend(input_ for input_ in producer.inputs if input_ is not None)
    return found


class SubgraphSelector:
    """Greedy axis search on the output error of each module (``group_of`` maps a weight's path to it)."""

    def __init__(self, group_of: Callable[[str], str | None]):
        self.group_of = group_of
        self.details: dict = {}
        self.unmatched = 0

    def __call__(self, model: ir.Model, plans: list[WeightPlan], samples: list[Mapping[str, np.ndarray]]) -> list[str]:
        choices = select_matrix(plans)
        modules = self._modules(model.graph, plans)
        # No silent fallback: a graph with no module paths at all gets every choice from the matrix selector.
        # (Top-level weights such as the LM head lie in no module in any graph: they need no warning.)
        if not modules and self.unmatched and not any("." in node_module(node) for node in model.graph):
            warnings.warn(
                f"AdaDim selector found no module for any of {self.unmatched} weight(s) (no torch name scopes and no "
                "slashed module paths in the node names): their axes are the matrix selector's",
                stacklevel=2,
            )
        if not modules or not samples:
            self.details = {
                "modules": 0,
                "flips": 0,
                "start_error": 0.0,
                "final_error": 0.0,
                "unmatched": self.unmatched,
            }
            return choices
        data_dirs = external_data_dirs(model)
        # Neither the capture's proto nor the extractor's holds the weights: their initializers are references to
        # the model's own arrays (``proto_sharing_initializers``), which the sessions read in place. The capture's
        # proto is its session's only (pruned, emptied once serialized).
        release_free_memory()  # what the candidates' threads freed, before the capture session
        proto, memory = proto_sharing_initializers(model)
        captured = _capture(proto, data_dirs, modules, samples, consume=True, memory_files=memory)
        release_free_memory()  # the capture session's memory, before the module sessions
        proto, memory = proto_sharing_initializers(model)
        extractor = onnx.utils.Extractor(proto)
        del proto
        flips, start_error, final_error = 0, 0.0, 0.0
        for module in tqdm(modules, desc="AdaDim selection", unit="module", leave=False):
            module_flips, start, final = self._search(extractor, data_dirs, module, plans, choices, captured, memory)
            flips, start_error, final_error = flips + module_flips, start_error + start, final_error + final
        self.details = {
            "modules": len(modules),
            "flips": flips,
            "start_error": start_error,
            "final_error": final_error,
            "unmatched": self.unmatched,
        }
        return choices

    def _modules(self, graph: ir.Graph, plans: list[WeightPlan]) -> list[Module]:
        """The modules holding the weights the search can judge; ``self.unmatched``: how many of those lie in
        no module (they keep their matrix choice)."""
        grouped: dict[str, list[int]] = {}
        self.unmatched = 0
        for index, plan in enumerate(plans):
            if len(plan.candidates) < 2 or not plan.calibrated:
                continue
            if any(use.node.op_type != "MatMul" for use in plan.uses) or not plan.first.weight.is_initializer():
                continue
            module = self.group_of(plan.first.layer)
            if module is not None:
                grouped.setdefault(module, []).append(index)
            else:
                self.unmatched += 1
        paths = {id(node): node_module(node) for node in graph}
        modules = []
        for name, indices in grouped.items():
            inputs, outputs = _module_boundaries(graph, paths, name)
            if outputs:
                modules.append(Module(name, inputs, outputs, indices))
        return modules

    def _search(
        self, extractor, data_dirs, module: Module, plans, choices: list[str], captured, memory_files=None
    ) -> tuple[int, float, float]:
        """Greedy flips inside one module; updates ``choices``; returns (flips, start error, final error)."""
        weight_names = [plans[i].first.weight.name for i in module.plan_indices]
        sess = module_session(extractor, module, weight_names, data_dirs, memory_files)

        def error(weights: dict[int, np.ndarray]) -> float:
            feeds = {plans[i].first.weight.name: weights[i] for i in module.plan_indices}
            total = 0.0
            for sample in captured:
                boundary = {name: sample[name] for name in module.inputs}
                for got, name in zip(sess.run(module.outputs, {**boundary, **feeds}), module.outputs):
                    total += float(np.sum((got.astype(np.float64) - sample[name]) ** 2))
            return total

        # Each candidate is dequantized once; only the current assignment's inputs are kept, and one trial's.
        assignment = {i: choices[i] for i in module.plan_indices}
        current = {i: plans[i].session_input(assignment[i]) for i in module.plan_indices}
        start = best = error(current)
        flips = 0
        for i in module.plan_indices:
            other = next(axis for axis in plans[i].candidates if axis != assignment[i])
            trial = {**current, i: plans[i].session_input(other)}
            trial_error = error(trial)
            if trial_error < best:
                assignment[i], current, best, flips = other, trial, trial_error, flips + 1
            del trial
        for i in module.plan_indices:
            choices[i] = assignment[i]
        return flips, start, best


def _capture(
    proto: onnx.ModelProto,
    data_dirs: Mapping[str, str],
    modules: list[Module],
    samples,
    *,
    consume: bool = False,
    memory_files: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run the float model once per sample, returning every module's boundary values (``data_dirs``:
    ``runtime.session.external_data_dirs`` of the model). The boundary values become extra outputs of
    ``proto`` while its session is made (no copy of the weights), removed again afterwards; with ``consume``
    the proto is the session's only: the nodes no boundary value needs are dropped (an LM's head) and it is
    emptied once serialized (``session_from_proto(consume=True)``). ``memory_files``: in-memory external data
    (``runtime.session.proto_sharing_initializers``)."""
    names = sorted({name for module in modules for name in (*module.inputs, *module.outputs)})
    graph_inputs = {value.name for value in proto.graph.input}
    extra = [name for name in names if name not in graph_inputs]
    # A few runs only: MatMul weights are not pre-packed (a packed copy of every weight beside the session's own),
    # and the run's buffers are not kept in an arena that outlives them.
    options = session_options()
    options.add_session_config_entry(*NO_PREPACKING)
    options.enable_cpu_mem_arena = False
    if consume and extra:
        del proto.graph.output[:]
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
        keep_nodes_needed_for(proto.graph, extra)
        sess = session_from_proto(proto, data_dirs, options, consume=True, memory_files=memory_files)
        added = []
    else:
        existing = {output.name for output in proto.graph.output}
        added = [name for name in extra if name not in existing]
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in added)
        try:
            sess = session_from_proto(proto, data_dirs, options, memory_files=memory_files)
        finally:
            del proto.graph.output[len(proto.graph.output) - len(added) :]
    captured = []
    for sample in samples:
        values = dict(zip(extra, sess.run(extra, dict(sample))))
        values.update({name: sample[name] for name in names if name in graph_inputs})
        captured.append({name: np.asarray(value) for name, value in values.items()})
    return captured


def module_session(
    extractor: onnx.utils.Extractor,
    module: Module,
    weight_names: list[str],
    data_dirs: Mapping[str, str],
    memory_files: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """The module's subgraph with its weights turned into graph inputs (fed with candidates); ``data_dirs``:
    where the external data of the extracted model lies (``runtime.session.external_data_dirs``),
    ``memory_files``: its in-memory external data (``runtime.session.proto_sharing_initializers``). Its threads
    sleep between runs (``threads.NO_SPINNING``), leaving the cores to the NumPy work between the trials."""
    sub = extractor.extract_model(module.inputs, module.outputs)
    weights = {tensor.name: tensor for tensor in sub.graph.initializer if tensor.name in weight_names}
    kept = [tensor for tensor in sub.graph.initializer if tensor.name not in weights]
    del sub.graph.initializer[:]
    sub.graph.initializer.extend(kept)
    for name, tensor in weights.items():
        sub.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    options = session_options()
    options.add_session_config_entry(*NO_SPINNING)
    options.enable_cpu_mem_arena = False  # a few runs per module: no arena that outlives their buffers
    return session_from_proto(sub, data_dirs, options, memory_files=memory_files)


def make_selector(name: str):
    """``matrix`` is a plain function of the plans; ``block`` and ``layer`` run subgraphs."""
    if name == "block":
        return SubgraphSelector(parent_module)
    if name == "layer":
        return SubgraphSelector(decoder_layer)
    if name == "matrix":
        return None
    raise ValueError(f"unknown selector {name!r}; choose one of {SELECTORS}")
