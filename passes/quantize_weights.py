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

The model's default-domain opset is raised to what the storage types need (21, or 25 for 2-bit) with
onnxscript's version converter, and its IR version to 10 (11 for 2-bit).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxscript.version_converter
from tqdm.auto import tqdm

from lowbit.ir import analysis, builders
from lowbit.ir.scheme import GROUP_AXES, METHODS, QuantScheme
from lowbit.passes import axis_selectors, sequential
from lowbit.passes.capture_calibration import CALIBRATION_KEY, ORT_ERRORS
from lowbit.passes.quant.adadim import relative_output_error
from lowbit.passes.quant.gptq import quantize_gptq
from lowbit.passes.quant.rtn import QuantizedWeight, check_weight, quantize_rtn, relative_error
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
        if self.calibration_mode == "sequential" and plans:  # no weight: nothing to sweep
            choices = self._choose_sequentially(model, plans, statistics)
        else:
            choices = self._choose(model, plans, statistics.samples if statistics is not None else [])
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
            return {plan.first.weight.name: plan.candidates[axis].dequantize() for plan, axis in zip(layer_plans, layer_choices)}

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
        for use in analysis.weight_uses(graph):
            groups.setdefault((id(use.weight), use.kind == "embedding"), []).append(use)
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
            weight = np.asarray(analysis.weight_value_array(first), dtype=np.float32)
            if first.node.op_type == "Gemm":
                weight = analysis.gemm_weight_kn(first.node, weight)
            try:
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
        first, quantized = plan.first, plan.candidates[axis]
        reconstructed = quantized.dequantize()
        float_dtype = first.weight.dtype
        qdq = builders.dequantize_linear(names.allocate(first.layer, first.weight.name), quantized, float_dtype)
        for initializer in qdq.initializers:
            graph.register_initializer(initializer)
        graph.insert_before(min((use.node for use in plan.uses), key=_position(graph)), qdq.node)
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


def _position(graph: ir.Graph):
    order = {id(node): index for index, node in enumerate(graph)}
    return lambda node: order[id(node)]


def _replace_gemm(graph: ir.Graph, gemm: ir.Node, weight: ir.Value, names: builders.NameAllocator) -> None:
    """Gemm(A, B, C) -> MatMul(A, DQ(B')) [+ Add(beta * C)], keeping the output's name."""
    activation = gemm.inputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    matmul = ir.node("MatMul", [activation, weight], name=f"{gemm.name}.MatMul")
    new_nodes = [matmul]
    result = matmul.outputs[0]
    if bias is not None:
        beta = gemm.attributes.get_float("beta", 1.0)
        if beta != 1.0:
            scaled = ir.tensor(bias.const_value.numpy() * np.asarray(beta, dtype=bias.dtype.numpy()))
            name = names.fresh(f"{gemm.name}.bias")  # the Gemm's own bias may already carry that name
            bias = ir.Value(name=name, shape=bias.shape, type=bias.type, const_value=scaled)
            graph.register_initializer(bias)
        add = ir.node("Add", [result, bias], name=f"{gemm.name}.Add")
        new_nodes.append(add)
        result = add.outputs[0]
    old_output = gemm.outputs[0]
    result.type, result.shape = old_output.type, old_output.shape
    graph.insert_before(gemm, new_nodes)
    ir.convenience.replace_all_uses_with(old_output, result, replace_graph_outputs=True)
    output_name = old_output.name
    graph.remove(gemm, safe=True)
    result.name = output_name


def _require_storage_support(model: ir.Model, bits: int) -> None:
    """Raise the default-domain opset and IR version to what the quantized storage types need."""
    target = builders.required_opset(bits)
    current = model.opset_imports.get("", None)
    if current is None or current < target:
        try:
            onnxscript.version_converter.convert_version(model, target)
        except Exception as error:  # the converter raises many types; name the cause
            raise RuntimeError(f"could not convert the model from opset {current} to {target}: {error}") from error
        model.opset_imports[""] = max(model.opset_imports.get("", target), target)
    model.ir_version = max(model.ir_version or 0, builders.required_ir_version(bits))
