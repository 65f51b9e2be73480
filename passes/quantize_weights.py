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
with the model (``runtime.calibration.calibration_of``). ``calibration_mode="sequential"`` quantizes decoder layers one after another, each
with statistics taken on the model whose earlier layers are already quantized (``passes/sequential.py``);
its selectors judge a layer's modules on those partially-quantized inputs too. Statistics the pipeline collected
itself (``owns_statistics``) lose each Hessian as soon as the candidates and their output errors are made, before
the AdaDim subgraphs run and the weights are written, where nothing reads it again (``_releases_hessians``).

Weights of any float type are quantized (bfloat16 and double in float32, written as a float32
DequantizeLinear and a Cast back to the weight's type; float16 with float16 scales, the codes kept where
their reconstruction is finite in float16: ``rtn.fit_to_type``). Every other MatMul/Gemm by a constant
(in a subgraph, computed at run time, not 2-D, ...) is listed in the report as left in float, with why.

The model's default-domain opset is raised to what the storage types need (21, or 25 for 2-bit) with
onnxscript's version converter, and its IR version to 10 (11 for 2-bit); a model with an op that does not
exist (or is deprecated) in that opset, which the converter cannot replace, is refused before anything is
written (ValueError naming the node).

This file is the orchestration; the jobs live beside it: ``quantize_plan`` (which weights, tied tables, the
skip policy), ``quantize_candidates`` (candidates per axis, the GPTQ dampening retry, the axis choice),
``quantize_write`` (the QDQ form in the graph, the report record), ``gemm_to_matmul`` and
``storage_opset`` (the opset checks and conversion).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx_ir as ir

from lowbit.ir import analysis, builders
from lowbit.passes import axis_selectors, sequential
from lowbit.passes.base import LowbitPass
from lowbit.passes.quant.scheme import CALIBRATION_MODES, GROUP_AXES, METHODS, QuantScheme
from lowbit.passes.quantize_candidates import CandidateQuantizer, choose, quantize_chosen
from lowbit.passes.quantize_plan import (
    BudgetChoice,
    ChooseWidth,
    SizeBudget,
    SkipPolicy,
    UnmeasuredLayerWeight,
    WidthTable,
    choose_within_budget,
    measure_whole,
    plan_weights,
)
from lowbit.passes.quantize_write import write_weight
from lowbit.passes.report import WeightRecord
from lowbit.passes.sensitivity import OutputSensitivity
from lowbit.passes.storage_opset import check_convertible, require_storage_support
from lowbit.runtime.calibration import CalibrationStats, calibration_of, collect
from lowbit.runtime.session import ORT_ERRORS


class QuantizeWeightsPass(LowbitPass):
    """Quantize weights to ``scheme`` (RTN or GPTQ; fixed axis or AdaDim) as blocked DequantizeLinear + MatMul."""

    def __init__(
        self,
        scheme: QuantScheme,
        *,
        candidate_axes: tuple[str, ...] | None = None,
        selector: str = "block",
        include_lm_head: bool = False,
        include_embeddings: bool = False,
        head_bits: int | None = None,
        gptq_damp: float = 0.01,
        gptq_act_order: bool = True,
        calibration_mode: str = "parallel",
        choice_method: str | None = None,
        budget: SizeBudget | None = None,
        owns_statistics: bool = False,
        calibrate_by_layer: bool = False,
    ):
        """``choice_method``: the method whose candidates the AdaDim selector compares (``"rtn"``: choose the
        axis by RTN error, then run ``scheme.method`` on the chosen axis only, as the AdaDim paper does);
        None: ``scheme.method`` on every candidate axis. ``budget``: choose each weight's width among
        ``budget.widths`` (``quantize_plan.choose_within_budget``; ``scheme.bits`` then serves weights
        without calibration statistics only; with ``calibration_mode="sequential"`` the widths are chosen on
        the parallel statistics and the sweep quantizes each layer again at them). ``head_bits``: the width of LM heads and embedding tables
        (default: ``scheme.bits``). ``owns_statistics``: the calibration statistics are the pipeline's own (its
        calibration pass collected them), so their Hessians may be dropped once read (``_releases_hessians``);
        statistics a caller passed in must stay whole, they may serve other recipes. ``calibrate_by_layer`` (parallel
        mode): the decoder layers' statistics are taken one layer at a time on the float model
        (``sequential.LayerSweep``'s float stream: the calibration pass keeps the feeds and collects only the other
        weights' statistics, ``parallel_activations``) and each layer is written as soon as it is quantized, so
        that one layer's Hessians, candidates and float weights are alive at a time instead of every layer's; a
        graph the sweep cannot cut between its layers is calibrated whole (``by_layer_refused`` says why). Under a
        budget the layers are swept twice: once to measure every width (each layer's candidates let go once
        measured), then, the widths allocated, again to quantize each weight at its width and axis and write it."""
        super().__init__()
        if calibrate_by_layer and calibration_mode != "parallel":
            raise ValueError("calibrate_by_layer takes the parallel mode's statistics")
        self.calibrate_by_layer = calibrate_by_layer
        #: Why this graph's layers could not be calibrated one at a time (``parallel_activations``), or None.
        self.by_layer_refused: str | None = None
        self.owns_statistics = owns_statistics
        self.budget = budget
        if choice_method not in (None, *METHODS):
            raise ValueError(f"choice_method must be None or one of {METHODS}, got {choice_method!r}")
        self.choice_method = choice_method or scheme.method
        if calibration_mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration_mode must be one of {CALIBRATION_MODES}, got {calibration_mode!r}")
        self.calibration_mode = calibration_mode
        self.candidate_axes = candidate_axes or (scheme.group_axis,)
        if not set(self.candidate_axes) <= set(GROUP_AXES):
            raise ValueError(f"candidate_axes must be drawn from {GROUP_AXES}, got {self.candidate_axes}")
        self.scheme = scheme
        self.selector = axis_selectors.make_selector(selector)
        if head_bits is not None and budget is not None:
            raise ValueError("head_bits and a budget exclude each other: the budget chooses the head's width too")
        self.quantizer = CandidateQuantizer(scheme, self.candidate_axes, gptq_damp, gptq_act_order, head_bits)
        self.policy = SkipPolicy(include_lm_head, include_embeddings)

    @property
    def needs_calibration(self) -> bool:
        sequential = self.calibration_mode == "sequential"
        return self.scheme.method == "gptq" or len(self.candidate_axes) > 1 or sequential or self.budget is not None

    def calibration_use(self) -> str:
        return f"method={self.scheme.method!r} with axes {self.candidate_axes} in {self.calibration_mode} mode"

    @property
    def _runs_subgraphs(self) -> bool:
        """Whether the axis choice runs subgraphs (the block and layer selectors)."""
        return self.selector is not None and len(self.candidate_axes) > 1

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        statistics = calibration_of(model)
        planning = plan_weights(model.graph, self.policy, lambda uses: self._hessian(uses, statistics))
        plans, self.skipped = planning.plans, planning.skipped
        if self.calibrate_by_layer and self.by_layer_refused is not None:
            self.details["by_layer_refused"] = self.by_layer_refused
        release = self._releases_hessians and statistics is not None
        if release:  # the plans now hold the only references: each drops its own once measured (``choose``)
            for accumulator in statistics.by_activation.values():
                accumulator.release()
        if planning.tied_lm_heads:
            self.details["tied_lm_heads"] = planning.tied_lm_heads
        if plans:  # refuse before changing anything when the storage opset cannot hold the model
            check_convertible(model, builders.required_opset(min(self._widths)))
            kl_budget = self.budget is not None and self.budget.sensitivity == "kl"
            if self._runs_subgraphs or self.calibration_mode == "sequential" or self._by_layer or kl_budget:
                # the selectors, the sweeps and the budget's sensitivity cut subgraphs
                sequential.infer_missing_types(model)
        budget = None
        samples = statistics.samples if statistics is not None else []
        if self.budget is not None and plans:
            budget = self._choose_budget(model, plans, statistics, samples)
            choices = budget.axes
            self.details["budget"] = budget.details
            if self.calibration_mode == "sequential":  # the widths stay; the layers are quantized again in order
                choices = self._choose_sequentially(model, plans, statistics, budget.bits)
        elif self.calibration_mode == "sequential" and plans:  # no weight: nothing to sweep
            choices = self._choose_sequentially(model, plans, statistics)
        elif not (self._by_layer and plans):
            choices = self._choose(model, plans, samples, release_hessians=release)
        if plans:
            analysis.normalize_default_domain(model)
        names = builders.NameAllocator(model.graph)
        if self._by_layer and plans:
            self.weight_records.extend(self._write_by_layer(model, plans, statistics, names, budget))
        else:
            for plan, axis in zip(plans, choices):
                self.weight_records.append(write_weight(model.graph, plan, axis, names, self.scheme.method))
        if budget is not None:
            budget.annotate(self.weight_records)
        modified = bool(self.weight_records)
        if modified:
            require_storage_support(model, min(record.bits for record in self.weight_records))
        self.details.update({"quantized": len(self.weight_records), "skipped": len(self.skipped)})
        return ir.passes.PassResult(model, modified=modified)

    @property
    def _widths(self) -> tuple[int, ...]:
        """The bit widths this pass may write."""
        widths = (self.scheme.bits,) if self.budget is None else (self.scheme.bits, *self.budget.widths)
        return widths if self.quantizer.head_bits is None else (*widths, self.quantizer.head_bits)

    @property
    def _releases_hessians(self) -> bool:
        """Whether H is read once, by the candidates and their measures, so that it may be dropped after: the
        pipeline's own statistics, without a budget (it quantizes at every width), a sequential sweep or another
        method choosing the axis (the chosen axis is quantized again)."""
        return (
            self.owns_statistics
            and self.budget is None
            and self.calibration_mode == "parallel"
            and self.choice_method == self.scheme.method
        )

    def _choose(
        self,
        model: ir.Model | None,
        plans: list[axis_selectors.WeightPlan],
        samples,
        bits: int | None = None,
        release_hessians: bool = False,
    ) -> list[str]:
        """Quantize ``plans`` (at ``bits``, default the scheme's) along every candidate axis and choose one axis
        each (selector details summed; without a model to run, the ``matrix`` choice); ``release_hessians``: as
        ``quantize_candidates.choose``."""
        quantizer = self.quantizer
        if bits is not None:
            quantizer = dataclasses.replace(quantizer, scheme=dataclasses.replace(quantizer.scheme, bits=bits))
        choices, selection = choose(
            quantizer,
            plans,
            choice_method=self.choice_method,
            method=self.scheme.method,
            selector=self.selector if self._runs_subgraphs else None,
            model=model,
            samples=samples,
            release_hessians=release_hessians,
        )
        if selection is not None:
            summed = self.details.setdefault("selection", {})
            for key, value in selection.items():
                summed[key] = summed.get(key, 0) + value
        return choices

    def _choose_budget(
        self, model: ir.Model, plans: list[axis_selectors.WeightPlan], statistics, samples
    ) -> BudgetChoice:
        """``choose_within_budget`` on the statistics at hand; calibrating by layer, its widths are measured in a
        sweep of the layers (``_measure_by_layer``), or, where the sweep refuses the graph's calibration inputs or a
        layer holds a weight the end-to-end sensitivity cannot measure, on every layer's statistics collected whole
        (``by_layer_refused`` says why)."""

        def choose_width(bits: int, chosen: list[axis_selectors.WeightPlan]) -> list[str]:
            return self._choose(model, chosen, samples, bits)

        layers, _ = sequential.group_layers(plans)
        swept = frozenset(index for layer in layers for index in layer.indices)
        if not self._by_layer or not swept:
            return choose_within_budget(model, plans, self.budget, choose_width, self.scheme.bits, samples)
        try:
            return choose_within_budget(
                model,
                plans,
                self.budget,
                choose_width,
                self.scheme.bits,
                samples,
                measure=functools.partial(self._measure_by_layer, model, plans, statistics, choose_width, swept),
                deferred=swept,
            )
        except (sequential.StreamTooLarge, UnmeasuredLayerWeight) as error:
            self.by_layer_refused = self.details["by_layer_refused"] = f"{error} (calibrated whole instead)"
        self._collect_whole(model, plans, statistics, sorted(swept))
        return choose_within_budget(model, plans, self.budget, choose_width, self.scheme.bits, samples)

    def _measure_by_layer(
        self,
        model: ir.Model,
        plans: list[axis_selectors.WeightPlan],
        statistics: CalibrationStats,
        choose_width: ChooseWidth,
        swept: frozenset[int],
        indices: list[int],
        sensitivity: OutputSensitivity | None,
    ) -> WidthTable:
        """A budget's ``MeasureTable`` that measures the decoder layers' weights in a sweep of the float model: each
        layer calibrated, its weights measured at every width (and end to end), then its candidates and Hessians
        let go; the other weights on the parallel statistics."""
        position_of = {index: position for position, index in enumerate(indices)}
        rest = [index for index in indices if index not in swept]
        parts = []
        if rest:
            parts.append(
                (
                    rest,
                    measure_whole(plans, self.budget, choose_width, rest, sensitivity, [position_of[i] for i in rest]),
                )
            )

        def quantize(layer: sequential.Layer, step: sequential.LayerStep) -> dict[str, np.ndarray]:
            layer_model = step.model if self._runs_subgraphs else None

            def choose_layer_width(bits: int, chosen: list[axis_selectors.WeightPlan]) -> list[str]:
                return self._choose(layer_model, chosen, step.samples, bits)

            rows = [position_of[index] for index in layer.indices]
            parts.append(
                (layer.indices, measure_whole(plans, self.budget, choose_layer_width, layer.indices, sensitivity, rows))
            )
            parts[-1][1].let_go()
            for index in layer.indices:
                plans[index].hessian = None
            return {}

        self._sweep(model, plans, statistics, quantize, "float")
        return WidthTable.joined(parts, indices)

    def _choose_at_widths(
        self, model: ir.Model | None, plans: list[axis_selectors.WeightPlan], samples, widths: list[int] | None
    ) -> list[str]:
        """``_choose`` with a width per plan (None: the scheme's for all), one call per width."""
        if widths is None:
            return self._choose(model, plans, samples)
        choices: list[str | None] = [None] * len(plans)
        for bits in sorted(set(widths)):
            positions = [position for position, width in enumerate(widths) if width == bits]
            for position, axis in zip(positions, self._choose(model, [plans[p] for p in positions], samples, bits)):
                choices[position] = axis
        return choices

    def _choose_sequentially(
        self,
        model: ir.Model,
        plans: list[axis_selectors.WeightPlan],
        statistics,
        widths: list[int] | None = None,
    ) -> list[str]:
        """Decoder layers in graph order on sequential statistics, then the other weights on the parallel ones;
        ``widths``: each plan's width (a budget's choice), else the scheme's."""
        choices: list[str | None] = [None] * len(plans)

        def quantize(layer: sequential.Layer, step: sequential.LayerStep) -> dict[str, np.ndarray]:
            layer_plans = [plans[i] for i in layer.indices]
            layer_widths = None if widths is None else [widths[i] for i in layer.indices]
            layer_model = step.model if self._runs_subgraphs else None
            layer_choices = self._choose_at_widths(layer_model, layer_plans, step.samples, layer_widths)
            for index, axis in zip(layer.indices, layer_choices):
                choices[index] = axis
            return {plan.first.weight.name: plan.session_input(axis) for plan, axis in zip(layer_plans, layer_choices)}

        rest = self._sweep(model, plans, statistics, quantize, "quantized")
        rest_widths = None if widths is None else [widths[i] for i in rest]
        for index, axis in zip(
            rest, self._choose_at_widths(model, [plans[i] for i in rest], statistics.samples, rest_widths)
        ):
            choices[index] = axis
        return choices

    def _write_by_layer(
        self,
        model: ir.Model,
        plans: list[axis_selectors.WeightPlan],
        statistics: CalibrationStats,
        names: builders.NameAllocator,
        budget: BudgetChoice | None = None,
    ) -> list[WeightRecord]:
        """Decoder layers calibrated on the float model, quantized and written one after another, each layer's
        Hessians, candidates and float weights let go once it is written; then the other weights on the
        parallel statistics. ``budget``: its widths and axes, measured in an earlier sweep (the layers' weights
        are quantized again at them; the others hold their candidates). Returns the records in the plans' order."""
        records: list[WeightRecord | None] = [None] * len(plans)
        release = self.choice_method == self.scheme.method

        def write(indices: list[int], axes: list[str]) -> None:
            for index, axis in zip(indices, axes):
                records[index] = write_weight(model.graph, plans[index], axis, names, self.scheme.method)
                plans[index].release_arrays()

        def choose_axes(layer_model: ir.Model | None, indices: list[int], samples) -> list[str]:
            if budget is None:
                return self._choose(layer_model, [plans[i] for i in indices], samples, release_hessians=release)
            axes, widths = [budget.axes[i] for i in indices], [budget.bits[i] for i in indices]
            quantize_chosen(self.quantizer, [plans[i] for i in indices], axes, widths, self.scheme.method)
            return axes

        def quantize(layer: sequential.Layer, step: sequential.LayerStep) -> dict[str, np.ndarray]:
            write(layer.indices, choose_axes(step.model if self._runs_subgraphs else None, layer.indices, step.samples))
            return {}

        layers, rest = sequential.group_layers(plans)
        # The other weights' axes are chosen on the float model, before the sweep writes the layers into it.
        if budget is None:
            rest_axes = self._choose(model, [plans[i] for i in rest], statistics.samples, release_hessians=release)
        else:
            rest_axes = [budget.axes[i] for i in rest]
        swept = [index for layer in layers for index in layer.indices]
        try:
            self._sweep(model, plans, statistics, quantize, "float")
        except sequential.StreamTooLarge as error:
            if any(record is not None for record in records):  # a later layer's inputs grew: too late to go back
                raise
            self.by_layer_refused = self.details["by_layer_refused"] = f"{error} (calibrated whole instead)"
            self._collect_whole(model, plans, statistics, swept)
            write(swept, choose_axes(model, swept, statistics.samples))
        write(rest, rest_axes)
        return records

    @staticmethod
    def _collect_whole(model: ir.Model, plans, statistics: CalibrationStats, indices: list[int]) -> None:
        """Give ``plans[indices]`` the Hessians of the whole float model (a calibration run for their inputs)."""
        inputs = {plans[i].first.node.inputs[0].name for i in indices}
        whole = collect(model, statistics.feeds, only=inputs, keep_samples=0)
        for index in indices:
            plans[index].hessian = whole.for_use(plans[index].first).hessian
        for accumulator in whole.by_activation.values():  # the plans hold the only references (``choose``)
            accumulator.release()

    def _sweep(
        self,
        model: ir.Model,
        plans: list[axis_selectors.WeightPlan],
        statistics: CalibrationStats,
        quantize: sequential.LayerQuantizer,
        stream: str,
    ) -> list[int]:
        """Run ``quantize`` on the decoder layers in graph order (``sequential.LayerSweep`` on ``stream``); returns
        the indices of the plans outside them, which the sweep leaves to the caller."""
        if statistics is None or statistics.feeds is None:
            raise ValueError(
                f"calibrating {'layer by layer' if stream == 'float' else 'sequentially'} runs the calibration feeds "
                "again: pass the batches to optimize(), or statistics collected with collect(..., keep_feeds=True)"
            )
        layers, rest = sequential.group_layers(plans)
        stream_bytes = []
        if layers:
            sweep = sequential.LayerSweep(
                model,
                plans,
                layers,
                statistics.feeds,
                selector_samples=len(statistics.samples),
                stream=stream,
            )
            try:
                sweep.run(quantize)
            except ORT_ERRORS as error:  # e.g. feeds of the wrong shapes, met here first when no parallel pass ran
                raise ValueError(
                    f"calibration by layer: ONNX Runtime cannot run a layer on the calibration feeds: {error}"
                ) from error
            stream_bytes = sweep.stream_bytes
            self.details.update({f"seconds_{part}": seconds for part, seconds in sweep.seconds.items()})
        self.details["calibration"] = {
            "mode": self.calibration_mode,
            "layers": len(layers),
            "stream_mb": max(stream_bytes, default=0) / 2**20,
            "parallel_statistics": [plans[i].first.layer for i in rest if plans[i].hessian is not None],
        }
        return rest

    def parallel_activations(self, graph: ir.Graph) -> set[str]:
        """The activations whose parallel statistics this pass reads: the inputs of the weights it quantizes,
        in sequential mode without a budget only of those outside decoder layers (the sweep measures the rest
        itself)."""
        groups: dict[int, list[analysis.WeightUse]] = {}
        for use in analysis.weight_uses(graph):
            if use.kind != "embedding":
                groups.setdefault(id(use.weight), []).append(use)
        quantized = [uses for uses in groups.values() if self.policy.reason(uses) is None]
        if self.calibrate_by_layer:
            self.by_layer_refused = sequential.unsweepable(graph, quantized)
        return {
            uses[0].node.inputs[0].name
            for uses in quantized
            if self._reads_parallel_statistics or sequential.layer_of(uses) is None
        }

    @property
    def _reads_parallel_statistics(self) -> bool:
        """Whether decoder layers read the parallel statistics: in parallel mode unless calibrated layer by layer,
        and under a budget in sequential mode (its widths are chosen on them before the sweep quantizes the layers
        again)."""
        return not self._by_layer and (self.calibration_mode == "parallel" or self.budget is not None)

    @property
    def _by_layer(self) -> bool:
        """Whether the decoder layers are calibrated and written one at a time (``calibrate_by_layer``, where the
        graph allows it)."""
        return self.calibrate_by_layer and self.by_layer_refused is None

    def _hessian(self, uses: list[analysis.WeightUse], statistics: CalibrationStats | None) -> np.ndarray | None:
        """H of the weight's input: None for embeddings, for the decoder layers that the sequential sweep
        measures itself, and for RTN where the statistics do not cover it (collected before a pass made this
        weight); GPTQ and AdaDim cannot do without it."""
        use = uses[0]
        if not self._reads_parallel_statistics and sequential.layer_of(uses) is not None:
            return None  # deferred: the sweep's statistics
        if statistics is None or use.kind == "embedding":
            return None
        try:
            return statistics.for_use(use).hessian
        except KeyError as error:
            if self.needs_calibration:
                raise ValueError(error.args[0]) from error
            return None
