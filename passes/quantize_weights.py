"""QuantizeWeightsPass: replace float weights by low-bit codes + blocked ``DequantizeLinear`` (portable
QDQ form that stock ONNX Runtime runs).

Which weights: every weight MatMul/Gemm that ``lowbit.ir.analysis.weight_uses`` finds. The LM head and
embedding tables stay in float unless opted in (``include_lm_head``, ``include_embeddings``); the report
lists every weight left in float and why. Embedding tables ``[V, D]`` are grouped along D (each token's
row on its own), whatever the scheme's axis, because a Gather reads whole rows.

A weight shared by several MatMuls is quantized once and its DequantizeLinear output feeds them all.
Methods: RTN, or GPTQ with the calibration Hessian of the weight's input. Axis: fixed (``"oc"`` or
``"ic"``), or chosen per weight among ``candidate_axes`` (AdaDim): the method quantizes the weight
along every candidate axis and a selector (``passes/axis_selectors.py``: matrix, block or layer output
error on calibration data) picks one. GPTQ and AdaDim read the statistics CaptureCalibrationPass left
in ``model.meta``. ``calibration_mode="sequential"`` quantizes decoder layers one after another, each
with statistics taken on the model whose earlier layers are already quantized (``passes/sequential.py``);
its selectors judge a layer's modules on those partially-quantized inputs too.

Weights of any float type are quantized (bfloat16 and double in float32, written as a float32
DequantizeLinear and a Cast back to the weight's type; float16 with float16 scales, the codes kept where
their reconstruction is finite in float16: ``rtn.fit_to_type``). Every other MatMul/Gemm by a constant
(in a subgraph, computed at run time, not 2-D, ...) is listed in the report as left in float, with why.

The model's default-domain opset is raised to what the storage types need (21, or 25 for 2-bit) with
onnxscript's version converter, and its IR version to 10 (11 for 2-bit); a model with an op that does not
exist (or is deprecated) in that opset, which the converter cannot replace, is refused before anything is
written (ValueError naming the node).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.version_converter
from onnx_ir.passes.common import ShapeInferencePass
from tqdm.auto import tqdm

from lowbit.ir import analysis, builders
from lowbit.passes.quant.scheme import GROUP_AXES, METHODS, QuantScheme
from lowbit.passes import axis_selectors, sequential
from lowbit.passes.capture_calibration import CALIBRATION_KEY, ORT_ERRORS
from lowbit.passes.quant.adadim import relative_output_error
from lowbit.passes.quant.gptq import quantize_gptq
from lowbit.passes.quant.rtn import MAX_MAGNITUDE, QuantizedWeight, check_weight, fit_to_type, quantize_rtn, relative_error
from lowbit.passes.report import SkippedWeight, WeightRecord


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize weights to ``scheme`` (RTN or GPTQ; fixed axis or AdaDim) as blocked DequantizeLinear + MatMul."""

    def __init__(
        self,
        scheme: QuantScheme,
        *,
        candidate_axes: tuple[str, ...] | None = None,
        selector: str = "block",
        include_lm_head: bool = False,
        include_embeddings: bool = False,
        gptq_damp: float = 0.01,
        gptq_act_order: bool = True,
        calibration_mode: str = "parallel",
        choice_method: str | None = None,
    ):
        """``choice_method``: the method whose candidates the AdaDim selector compares (``"rtn"``: choose the
        axis by RTN error, then run ``scheme.method`` on the chosen axis only, as the AdaDim paper does);
        None: ``scheme.method`` on every candidate axis."""
        super().__init__()
        if choice_method not in (None, *METHODS):
            raise ValueError(f"choice_method must be None or one of {METHODS}, got {choice_method!r}")
        self.choice_method = choice_method or scheme.method
        if calibration_mode not in sequential.CALIBRATION_MODES:
            raise ValueError(f"calibration_mode must be one of {sequential.CALIBRATION_MODES}, got {calibration_mode!r}")
        self.calibration_mode = calibration_mode
        self.candidate_axes = candidate_axes or (scheme.axis,)
        if not set(self.candidate_axes) <= set(GROUP_AXES):
            raise ValueError(f"candidate_axes must be drawn from {GROUP_AXES}, got {self.candidate_axes}")
        self.scheme = scheme
        self.selector = axis_selectors.make_selector(selector)
        self.gptq_damp = gptq_damp
        self.gptq_act_order = gptq_act_order
        self.include_lm_head = include_lm_head
        self.include_embeddings = include_embeddings
        self.weight_records: list[WeightRecord] = []
        self.skipped: list[SkippedWeight] = []
        self.details: dict = {}

    @property
    def needs_calibration(self) -> bool:
        return self.scheme.method == "gptq" or len(self.candidate_axes) > 1 or self.calibration_mode == "sequential"

    @property
    def _runs_subgraphs(self) -> bool:
        """Whether the axis choice runs subgraphs (the block and layer selectors)."""
        return self.selector is not None and len(self.candidate_axes) > 1

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.weight_records, self.skipped, self.details = [], [], {}
        statistics = model.meta.get(CALIBRATION_KEY)
        if statistics is None and self.needs_calibration:
            raise ValueError(
                f"method={self.scheme.method!r} with axes {self.candidate_axes} needs calibration statistics: "
                "run CaptureCalibrationPass first (lowbit.optimize(..., calibration=batches) does)"
            )
        plans = self._plans(model.graph, statistics)
        if plans:  # refuse before changing anything when the storage opset cannot hold the model
            _check_convertible(model, builders.required_opset(self.scheme.bits))
            if self._runs_subgraphs or self.calibration_mode == "sequential":
                _infer_missing_types(model)  # the selectors and the sweep cut subgraphs at typed values
        if self.calibration_mode == "sequential" and plans:  # no weight: nothing to sweep
            choices = self._choose_sequentially(model, plans, statistics)
        else:
            choices = self._choose(model, plans, statistics.samples if statistics is not None else [])
        if plans:
            analysis.normalize_default_domain(model)
        names = builders.NameAllocator(model.graph)
        for plan, axis in zip(plans, choices):
            self._write(model.graph, plan, axis, names)
        modified = bool(self.weight_records)
        if modified:
            _require_storage_support(model, self.scheme.bits)
        self.details.update({"quantized": len(self.weight_records), "skipped": len(self.skipped)})
        return ir.passes.PassResult(model, modified=modified)

    def _choose(self, model: ir.Model | None, plans: list[axis_selectors.WeightPlan], samples) -> list[str]:
        """Quantize ``plans`` along every candidate axis and choose one axis each (selector details summed;
        without a model to run, the ``matrix`` choice)."""
        for plan in tqdm(plans, desc=f"quantize weights ({self.choice_method})", unit="weight", leave=False):
            plan.candidates = self._candidates(plan, self.choice_method)
        if not self._runs_subgraphs or model is None:
            choices = axis_selectors.select_matrix(plans)
        else:
            choices = self.selector(model, plans, samples)
            selection = self.details.setdefault("selection", {})
            for key, value in self.selector.details.items():
                selection[key] = selection.get(key, 0) + value
        if self.choice_method != self.scheme.method:  # the chosen axis, by the recipe's own method
            for plan, axis in tqdm(list(zip(plans, choices)), desc=f"quantize weights ({self.scheme.method})", unit="weight", leave=False):
                if plan.first.kind != "embedding":
                    if plan.hessian is not None:
                        plan.choice_errors = axis_selectors.matrix_errors(plan)
                    plan.candidates[axis] = self._quantize(plan, axis, self.scheme.method)
        return choices

    def _choose_sequentially(self, model: ir.Model, plans: list[axis_selectors.WeightPlan], statistics) -> list[str]:
        """Decoder layers in graph order on sequential statistics, then the other weights on the parallel ones."""
        if statistics.feeds is None:
            raise ValueError(
                "calibration_mode='sequential' runs the calibration feeds again: pass the batches to optimize(), or "
                "statistics collected with collect(..., keep_feeds=True)"
            )
        layers, rest = sequential.group_layers(plans)
        choices: list[str | None] = [None] * len(plans)

        def quantize(layer: sequential.Layer, step: sequential.LayerStep) -> dict[str, np.ndarray]:
            layer_plans = [plans[i] for i in layer.indices]
            layer_choices = self._choose(step.model if self._runs_subgraphs else None, layer_plans, step.samples)
            for index, axis in zip(layer.indices, layer_choices):
                choices[index] = axis
            return {plan.first.weight.name: plan.session_input(axis) for plan, axis in zip(layer_plans, layer_choices)}

        stream_bytes = []
        if layers:
            sweep = sequential.LayerSweep(model, plans, layers, statistics.feeds, selector_samples=len(statistics.samples))
            try:
                sweep.run(quantize)
            except ORT_ERRORS as error:  # e.g. feeds of the wrong shapes, met here first when no parallel pass ran
                raise ValueError(f"sequential calibration: ONNX Runtime cannot run a layer on the calibration feeds: {error}") from error
            stream_bytes = sweep.stream_bytes
        for index, axis in zip(rest, self._choose(model, [plans[i] for i in rest], statistics.samples)):
            choices[index] = axis
        self.details["calibration"] = {
            "mode": "sequential",
            "layers": len(layers),
            "stream_mb": max(stream_bytes, default=0) / 2**20,
            "parallel_statistics": [plans[i].first.layer for i in rest if plans[i].hessian is not None],
        }
        return choices

    def parallel_activations(self, graph: ir.Graph) -> set[str]:
        """The activations whose parallel statistics this pass reads: the inputs of the weights it quantizes,
        in sequential mode only of those outside decoder layers (the sweep measures the rest itself)."""
        groups: dict[int, list[analysis.WeightUse]] = {}
        for use in analysis.weight_uses(graph):
            if use.kind != "embedding":
                groups.setdefault(id(use.weight), []).append(use)
        return {
            uses[0].node.inputs[0].name
            for uses in groups.values()
            if self._skip_reason(uses) is None and (self.calibration_mode == "parallel" or sequential.layer_of(uses) is None)
        }

    def _plans(self, graph: ir.Graph, statistics) -> list[axis_selectors.WeightPlan]:
        """One plan per weight to quantize (shared weights once); skipped weights go to the report."""
        groups: dict[tuple[int, bool], list[analysis.WeightUse]] = {}
        uses = analysis.weight_uses(graph)
        for use in uses:
            groups.setdefault((id(use.weight), use.kind == "embedding"), []).append(use)
        for node, weight, reason in analysis.unquantizable_weights(graph, {id(use.node) for use in uses}):
            kind = "gemm" if node.op_type == "Gemm" else "matmul"
            self.skipped.append(SkippedWeight(weight.name or "", analysis.module_path(node), kind, reason))
        if self.include_embeddings and self.include_lm_head:
            self._share_tied_tables(groups)
        plans = []
        for uses in groups.values():
            skip = self._skip_reason(uses)
            if skip is not None:
                culprit, reason = skip
                self.skipped.append(SkippedWeight(culprit.weight.name or "", culprit.layer, culprit.kind, reason))
                continue
            first = uses[0]
            try:
                weight = _float32_weight(analysis.weight_value_array(first))
                if first.node.op_type == "Gemm":
                    weight = analysis.gemm_weight_kn(first.node, weight)
                check_weight(weight)
            except ValueError as error:
                raise ValueError(f"weight {first.weight.name!r} of {first.layer!r}: {error}; fix the model before quantizing") from error
            deferred = self.calibration_mode == "sequential" and sequential.layer_of(uses) is not None
            plans.append(axis_selectors.WeightPlan(uses, weight, None if deferred else self._hessian(first, statistics)))
        return plans

    def _hessian(self, use: analysis.WeightUse, statistics) -> np.ndarray | None:
        """H of the weight's input: None for embeddings, and for RTN where the statistics do not cover it
        (collected before a pass made this weight); GPTQ and AdaDim cannot do without it."""
        if statistics is None or use.kind == "embedding":
            return None
        try:
            return statistics.for_use(use).hessian
        except KeyError as error:
            if self.needs_calibration:
                raise ValueError(error.args[0]) from error
            return None

    def _share_tied_tables(self, groups: dict[tuple[int, bool], list[analysis.WeightUse]]) -> None:
        """A tied LM head reads Transpose(table): let that Transpose read the quantized table too.

        The table's groups run along D, which for the head's ``B = table^T`` are per-OC groups, so one
        quantized copy serves both and the file holds the table once.
        """
        for key in [key for key, uses in groups.items() if uses[0].kind == "lm_head"]:
            transpose = groups[key][0].weight.producer()
            if transpose is None or transpose.op_type != "Transpose":
                continue
            table_key = (id(transpose.inputs[0]), True)
            if table_key in groups:
                table_uses = groups[table_key]
                table_uses.append(analysis.WeightUse(transpose, transpose.inputs[0], 0, "embedding", table_uses[0].layer))
                del groups[key]
                self.details["tied_lm_heads"] = self.details.get("tied_lm_heads", 0) + 1

    def _skip_reason(self, uses: list[analysis.WeightUse]) -> tuple[analysis.WeightUse, str] | None:
        """The use that keeps this weight in float and why, or None to quantize it."""
        for use in uses:
            if use.kind == "lm_head" and not self.include_lm_head:
                return use, "output head (LM head) left in float by default (Recipe(include_lm_head=True) quantizes it)"
            if use.kind == "embedding" and not self.include_embeddings:
                return use, "embedding table left in float by default (Recipe(include_embeddings=True) quantizes it)"
        for use in uses:
            if use.weight.is_graph_input():
                return use, "also a graph input (a default the caller may override at run time), so it stays in float"
        layouts = {analysis.weight_layout(use.node) for use in uses if use.node.op_type in ("MatMul", "Gemm")}
        if len(layouts) > 1:
            return uses[0], f"shared by nodes that read it in different layouts {sorted(layouts)}"
        for use in uses:
            if use.node.op_type == "Gemm":
                if use.node.attributes.get_int("transA", 0):
                    return use, f"Gemm {use.node.name!r} with transA=1 is not supported"
                bias = use.node.inputs[2] if len(use.node.inputs) > 2 else None
                if bias is not None and bias.const_value is None and use.node.attributes.get_float("beta", 1.0) != 1.0:
                    return use, f"Gemm {use.node.name!r} with a non-constant bias and beta != 1 is not supported"
        return None

    def _candidates(self, plan: axis_selectors.WeightPlan, method: str) -> dict[str, QuantizedWeight]:
        """The weight quantized by ``method`` along every candidate axis (embeddings: along D only, by RTN)."""
        if plan.first.kind == "embedding":  # a Gather reads whole rows
            return {"ic": quantize_rtn(plan.weight, dataclasses.replace(self.scheme, axis="ic", method="rtn"))}
        return {axis: self._quantize(plan, axis, method) for axis in self.candidate_axes}

    def _quantize(self, plan: axis_selectors.WeightPlan, axis: str, method: str) -> QuantizedWeight:
        scheme = dataclasses.replace(self.scheme, axis=axis, method=method)
        if method == "gptq":
            return self._gptq(plan.weight, plan.hessian, scheme)
        channel_weights = None if plan.hessian is None else np.diag(plan.hessian)  # weights the clip search
        return quantize_rtn(plan.weight, scheme, channel_weights)

    def _gptq(self, weight: np.ndarray, hessian: np.ndarray, scheme: QuantScheme) -> QuantizedWeight:
        """GPTQ, retrying with 10x the dampening when the damped Hessian is not positive definite."""
        damp = self.gptq_damp
        for _ in range(4):
            try:
                return quantize_gptq(weight, hessian, scheme, damp=damp, act_order=self.gptq_act_order)
            except ValueError as error:
                if "positive definite" not in str(error):
                    raise
                damp *= 10
        raise ValueError(f"GPTQ failed: the Hessian stays singular up to dampening {damp / 10}")

    def _write(self, graph: ir.Graph, plan: axis_selectors.WeightPlan, axis: str, names: builders.NameAllocator) -> None:
        """Replace the weight by its chosen candidate's QDQ form and record it."""
        first = plan.first
        float_dtype = _weight_type(first)
        try:
            quantized = fit_to_type(plan.candidates[axis], builders.dequantized_type(float_dtype).numpy())
        except ValueError as error:
            raise ValueError(f"weight {first.weight.name!r} of {first.layer!r}: {error}") from error
        reconstructed = quantized.dequantize()
        qdq = builders.dequantize_linear(names.allocate(first.layer, first.weight.name), quantized, float_dtype)
        for initializer in qdq.initializers:
            graph.register_initializer(initializer)
        graph.insert_before(min((use.node for use in plan.uses), key=_position(graph)), qdq.nodes)
        for use in plan.uses:
            if use.node.op_type == "Gemm":
                _replace_gemm(graph, use.node, qdq.output, names)
            else:
                use.node.replace_input_with(use.input_index, qdq.output)
        if first.weight.is_initializer() and not first.weight.uses() and not first.weight.is_graph_output():
            graph.initializers.pop(first.weight.name)
        if plan.choice_errors is not None:  # chosen between other candidates: the written one is measured below
            axis_errors = plan.choice_errors
        else:
            axis_errors = axis_selectors.matrix_errors(plan) if len(plan.candidates) > 1 and plan.hessian is not None else {}
        if plan.choice_errors is None and axis in axis_errors:  # AdaDim already measured the written candidate
            output_error = axis_errors[axis]
        elif plan.hessian is not None:
            output_error = relative_output_error(plan.weight, reconstructed, plan.hessian)
        else:
            output_error = None
        self.weight_records.append(
            WeightRecord(
                name=first.weight.name or "",
                layer=first.layer,
                kind=first.kind,
                shape=list(plan.weight.shape),
                bits=quantized.bits,
                axis=axis,
                group_size=quantized.block_size,
                symmetric=quantized.symmetric,
                method="rtn" if first.kind == "embedding" else self.scheme.method,
                bytes_before=int(plan.weight.size * float_dtype.itemsize),
                bytes_after=qdq.nbytes,
                relative_error=relative_error(plan.weight, reconstructed),
                output_error=output_error,
                axis_errors=axis_errors,
            )
        )


def _weight_type(use: analysis.WeightUse) -> ir.DataType:
    """The weight's float type, also where the file carries no value_info (a tied head's Transpose output)."""
    if use.weight.dtype is not None:
        return use.weight.dtype
    if use.weight.const_value is not None:
        return use.weight.const_value.dtype
    return use.weight.producer().inputs[0].dtype


def _infer_missing_types(model: ir.Model) -> None:
    """Fill in value types and shapes where the file carries none (ONNX shape inference), so that
    subgraphs cut out of the model for the axis selectors have typed inputs and outputs."""
    if all(output.type is not None for node in model.graph for output in node.outputs):
        return
    try:
        ShapeInferencePass()(model)
    except Exception as error:  # noqa: BLE001 - a custom op without inference: name it
        raise ValueError(f"the model carries no value types and ONNX shape inference failed on it: {error}") from error


def _float32_weight(array) -> np.ndarray:
    """The weight in float32 for the math; a double weight past the float32 range is refused, not made Inf."""
    array = np.asarray(array)
    if array.dtype == np.float64 and array.size and np.isfinite(array).all() and np.abs(array).max() > MAX_MAGNITUDE:
        raise ValueError(f"weight has |w| up to {np.abs(array).max():.3g}, beyond half the float32 range in which it is quantized")
    return np.asarray(array, dtype=np.float32)


def _position(graph: ir.Graph):
    order = {id(node): index for index, node in enumerate(graph)}
    return lambda node: order[id(node)]


def _replace_gemm(graph: ir.Graph, gemm: ir.Node, weight: ir.Value, names: builders.NameAllocator) -> None:
    """Gemm(A, B, C) -> MatMul(A, DQ(B')) [+ Add(beta * C)], keeping the output's name."""
    activation = gemm.inputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    matmul = ir.node("MatMul", [activation, weight], name=names.fresh_node(f"{gemm.name}.MatMul"))
    new_nodes = [matmul]
    result = matmul.outputs[0]
    if bias is not None:
        beta = gemm.attributes.get_float("beta", 1.0)
        if beta != 1.0:
            scaled = ir.tensor(bias.const_value.numpy() * np.asarray(beta, dtype=bias.dtype.numpy()))
            name = names.fresh(f"{gemm.name}.bias")  # the Gemm's own bias may already carry that name
            bias = ir.Value(name=name, shape=bias.shape, type=bias.type, const_value=scaled)
            graph.register_initializer(bias)
        matmul.outputs[0].name = names.fresh(f"{gemm.name}.MatMul_out")
        add = ir.node("Add", [result, bias], name=names.fresh_node(f"{gemm.name}.Add"))
        new_nodes.append(add)
        result = add.outputs[0]
    old_output = gemm.outputs[0]
    result.type, result.shape = old_output.type, old_output.shape
    graph.insert_before(gemm, new_nodes)
    ir.convenience.replace_all_uses_with(old_output, result, replace_graph_outputs=True)
    output_name = old_output.name
    graph.remove(gemm, safe=True)
    result.name = output_name


def _unsupported_ops(model: ir.Model, opset: int) -> list[str]:
    """'<op> node <name>' for every default-domain node (subgraphs included) whose op does not exist in
    ``opset`` or is deprecated there (Upsample past 9, Scatter past 10): ONNX Runtime refuses those."""
    found = []
    for graph in model.graphs():
        for node in graph:
            if node.domain not in analysis.DEFAULT_DOMAINS:
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                found.append(f"{node.op_type} node {node.name!r} (no such op in opset {opset})")
                continue
            if schema.deprecated:
                found.append(f"{node.op_type} node {node.name!r} (deprecated since opset {schema.since_version})")
    return found


def _check_convertible(model: ir.Model, target: int) -> None:
    """Refuse a model whose ops do not exist in the storage opset ``target`` (when it must be raised to it)."""
    current = analysis.default_opset(model)
    if current is not None and current >= target:
        return
    unsupported = _unsupported_ops(model, target)
    if unsupported:
        raise ValueError(
            f"the quantized weights need opset {target} (the model has {current}), and these ops do not exist there "
            f"(ONNX Runtime would refuse the file): {'; '.join(unsupported[:5])}; replace them (e.g. Upsample by Resize, "
            "Scatter by ScatterElements) before quantizing"
        )


#: Ops whose ``axes`` attribute became an input, and the opset where it did (onnxscript's version
#: converter only raises the opset number of these; ONNX Runtime then refuses the attribute).
_AXES_TO_INPUT = {
    **dict.fromkeys(
        ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
         "ReduceLogSumExp", "ReduceSumSquare"),
        18,
    ),
    "ReduceSum": 13,
    "Squeeze": 13,
    "Unsqueeze": 13,
}


def _adapt_signatures(model: ir.Model, current: int, target: int) -> None:
    """Rewrite the nodes whose signature changed between ``current`` and ``target`` and that onnxscript's
    converter leaves as they are: ``axes`` attributes that became inputs, Split's ``split`` attribute
    (an input from 13) and its ``num_outputs`` (required without ``split`` from 18)."""
    names = builders.NameAllocator(model.graph)
    for graph in model.graphs():
        for node in list(graph):
            if node.domain != "":
                continue
            if node.op_type in _AXES_TO_INPUT and current < _AXES_TO_INPUT[node.op_type] <= target:
                _attribute_to_input(graph, node, "axes", 1, names)
            elif node.op_type == "Split":
                if current < 13 <= target:
                    _attribute_to_input(graph, node, "split", 1, names)
                split_given = len(node.inputs) > 1 and node.inputs[1] is not None
                if current < 18 <= target and not split_given and "num_outputs" not in node.attributes:
                    node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))


def _attribute_to_input(graph: ir.Graph, node: ir.Node, attribute: str, index: int, names: builders.NameAllocator) -> None:
    """Move an int-list attribute of ``node`` to input ``index`` (a Constant node before it)."""
    value = node.attributes.pop(attribute, None)
    if value is None:
        return
    constant = ir.node(
        "Constant", [], attributes={"value": ir.tensor(np.asarray(value.as_ints(), dtype=np.int64))},
        name=names.fresh_node(f"{node.name or node.op_type}.{attribute}"),
    )
    constant.outputs[0].name = names.fresh(f"{node.name or node.op_type}.{attribute}")
    graph.insert_before(node, constant)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, constant.outputs[0])


def _invalid_nodes(model: ir.Model, opset: int) -> list[str]:
    """'<op> node <name>: <complaint>' of the default-domain nodes onnx.checker refuses at ``opset``."""
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version or onnx.IR_VERSION
    context.opset_imports = {"": opset}
    found = []
    for graph in model.graphs():
        for node in graph:
            if node.domain != "" or analysis.subgraphs(node):  # a subgraph's own nodes are visited as well
                continue
            try:
                onnx.checker.check_node(ir.serde.serialize_node(node), context)
            except onnx.checker.ValidationError as error:
                found.append(f"{node.op_type} node {node.name!r}: {str(error).strip().splitlines()[0]}")
    return found


def _require_storage_support(model: ir.Model, bits: int) -> None:
    """Raise the default-domain opset and IR version to what the quantized storage types need, and check
    that every node's op exists in that opset."""
    target = builders.required_opset(bits)
    analysis.normalize_default_domain(model)
    current = model.opset_imports.get("", None)
    if current is None or current < target:
        try:
            if current is not None:
                _adapt_signatures(model, current, target)
            onnxscript.version_converter.convert_version(model, target)
        except Exception as error:  # the converter raises many types; name the cause
            raise ValueError(f"could not convert the model from opset {current} to {target}: {error}") from error
        model.opset_imports[""] = max(model.opset_imports.get("", target), target)
        invalid = _unsupported_ops(model, model.opset_imports[""]) or _invalid_nodes(model, model.opset_imports[""])
        if invalid:
            raise ValueError(
                f"converting the model from opset {current} to {target} left nodes that opset does not accept "
                f"(ONNX Runtime would refuse the file): {'; '.join(invalid[:5])}"
            )
    model.ir_version = max(model.ir_version or 0, builders.required_ir_version(bits))
