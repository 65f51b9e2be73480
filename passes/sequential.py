"""Layer sweeps: decoder layers quantized one after another, each on the weight statistics of its own inputs.

Two streams. ``quantized`` (``calibration_mode="sequential"``): each layer's statistics are taken on the model
whose earlier layers are already quantized (GPTQ's order), for about two forward passes in all (each layer runs
twice: with float weights for its statistics, with quantized ones for the next layer's input), not one per layer.
``float`` (the parallel mode's statistics, layer by layer): the next layer's input is computed with float
weights in the same run that gives the layer's statistics, so the statistics are those of the whole float model,
for one forward pass, with one layer's Hessians alive at a time instead of every layer's (two: a layer is quantized
on a second thread while the next one is calibrated, so that the cores one part leaves idle go to the other).

The shortcut: cut the graph before every decoder layer. The cut ``C_i`` is the set of values produced
before layer ``i`` and read at or after it that depend on some weight (the residual stream; values
computed from graph inputs alone, such as rotary tables and masks, are recomputed instead). For every
calibration sample the sweep keeps ``C_i`` (in temporary files: ``runtime.spill``), runs only layer ``i``'s
extracted subgraph (inputs: the graph inputs and ``C_i``) with float weights to accumulate ``H`` of its weights'
inputs, lets the caller quantize the layer, and runs the subgraph again with the quantized weights to produce
``C_{i+1}`` (float stream: ``C_{i+1}`` comes out of the first run), which replaces ``C_i`` sample by sample. The
sessions read the model's own weight arrays (``runtime.session.proto_sharing_initializers``), no copy of them; a
layer's arrays are let go once it is quantized (``LayerSweep.run``), so a caller that writes each layer as it goes
frees its float weights.
Memory: one sample's cut at a time; the cut of every sample (samples x tokens x hidden float32 for a residual
stream) waits in temporary files between layers, one cut's worth, never one per layer; past ``max_stream_bytes``
(default: what fits twice in the temporary folder, ``stream_room``; checked on the first sample of every cut) the
sweep refuses (``StreamTooLarge``).

Which weights: MatMul weights (initializers) whose every use sits in one decoder layer (module path
``...layers.<i>``, see ``axis_selectors.decoder_layer``). The others (LM head, embeddings, Gemm weights,
weights of a graph without module paths) keep the ordinary (parallel) statistics, and weights outside
the layers stay in float while the sweep runs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import tempfile
import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx.utils
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass
from tqdm.auto import tqdm

from lowbit.ir import analysis
from lowbit.passes.axis_selectors import Module, WeightPlan, decoder_layer, module_session
from lowbit.passes.quant.hessian import HessianAccumulator
from lowbit.runtime.calibration import RunBehind
from lowbit.runtime.memory import release_free_memory
from lowbit.runtime.session import (
    external_data_dirs,
    external_location,
    proto_sharing_initializers,
    session_from_proto,
    session_options,
    set_external_data_dirs,
)
from lowbit.runtime.spill import SpilledSamples, free_bytes
from lowbit.runtime.threads import NO_SPINNING

#: What the sweep leaves free in the temporary folder (``stream_room``).
SPILL_RESERVE_BYTES = 2**30


class StreamTooLarge(ValueError):
    """The layer inputs of every sample would take more bytes than the sweep may keep."""


def stream_room() -> int:
    """The bytes of layer inputs (one cut, every sample) a sweep may keep in the temporary folder: two cuts lie there
    while one replaces the other, and ``SPILL_RESERVE_BYTES`` stay free."""
    return max(0, (free_bytes() - SPILL_RESERVE_BYTES) // 2)


#: How the input of the next layer is computed: with the layer quantized, or in float.
STREAMS = ("quantized", "float")


def layer_of(uses: list[analysis.WeightUse]) -> str | None:
    """The decoder layer that holds every use of a weight, or None when the sweep cannot take it."""
    layers = {
        decoder_layer(use.layer) if use.kind == "matmul" and use.weight.is_initializer() else None for use in uses
    }
    return layers.pop() if len(layers) == 1 else None


@dataclasses.dataclass
class Layer:
    """A decoder layer's name and the indices of its weight plans."""

    name: str
    indices: list[int]


def group_layers(plans: list[WeightPlan]) -> tuple[list[Layer], list[int]]:
    """Plans (anything with ``uses``) grouped by decoder layer in graph order, and the indices of the plans
    outside any layer."""
    layers: dict[str, Layer] = {}
    rest = []
    for index, plan in enumerate(plans):
        name = layer_of(plan.uses)
        if name is None:
            rest.append(index)
        else:
            layers.setdefault(name, Layer(name, [])).indices.append(index)
    return list(layers.values()), rest


@dataclasses.dataclass
class LayerStep:
    """What the caller gets to quantize one layer: the layer as a float subgraph from its input cut to its
    output cut (built on first use; None when nothing after it reads the layer), and that subgraph's feeds
    for the first samples."""

    build_model: Callable[[], ir.Model | None]
    samples: list[dict[str, np.ndarray]]

    @functools.cached_property
    def model(self) -> ir.Model | None:
        return self.build_model()


#: Quantizes one layer (its plans' ``hessian`` already set); returns weight name -> quantized [K, N] value (read
#: by the quantized stream only).
LayerQuantizer = Callable[[Layer, LayerStep], Mapping[str, np.ndarray]]


class LayerSweep:
    """Quantize decoder layers in graph order, each calibrated on the model with earlier layers quantized."""

    def __init__(
        self,
        model: ir.Model,
        plans: list[WeightPlan],
        layers: list[Layer],
        feeds: list[Mapping[str, np.ndarray]],
        *,
        selector_samples: int = 4,
        max_stream_bytes: int | None = None,
        stream: str = "quantized",
    ):
        """``stream``: ``"quantized"`` (each layer's input computed with the earlier layers quantized) or
        ``"float"`` (with float weights: the whole float model's statistics); ``max_stream_bytes``: default
        ``stream_room()``."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        if not feeds:
            raise ValueError("the layer sweep got no calibration feeds")
        expected = sorted(value.name for value in model.graph.inputs if not value.is_initializer())
        if sorted(feeds[0]) != expected:
            raise ValueError(f"calibration feeds name the inputs {sorted(feeds[0])}; the model takes {expected}")
        self.model, self.plans, self.layers, self.feeds = model, plans, layers, feeds
        self.selector_samples, self.stream = selector_samples, stream
        self.max_stream_bytes = stream_room() if max_stream_bytes is None else max_stream_bytes
        self.graph_inputs = expected
        self.cuts = layer_cuts(model.graph, [plan.uses for plan in plans], layers)
        #: Where the model's external data lies (sessions on its subgraphs read it from there).
        self.data_dirs = external_data_dirs(model)
        #: Bytes of layer inputs held while each layer was quantized (one cut, every sample).
        self.stream_bytes: list[int] = []
        #: Seconds spent running the layers for their statistics (``"onnxruntime"``) and waiting for the statistics
        #: to be folded (``"statistics"``), as ``runtime.calibration.CalibrationStats.seconds``; on the float stream,
        #: waiting for a layer's quantization that the next layer's calibration did not hide (``"quantization"``).
        self.seconds = {"onnxruntime": 0.0, "statistics": 0.0} | ({"quantization": 0.0} if stream == "float" else {})

    def run(self, quantize: LayerQuantizer) -> None:
        """Calibrate the layers in graph order and hand each to ``quantize``; on the float stream ``quantize`` runs on
        a second thread, one layer at a time and in order, while the next layer is calibrated (its errors are raised
        here)."""
        proto, self.memory_files = proto_sharing_initializers(self.model)
        locations = {tensor.name: external_location(tensor) for tensor in proto.graph.initializer}
        extractor = onnx.utils.Extractor(proto)
        del proto
        with (
            SpilledSamples(len(self.feeds), what="the layer sweep's layer inputs") as stream,
            RunBehind() if self.stream == "float" else contextlib.nullcontext() as behind,
        ):
            self._prefix(extractor, stream)
            for index, layer in enumerate(tqdm(self.layers, desc="calibration by layer", unit="layer")):
                inputs, outputs = [*self.graph_inputs, *self.cuts[index]], self.cuts[index + 1]
                self.stream_bytes.append(stream.nbytes)
                samples = [{**self.feeds[s], **stream[s]} for s in range(min(self.selector_samples, len(stream)))]
                last = index + 1 == len(self.layers)
                self._set_hessians(
                    extractor, layer, inputs, stream, [] if self.stream == "quantized" or last else outputs
                )
                build = functools.partial(_float_subgraph, extractor, inputs, outputs, self.data_dirs, self.model)
                step = LayerStep(build, samples)
                if behind is None:
                    quantized = quantize(layer, step)
                    if not last:
                        self._advance(extractor, Module(layer.name, inputs, outputs, layer.indices), quantized, stream)
                    self._let_go(layer, locations)
                else:  # float stream: the next layer's input is ready, so it is calibrated while this one is quantized
                    if index:
                        behind.wait()  # one layer quantized at a time, in order
                        self._let_go(self.layers[index - 1], locations)
                    behind.submit(quantize, layer, step)
            if behind is not None:
                behind.wait()
                self._let_go(self.layers[-1], locations)
                self.seconds["quantization"] = behind.waited

    def _let_go(self, layer: Layer, locations: Mapping[str, str | None]) -> None:
        """Drop the sweep's references to the float arrays of the layer's weights (no later session reads them):
        an array the caller replaced (a written weight, a split one's new value) is then freed."""
        for index in layer.indices:
            self.memory_files.pop(locations.get(self.plans[index].first.weight.name), None)
        release_free_memory()

    def _prefix(self, extractor: onnx.utils.Extractor, stream: SpilledSamples) -> None:
        """Write the first cut for every sample (e.g. the token embeddings) into ``stream``."""
        if self.cuts[0]:
            sess = self._session(extractor.extract_model(self.graph_inputs, self.cuts[0]))
            self._replace(stream, sess, self.cuts[0], {})

    def _session(self, proto: onnx.ModelProto) -> ort.InferenceSession:
        """A session on a part of the model; its threads sleep between runs, leaving a core to the folds. On the
        float stream it runs on one thread: the layer quantized beside it takes the other cores, and ONNX
        Runtime's threads, which wait for one another at every node, lose more to sharing cores than they gain."""
        options = session_options(intra_op_threads=1 if self.stream == "float" else None)
        options.add_session_config_entry(*NO_SPINNING)
        options.enable_cpu_mem_arena = False  # a session per layer: no arena that outlives the runs' buffers
        return session_from_proto(proto, self.data_dirs, options, memory_files=self.memory_files)

    def _replace(self, stream, sess: ort.InferenceSession, names: list[str], weights: Mapping[str, np.ndarray]) -> None:
        """Run ``sess`` on every sample (its feeds, its cut, ``weights``) and put the outputs in place of its
        cut, one sample at a time."""
        for sample, feeds in enumerate(self.feeds):
            outputs = dict(zip(names, sess.run(names, {**feeds, **stream[sample], **weights})))
            if sample == 0:
                self._check_room(outputs)
            stream[sample] = outputs

    def _check_room(self, first: dict[str, np.ndarray]) -> None:
        total = sum(value.nbytes for value in first.values()) * len(self.feeds)
        if total > self.max_stream_bytes:
            shapes = {name: list(value.shape) for name, value in first.items()}
            what = "sequential calibration" if self.stream == "quantized" else "calibrating layer by layer"
            other_mode = ", or calibration_mode='parallel'" if self.stream == "quantized" else ""
            raise StreamTooLarge(
                f"{what} would keep {total / 2**20:.0f} MiB of layer inputs ({len(self.feeds)} samples of {shapes}) "
                f"in temporary files, over the limit of {self.max_stream_bytes / 2**20:.0f} MiB (by default half the "
                f"free space of {tempfile.gettempdir()!r} less {SPILL_RESERVE_BYTES / 2**30:.0f} GiB): set TMPDIR to "
                f"a folder with more room, or use fewer or shorter calibration windows{other_mode}"
            )

    def _set_hessians(self, extractor, layer: Layer, inputs: list[str], stream, outputs: list[str]) -> None:
        """Run the layer with float weights on every sample and set its plans' H from its weights' inputs; where
        ``outputs`` (the next cut) are asked for, they replace each sample's cut in ``stream``."""
        activations: dict[str, int] = {}
        for index in layer.indices:
            plan = self.plans[index]
            activations[plan.first.node.inputs[0].name] = plan.shape[0]
        computed = [name for name in activations if name not in inputs]
        names = computed + [name for name in outputs if name not in computed and name not in inputs]
        sess = self._session(extractor.extract_model(inputs, names)) if names else None
        accumulators = {name: HessianAccumulator(channels) for name, channels in activations.items()}
        with RunBehind() as folder:
            for sample, feeds in enumerate(self.feeds):
                values = {**feeds, **stream[sample]}
                if sess is not None:
                    start = time.perf_counter()
                    values.update(zip(names, sess.run(names, values)))
                    self.seconds["onnxruntime"] += time.perf_counter() - start
                folder.submit(_fold, accumulators, {name: values[name] for name in accumulators})
                if outputs:
                    cut = {name: values[name] for name in outputs}
                    if sample == 0:
                        self._check_room(cut)
                    stream[sample] = cut
                    del cut
                del values
        self.seconds["statistics"] += folder.waited
        for index in layer.indices:
            plan = self.plans[index]
            plan.hessian = accumulators[plan.first.node.inputs[0].name].hessian

    def _advance(self, extractor, module: Module, quantized: Mapping[str, np.ndarray], stream) -> None:
        """Replace every sample's cut by the next one, computed with the layer's quantized weights (arrays in
        each weight's own type: ``WeightPlan.session_input``)."""
        names = [self.plans[i].first.weight.name for i in module.plan_indices]
        missing = sorted(set(names) - set(quantized))
        if missing:
            raise ValueError(f"layer {module.name!r}: the quantizer returned no value for the weights {missing}")
        sess = module_session(extractor, module, names, self.data_dirs, self.memory_files)
        self._replace(stream, sess, module.outputs, {name: np.asarray(quantized[name]) for name in names})


def _fold(accumulators: dict[str, HessianAccumulator], values: dict[str, np.ndarray]) -> None:
    for name, accumulator in accumulators.items():
        accumulator.update(values[name])


def _float_subgraph(
    extractor: onnx.utils.Extractor,
    inputs: list[str],
    outputs: list[str],
    data_dirs: Mapping[str, str],
    model: ir.Model,
) -> ir.Model | None:
    """The layer's float subgraph, its tensors ``model``'s own (the extractor's proto refers to them by name) and
    its external tensors read from the whole model's folders."""
    if not outputs:
        return None
    sub = set_external_data_dirs(ir.serde.deserialize_model(extractor.extract_model(inputs, outputs)), data_dirs)
    for name, value in sub.graph.initializers.items():
        own = model.graph.initializers.get(name)
        if own is not None and own.const_value is not None and not isinstance(own.const_value, ir.ExternalTensor):
            value.const_value = own.const_value
    return sub


def infer_missing_types(model: ir.Model) -> None:
    """Fill in value types and shapes where the file carries none (ONNX shape inference), so that
    subgraphs cut out of the model (the layer sweeps', the axis selectors') have typed inputs and outputs."""
    if all(output.type is not None for node in model.graph for output in node.outputs):
        return
    try:
        ShapeInferencePass()(model)
    except Exception as error:
        raise ValueError(f"the model carries no value types and ONNX shape inference failed on it: {error}") from error


def unsweepable(graph: ir.Graph, groups: list[list[analysis.WeightUse]]) -> str | None:
    """Why a sweep cannot cut ``graph`` between the decoder layers of the weights with these uses, or None."""
    holders = [_Uses(uses) for uses in groups]
    layers, _ = group_layers(holders)
    if not layers:
        return None
    try:
        layer_cuts(graph, groups, layers)
    except ValueError as error:
        return str(error)
    return None


_Uses = collections.namedtuple("_Uses", "uses")


def layer_cuts(graph: ir.Graph, uses: list[list[analysis.WeightUse]], layers: list[Layer]) -> list[list[str]]:
    """Value names of the cut before every layer and after the last one (``len(layers) + 1`` cuts)."""
    nodes = list(graph)
    position = {id(node): index for index, node in enumerate(nodes)}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        name = decoder_layer(analysis.module_path(node))
        if name is not None:
            first.setdefault(name, index)
            last[name] = index
    points = [first[layer.name] for layer in layers] + [last[layers[-1].name] + 1]
    for number, layer in enumerate(layers):
        for index in layer.indices:
            for use in uses[index]:
                if not points[number] <= position[id(use.node)] < points[number + 1]:
                    raise ValueError(
                        f"decoder layer {layer.name!r}: its weight {use.weight.name!r} lies outside the layer's span "
                        "in graph order, so layers cannot be calibrated one after another; use calibration_mode='parallel'"
                    )
    weight_nodes = {id(use.node) for use in analysis.weight_uses(graph)}
    dependent: set[int] = set()  # values computed from some weight
    for node in nodes:
        if id(node) in weight_nodes or any(value is not None and id(value) in dependent for value in node.inputs):
            dependent.update(id(output) for output in node.outputs)
    cuts = []
    for point in points:
        cuts.append(
            [
                output.name
                for node in nodes[:point]
                for output in node.outputs
                if id(output) in dependent and any(position.get(id(use.node), point) >= point for use in output.uses())
            ]
        )
    return cuts
