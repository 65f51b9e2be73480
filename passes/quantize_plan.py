"""Which weights QuantizeWeightsPass quantizes: one ``WeightPlan`` per weight, the skip policy (why a
weight stays in float) and tied tables. No graph change here; the pass writes the plans afterwards.

A weight shared by several MatMuls is planned once. An embedding table and its tied LM head (the head
reads ``Transpose(table)``) become one plan when both are opted in: the table's groups run along D,
which for the head's ``B = table^T`` are per-OC groups, so one quantized copy serves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from lowbit.ir import analysis
from lowbit.passes.axis_selectors import WeightPlan
from lowbit.passes.quant.rtn import MAX_MAGNITUDE, check_weight
from lowbit.passes.report import SkippedWeight

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
    tied = share_tied_tables(groups) if policy.include_embeddings and policy.include_lm_head else 0
    plans = []
    for uses in groups.values():
        skip = policy.reason(uses)
        if skip is not None:
            culprit, reason = skip
            skipped.append(SkippedWeight(culprit.weight.name or "", culprit.layer, culprit.kind, reason))
            continue
        first = uses[0]
        try:
            weight = float32_weight(analysis.weight_value_array(first))
            if first.node.op_type == "Gemm":
                weight = analysis.gemm_weight_kn(first.node, weight)
            check_weight(weight)
        except ValueError as error:
            raise ValueError(
                f"weight {first.weight.name!r} of {first.layer!r}: {error}; fix the model before quantizing"
            ) from error
        plans.append(WeightPlan(uses, weight, hessian(uses)))
    return Planning(plans, skipped, tied)


def share_tied_tables(groups: UseGroups) -> int:
    """A tied LM head reads Transpose(table): let that Transpose read the quantized table too (the head's
    group joins the table's). Returns how many heads were merged."""
    tied = 0
    for key in [key for key, uses in groups.items() if uses[0].kind == "lm_head"]:
        transpose = groups[key][0].weight.producer()
        if transpose is None or transpose.op_type != "Transpose":
            continue
        table_key = (id(transpose.inputs[0]), True)
        if table_key in groups:
            table_uses = groups[table_key]
            table_uses.append(analysis.WeightUse(transpose, transpose.inputs[0], 0, "embedding", table_uses[0].layer))
            del groups[key]
            tied += 1
    return tied


def float32_weight(array) -> np.ndarray:
    """The weight in float32 for the math; a double weight past the float32 range is refused, not made Inf."""
    array = np.asarray(array)
    if array.dtype == np.float64 and array.size and np.isfinite(array).all() and np.abs(array).max() > MAX_MAGNITUDE:
        raise ValueError(
            f"weight has |w| up to {np.abs(array).max():.3g}, beyond half the float32 range in which it is quantized"
        )
    return np.asarray(array, dtype=np.float32)
