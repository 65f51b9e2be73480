"""Candidate quantization and the axis choice of QuantizeWeightsPass: each planned weight quantized along
every candidate axis (RTN or GPTQ, GPTQ retried with more dampening where the damped Hessian has no
Cholesky factor), then one axis chosen per weight by the AdaDim selector. No graph change here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.passes import axis_selectors
from lowbit.passes.quant.gptq import HessianFactor, HessianNotPositiveDefinite, factor_hessian, quantize_factored
from lowbit.passes.quant.rtn import QuantizedWeight, quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme

#: How many times GPTQ's dampening is multiplied by 10 before the weight is refused.
GPTQ_DAMP_TRIES = 4


@dataclasses.dataclass
class CandidateQuantizer:
    """Quantizes one plan along ``candidate_axes`` by a method, with ``scheme``'s other settings.

    GPTQ factors each Hessian once for every axis and every weight that reads it (q/k/v, gate/up share one
    input): the last factor is kept while consecutive plans bring the same Hessian array.
    """

    scheme: QuantScheme
    candidate_axes: tuple[str, ...]
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    _factor: tuple[np.ndarray, HessianFactor] | None = dataclasses.field(default=None, init=False, repr=False)

    def candidates(self, plan: axis_selectors.WeightPlan, method: str) -> dict[str, QuantizedWeight]:
        """The weight quantized by ``method`` along every candidate axis (embeddings: along D only, by RTN)."""
        if plan.first.kind == "embedding":  # a Gather reads whole rows
            return {"ic": quantize_rtn(plan.weight, dataclasses.replace(self.scheme, group_axis="ic", method="rtn"))}
        return {axis: self.quantize(plan, axis, method) for axis in self.candidate_axes}

    def quantize(self, plan: axis_selectors.WeightPlan, axis: str, method: str) -> QuantizedWeight:
        scheme = dataclasses.replace(self.scheme, group_axis=axis, method=method)
        if method == "gptq":
            return quantize_factored(plan.weight, self.factor(plan.hessian), scheme)
        channel_weights = None if plan.hessian is None else np.diag(plan.hessian)  # weights the clip search
        return quantize_rtn(plan.weight, scheme, channel_weights)

    def factor(self, hessian: np.ndarray) -> HessianFactor:
        """GPTQ's factor of ``hessian`` (the last one again for the same array), retrying with 10x the
        dampening where the damped Hessian is not positive definite."""
        if self._factor is not None and self._factor[0] is hessian:
            return self._factor[1]
        self._factor = None  # the previous factor is not needed any more: free it before making the next
        damp = self.gptq_damp
        for _ in range(GPTQ_DAMP_TRIES):
            try:
                factor = factor_hessian(hessian, damp=damp, act_order=self.gptq_act_order)
            except HessianNotPositiveDefinite:
                damp *= 10
                continue
            self._factor = (hessian, factor)
            return factor
        raise ValueError(f"GPTQ failed: the Hessian stays singular up to dampening {damp / 10}")


def choose(
    quantizer: CandidateQuantizer,
    plans: list[axis_selectors.WeightPlan],
    *,
    choice_method: str,
    method: str,
    selector: axis_selectors.SubgraphSelector | None,
    model: ir.Model | None,
    samples,
) -> tuple[list[str], dict | None]:
    """Quantize ``plans`` by ``choice_method`` along every candidate axis and choose one axis each: by
    ``selector`` on ``model`` (None: the ``matrix`` choice); where ``choice_method`` is not ``method``, the
    chosen axis is quantized again by ``method``. Returns the axes and the selector's details (None when no
    selector ran)."""
    for plan in tqdm(plans, desc=f"quantize weights ({choice_method})", unit="weight", leave=False):
        plan.candidates = quantizer.candidates(plan, choice_method)
    details = None
    if selector is None or model is None:
        choices = axis_selectors.select_matrix(plans)
    else:
        choices = selector(model, plans, samples)
        details = selector.details
    if choice_method != method:  # the chosen axis, by the recipe's own method
        for plan, axis in tqdm(
            list(zip(plans, choices)), desc=f"quantize weights ({method})", unit="weight", leave=False
        ):
            if plan.first.kind != "embedding":
                if plan.hessian is not None:
                    plan.choice_errors = axis_selectors.matrix_errors(plan)
                plan.candidates[axis] = quantizer.quantize(plan, axis, method)
    return choices, details
