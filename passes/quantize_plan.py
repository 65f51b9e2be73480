"""Which weights QuantizeWeightsPass quantizes: one ``WeightPlan`` per weight, the skip policy (why a
weight stays in float), tied tables, and the bit width of each weight under a size budget. No graph change
here; the pass writes the plans afterwards.

A weight shared by several MatMuls is planned once. An embedding table and its tied LM head (the head
reads ``Transpose(table)``) become one plan when both are opted in: the table's groups run along D,
which for the head's ``B = table^T`` are per-OC groups, so one quantized copy serves both.

Under a budget (``choose_within_budget``) every weight with calibration statistics is quantized at every
width of ``SizeBudget.widths`` (each width's axis chosen as without a budget), its output error
``trace(dW^T H dW)`` and its stored bytes measured, and ``allocate`` picks one width per weight. With
``SizeBudget.sensitivity="kl"`` the errors it minimises are measured at the model's output instead
(``passes/sensitivity.py``: KL of the logits, or the relative squared error of a non-distribution output,
with only that weight quantized); weights a feed cannot replace keep the recipe's width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from lowbit.ir import analysis, builders, files
from lowbit.kernels import packing
from lowbit.kernels.model import storage_scales
from lowbit.passes.axis_selectors import WeightPlan, matrix_errors, weight_source
from lowbit.passes.quant import allocate
from lowbit.passes.quant.rtn import MAX_MAGNITUDE, QuantizedWeight, check_weight
from lowbit.passes.quant.scheme import SUPPORTED_BITS
from lowbit.passes.quantize_write import weight_type
from lowbit.passes.report import SkippedWeight, WeightRecord
from lowbit.passes.sensitivity import MEASURES, OutputSensitivity
from lowbit.passes.split_outliers import fused_outlier_bytes

#: Uses grouped by (weight value id, is an embedding read): one plan (or one skip) per group.
UseGroups = dict[tuple[int, bool], list[analysis.WeightUse]]


@dataclasses.dataclass(frozen=True)
class SkipPolicy:
    """Which weights stay in float: heads and embedding tables unless opted in, and the uses lowbit cannot
    rewrite (a graph input, layouts that disagree, Gemm forms)."""

    include_lm_head: bool = False
    include_embeddings: bool = False

    def reason(self, uses: list[analysis.WeightUse]) -> tuple[analysis.WeightUse, str] | None:
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


@dataclasses.dataclass
class TiedTablePlan(WeightPlan):
    """An embedding table ``[V, D]`` that an LM head also reads (as ``Transpose(table)``): one set of codes for
    both, grouped along D. ``head_hessian``: H ``[D, D]`` of the head's input (None without calibration), with
    which GPTQ weighs the head's error against the table's (``quant.tied``)."""

    head_hessian: np.ndarray | None = None

    @property
    def tied_head_hessian(self) -> np.ndarray | None:
        return self.head_hessian


@dataclasses.dataclass
class Planning:
    """What planning found: the plans, the weights left in float (report order) and the tied heads merged."""

    plans: list[WeightPlan]
    skipped: list[SkippedWeight]
    tied_lm_heads: int = 0


def weight_groups(graph: ir.Graph) -> UseGroups:
    """Every weight use of ``graph`` grouped by weight (embedding reads apart from MatMul reads)."""
    groups: UseGroups = {}
    for use in analysis.weight_uses(graph):
        groups.setdefault((id(use.weight), use.kind == "embedding"), []).append(use)
    return groups


def plan_weights(
    graph: ir.Graph,
    policy: SkipPolicy,
    hessian: Callable[[list[analysis.WeightUse]], np.ndarray | None],
) -> Planning:
    """One plan per weight to quantize (shared weights once), each with ``hessian(uses)`` (None: without
    calibration statistics, or deferred to the sequential sweep); the others in ``skipped``, with why:
    first every constant MatMul/Gemm operand ``weight_uses`` does not offer, then the policy's refusals."""
    groups = weight_groups(graph)
    skipped = []
    offered = {id(use.node) for uses in groups.values() for use in uses}
    for node, weight, reason in analysis.unquantizable_weights(graph, offered):
        kind = "gemm" if node.op_type == "Gemm" else "matmul"
        skipped.append(SkippedWeight(weight.name or "", analysis.module_path(node), kind, reason))
    heads = share_tied_tables(groups) if policy.include_embeddings and policy.include_lm_head else {}
    plans = []
    for key, uses in groups.items():
        skip = policy.reason(uses)
        if skip is not None:
            culprit, reason = skip
            skipped.append(SkippedWeight(culprit.weight.name or "", culprit.layer, culprit.kind, reason))
            continue
        weight = weight_source(uses[0], checked_weight)  # a lazy one read when its layer is quantized
        if key in heads:
            plans.append(TiedTablePlan(uses, weight, None, head_hessian=hessian(heads[key])))
        else:
            plans.append(WeightPlan(uses, weight, hessian(uses)))
    return Planning(plans, skipped, len(heads))


def checked_weight(use: analysis.WeightUse) -> np.ndarray:
    """The weight of ``use`` as ``[K, N]`` float32, refused (naming it) where it cannot be quantized."""
    try:
        weight = float32_weight(analysis.weight_value_array(use))
        if use.node.op_type == "Gemm":
            weight = analysis.gemm_weight_kn(use.node, weight)
        check_weight(weight)
    except ValueError as error:
        raise ValueError(
            f"weight {use.weight.name!r} of {use.layer!r}: {error}; fix the model before quantizing"
        ) from error
    return weight


def share_tied_tables(groups: UseGroups) -> dict[tuple[int, bool], list[analysis.WeightUse]]:
    """A tied LM head reads Transpose(table): let that Transpose read the quantized table too (the head's
    group joins the table's). Returns the merged heads' uses by the key of their table's group."""
    heads = {}
    for key in [key for key, uses in groups.items() if uses[0].kind == "lm_head"]:
        transpose = groups[key][0].weight.producer()
        if transpose is None or transpose.op_type != "Transpose":
            continue
        table_key = (id(transpose.inputs[0]), True)
        if table_key in groups:
            table_uses = groups[table_key]
            table_uses.append(analysis.WeightUse(transpose, transpose.inputs[0], 0, "embedding", table_uses[0].layer))
            heads[table_key] = groups.pop(key)
    return heads


def float32_weight(array) -> np.ndarray:
    """The weight in float32 for the math; a double weight past the float32 range is refused, not made Inf."""
    array = np.asarray(array)
    if array.dtype == np.float64 and array.size and np.isfinite(array).all() and np.abs(array).max() > MAX_MAGNITUDE:
        raise ValueError(
            f"weight has |w| up to {np.abs(array).max():.3g}, beyond half the float32 range in which it is quantized"
        )
    return np.asarray(array, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class SizeBudget:
    """A size budget for QuantizeWeightsPass: the budget, the widths to choose among and the form whose bytes
    count (``fused``: codes packed at their width as lowbit::QuantMatMul keeps them; else the portable
    DequantizeLinear initializers, 3-bit codes in 4 bits). ``sensitivity``: the error the allocation
    minimises, ``"output"`` (each weight's ``trace(dW^T H dW)``) or ``"kl"`` (the model's output with only that
    weight quantized, on the first ``sensitivity_samples`` calibration samples: ``passes/sensitivity.py``)."""

    budget: allocate.Budget
    fused: bool = False
    widths: tuple[int, ...] = SUPPORTED_BITS
    sensitivity: str = "output"
    sensitivity_samples: int = 2

    def __post_init__(self) -> None:
        if self.sensitivity not in MEASURES:
            raise ValueError(f"budget sensitivity must be one of {MEASURES}, got {self.sensitivity!r}")
        if self.sensitivity_samples < 1:
            raise ValueError(f"sensitivity_samples must be >= 1, got {self.sensitivity_samples!r}")


def stored_bytes(quantized: QuantizedWeight, float_dtype: ir.DataType, fused: bool) -> int:
    """Bytes of the written form of ``quantized``: codes, scales and zero points (fused: the packed codes with
    their tile padding, the scales as the fused ops store them, uint8 zero points; fusion may repack narrower
    codes tighter, never wider)."""
    if not fused:
        return builders.dequantize_linear("bytes", quantized, float_dtype).nbytes
    tiles, quads, block = packing.packed_shape(quantized.bits, *quantized.codes.shape)
    zero_points = 0 if quantized.symmetric else quantized.zero_points.size
    return tiles * quads * block + storage_scales(quantized.scales).nbytes + zero_points


def other_file_bytes(model: ir.Model, plans: list[WeightPlan], fused: bool, may_be_external: bool) -> int:
    """What a megabyte budget leaves for everything but the planned weights' stored arrays: an upper bound
    on what the written file holds besides them. The model's file bytes now (``files.file_bytes``: tensors,
    nodes, names and metadata; with the longest data-file headers where ``may_be_external``) less the
    planned weights' data, with the sparse outliers at the fused op's types where ``fused``, plus the graph
    bytes each weight's quantized form adds (``written_structure_bytes``), less the exporter's record of the export
    that CleanupPass drops (``files.EXPORT_PROVENANCE_KEYS``)."""
    location = "x" * files.LONGEST_FILE_NAME if may_be_external else None
    planned = {plan.first.weight.name: plan for plan in plans}
    total = files.file_bytes(model, location) - files.export_provenance_bytes(model)  # CleanupPass drops those
    for value in model.graph.initializers.values():
        if value.name in planned and value.const_value is not None:
            total += written_structure_bytes(planned[value.name]) - value.const_value.nbytes
        elif fused and (outlier_bytes := fused_outlier_bytes(value)) is not None:
            total += max(0, outlier_bytes - value.const_value.nbytes)
    return total


def written_structure_bytes(plan: WeightPlan) -> int:
    """An upper bound on the graph bytes (beyond its arrays' data) that a weight's quantized form adds, in
    either form. Its arrays, nodes and their outputs are named after its layer or itself, each name written a
    few times (the initializer, its value info, the node input): bounded by 16 lengths of the longer name plus
    512 bytes of suffixes, types, shapes and attributes (checked against written files of both forms, with
    short and 200-character names, in tests/passes/test_budget.py)."""
    name = max(len((plan.first.layer or "").encode()), len((plan.first.weight.name or "").encode()))
    return 16 * name + 512


#: ``choose_width(bits, plans)``: quantize ``plans`` at ``bits`` along their candidate axes, return one axis each.
ChooseWidth = Callable[[int, list[WeightPlan]], list[str]]
#: Measures the plans of ``indices`` at every width, end to end too where given a sensitivity on exactly those plans
#: (in that order): ``measure(indices, sensitivity or None)``.
MeasureTable = Callable[[list[int], OutputSensitivity | None], "WidthTable"]


@dataclasses.dataclass
class BudgetChoice:
    """What ``choose_within_budget`` decided: a width and an axis per plan (its candidates hold that width),
    each measured plan's options per width ({"axis", "error", "bytes"}) and the totals."""

    axes: list[str]
    bits: list[int]
    options: list[dict[str, dict]]
    details: dict

    def annotate(self, records: list[WeightRecord]) -> None:
        """Give each weight record (in plan order) its options per width."""
        for record, options in zip(records, self.options):
            record.width_options = options


@dataclasses.dataclass
class WidthTable:
    """Plans measured at every width: per width the plans quantized at it (the chosen axis's candidate only)
    and the axes, per plan the stored bytes and the output error ``trace(dW^T H dW)`` of each width, and
    (``sensitivities``, where measured) the end-to-end error of each width (``passes/sensitivity.py``)."""

    widths: tuple[int, ...]
    plans: list[list[WeightPlan]]
    axes: list[list[str]]
    costs: list[list[int]]
    errors: list[list[float]]
    sensitivities: list[list[float]] | None = None

    def candidates(self, position: int) -> list[QuantizedWeight]:
        """Plan ``position``'s chosen candidate at every width."""
        return [plans[position].candidates[axes[position]] for plans, axes in zip(self.plans, self.axes)]

    def let_go(self) -> None:
        """Drop the candidates and the Hessians the measured plans hold (what was measured stays): a layer
        measured in a sweep keeps no codes until its chosen width is quantized again."""
        for width_plans in self.plans:
            for plan in width_plans:
                plan.release_candidates()

    @staticmethod
    def joined(tables: list[tuple[list[int], WidthTable]], indices: list[int]) -> WidthTable:
        """One table of ``indices`` (in that order) from tables of parts of them, each with its own indices."""
        rows = {index: (table, position) for part, table in tables for position, index in enumerate(part)}
        first = tables[0][1]
        order = [rows[index] for index in indices]
        return WidthTable(
            first.widths,
            [[table.plans[w][position] for table, position in order] for w in range(len(first.widths))],
            [[table.axes[w][position] for table, position in order] for w in range(len(first.widths))],
            [table.costs[position] for table, position in order],
            [table.errors[position] for table, position in order],
            None if first.sensitivities is None else [table.sensitivities[position] for table, position in order],
        )

    def options(self, position: int) -> dict[str, dict]:
        """Plan ``position``'s options per width, as the report lists them."""
        options = {
            str(bits): {"axis": axes[position], "error": error, "bytes": cost}
            for bits, axes, error, cost in zip(self.widths, self.axes, self.errors[position], self.costs[position])
        }
        if self.sensitivities is not None:
            for bits, sensitivity in zip(self.widths, self.sensitivities[position]):
                options[str(bits)]["sensitivity"] = sensitivity
        return options


def measure_widths(
    plans: list[WeightPlan], widths: tuple[int, ...], fused: bool, choose_width: ChooseWidth
) -> WidthTable:
    """Quantize ``plans`` (all with calibration statistics) at every width, each width's axis chosen by
    ``choose_width``, and measure each result's stored bytes (``fused`` or portable form) and output error."""
    per_width, axes = [], []
    for bits in widths:
        width_plans = [dataclasses.replace(plan, candidates={}, choice_errors=None) for plan in plans]
        chosen = choose_width(bits, width_plans)
        for plan, axis in zip(width_plans, chosen):
            if plan.choice_errors is None and len(plan.candidates) > 1:
                plan.choice_errors = matrix_errors(plan)  # both axes' errors, for the report
            plan.keep_candidate(axis)  # the other axis's codes are not needed again
        per_width.append(width_plans)
        axes.append(chosen)
    table = WidthTable(tuple(widths), per_width, axes, costs=[], errors=[])
    for position, plan in enumerate(plans):
        table.costs.append(
            [stored_bytes(candidate, weight_type(plan.first), fused) for candidate in table.candidates(position)]
        )
        table.errors.append(
            [width_plans[position].output_errors()[axis[position]] for width_plans, axis in zip(per_width, axes)]
        )
    return table


class UnmeasuredLayerWeight(ValueError):
    """A budget measured layer by layer met a weight in a layer that its end-to-end sensitivity cannot measure."""


def measure_whole(
    plans: list[WeightPlan],
    budget: SizeBudget,
    choose_width: ChooseWidth,
    indices: list[int],
    sensitivity: OutputSensitivity | None,
    positions: list[int],
) -> WidthTable:
    """``measure_widths`` of ``plans[indices]`` and, given a sensitivity, their end-to-end errors (``positions``:
    their rows in the sensitivity's measured weights)."""
    table = measure_widths([plans[i] for i in indices], budget.widths, budget.fused, choose_width)
    if sensitivity is not None:
        table.sensitivities = sensitivity.table([table.candidates(p) for p in range(len(indices))], positions=positions)
    return table


def choose_within_budget(
    model: ir.Model,
    plans: list[WeightPlan],
    budget: SizeBudget,
    choose_width: ChooseWidth,
    default_bits: int,
    samples: list[dict[str, np.ndarray]] | None = None,
    measure: MeasureTable | None = None,
    deferred: frozenset[int] = frozenset(),
) -> BudgetChoice:
    """One width and axis per plan, the lowest summed error whose stored bytes fit ``budget``.

    Plans with calibration statistics are measured at every width (``measure_widths``); the others (embedding
    tables) keep ``default_bits``, and their bytes count against the budget. The error is each weight's
    output error, or with ``budget.sensitivity == "kl"`` the model's output error on ``samples`` (calibration
    feed dicts; ``OutputSensitivity``), where the weights a feed cannot replace keep ``default_bits`` too.
    Leaves the chosen width's candidates in every plan.

    ``measure`` measures the calibrated plans instead of ``measure_widths`` (the layer sweep's, which leaves no
    candidates: the plans are quantized again at their widths); ``deferred``: plans calibrated there, whose
    statistics are not here yet."""
    calibrated = [i for i, plan in enumerate(plans) if plan.hessian is not None or i in deferred]
    sensitivity, not_measured, output_measure, whole_model_reason = None, [], None, None
    if budget.sensitivity == "kl" and calibrated:
        if not samples:
            raise ValueError("budget sensitivity 'kl' runs the model on calibration samples, and none were kept")
        sensitivity = OutputSensitivity(model, [plans[i] for i in calibrated], samples[: budget.sensitivity_samples])
        kept = {calibrated[position] for position in sensitivity.measured}
        not_measured = [plans[i].first.weight.name or "" for i in calibrated if i not in kept]
        calibrated = [i for i in calibrated if i in kept]
    measured = calibrated
    if deferred.difference(measured):
        unmeasured = sorted(plans[i].first.weight.name or "" for i in deferred.difference(measured))
        raise UnmeasuredLayerWeight(f"the end-to-end sensitivity cannot measure the layer weights {unmeasured[:3]}")
    fixed = sorted(set(range(len(plans))) - set(measured))
    axes: list[str | None] = [None] * len(plans)
    bits = [default_bits] * len(plans)
    options: list[dict[str, dict]] = [{} for _ in plans]
    if fixed:
        for i, axis in zip(fixed, choose_width(default_bits, [plans[i] for i in fixed])):
            axes[i] = axis
    fixed_bytes = sum(
        stored_bytes(plans[i].candidates[axes[i]], weight_type(plans[i].first), budget.fused) for i in fixed
    )
    weights = sum(math.prod(plan.shape) for plan in plans)
    megabytes = budget.budget.megabytes
    other = 0
    if megabytes is not None:
        other = other_file_bytes(model, plans, budget.fused, megabytes * 1e6 > files.EXTERNAL_DATA_THRESHOLD)
    limit = budget.budget.limit(weights, other) - fixed_bytes
    if sensitivity is not None:
        output_measure, whole_model_reason = sensitivity.measure, sensitivity.whole_model_reason
    if measure is None:

        def measure(indices: list[int], sensitivity: OutputSensitivity | None) -> WidthTable:
            return measure_whole(plans, budget, choose_width, indices, sensitivity, list(range(len(indices))))

    table = measure(measured, sensitivity)
    del sensitivity  # its session reads the model's arrays, which the pass is about to replace
    allocated = table.errors if table.sensitivities is None else table.sensitivities
    try:
        picks = allocate.allocate(table.costs, allocated, limit) if measured else []
    except ValueError as error:
        raise ValueError(f"budget {budget.budget}: {error}") from error
    if limit < 0:
        raise ValueError(
            f"budget {budget.budget}: the {len(fixed)} weight(s) without calibration statistics (embedding tables) "
            f"alone take {fixed_bytes} bytes at {default_bits} bits, more than the budget allows"
        )
    for position, (i, pick) in enumerate(zip(measured, picks)):
        plans[i].candidates = table.plans[pick][position].candidates
        plans[i].choice_errors = table.plans[pick][position].choice_errors
        axes[i] = table.axes[pick][position]
        bits[i] = table.widths[pick]
        options[i] = table.options(position)
    used = allocate.total_cost(table.costs, picks) + fixed_bytes
    widths = [table.widths[pick] for pick in picks]
    details = {
        "budget": str(budget.budget),
        "limit_bytes": limit + fixed_bytes,
        "bytes": used,
        "bits_per_weight": 8 * used / weights,
        "output_error": sum(row[pick] for row, pick in zip(table.errors, picks)),
        "widths": {str(bits): widths.count(bits) for bits in budget.widths},
        "fixed_width": len(fixed),
        "sensitivity": budget.sensitivity,
    }
    if table.sensitivities is not None:
        details["sensitivity_measure"] = output_measure  # kl of the logits, or relative_mse of another output
        details["sensitivity_samples"] = min(budget.sensitivity_samples, len(samples or []))
        details["sensitivity_error"] = sum(row[pick] for row, pick in zip(table.sensitivities, picks))
        if not_measured:
            details["not_measured"] = not_measured  # kept at default_bits: a feed cannot replace them
        if whole_model_reason is not None:  # the runs could not start at each weight's layer (slower, same errors)
            details["sensitivity_whole_model"] = whole_model_reason
    return BudgetChoice(axes, bits, options, details)
