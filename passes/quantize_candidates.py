"""Candidate quantization and the axis choice of QuantizeWeightsPass: each planned weight quantized along
every candidate axis (RTN or GPTQ, GPTQ retried with more dampening where the damped Hessian has no
Cholesky factor), then one axis chosen per weight by the AdaDim selector. No graph change here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.passes import axis_selectors
from lowbit.passes.quant.gptq import HessianFactor, HessianNotPositiveDefinite, factor_hessian, quantize_factored
from lowbit.passes.quant.rtn import QuantizedWeight, quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.passes.quant.tied import tied_hessian
from lowbit.runtime.memory import release_free_memory
from lowbit.runtime.threads import one_blas_thread

#: The weight kinds that ``CandidateQuantizer.head_bits`` applies to.
HEAD_KINDS = ("lm_head", "embedding")
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
    head_bits: int | None = None  # LM heads and embedding tables (default: the scheme's bits)
    _factor: tuple[np.ndarray, HessianFactor] | None = dataclasses.field(default=None, init=False, repr=False)

    def candidates(self, plan: axis_selectors.WeightPlan, method: str) -> dict[str, QuantizedWeight]:
        """The weight quantized by ``method`` along every candidate axis (embeddings: along D only, by RTN)."""
        if plan.first.kind == "embedding":  # a Gather reads whole rows
            return {"ic": self.quantize(plan, "ic", method)}
        return {axis: self.quantize(plan, axis, method) for axis in self.candidate_axes}

    def quantize(
        self, plan: axis_selectors.WeightPlan, axis: str, method: str, bits: int | None = None
    ) -> QuantizedWeight:
        """The weight quantized along ``axis`` by ``method`` (at ``bits``, default the scheme's or the head's).
        Embedding tables ``[V, D]`` go along D (``ic``), by RTN, or, tied to an LM head with calibration, by GPTQ
        over ``quant.tied``'s Hessian (the head's ``W = table^T`` per-OC, transposed back)."""
        if bits is None:
            bits = self.head_bits if self.head_bits is not None and plan.first.kind in HEAD_KINDS else self.scheme.bits
        if plan.first.kind == "embedding":
            if method == "gptq" and plan.tied_head_hessian is not None:
                weight = plan.weight.T
                factor = self.factor(tied_hessian(plan.tied_head_hessian, weight))
                scheme = dataclasses.replace(self.scheme, bits=bits, group_axis="oc", method="gptq")
                return transposed(quantize_factored(weight, factor, scheme))
            return quantize_rtn(plan.weight, dataclasses.replace(self.scheme, bits=bits, group_axis="ic", method="rtn"))
        scheme = dataclasses.replace(self.scheme, bits=bits, group_axis=axis, method=method)
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
    workers: int | None = None,
    release_hessians: bool = False,
) -> tuple[list[str], dict | None]:
    """Quantize ``plans`` by ``choice_method`` along every candidate axis and choose one axis each: by
    ``selector`` on ``model`` (None: the ``matrix`` choice); where ``choice_method`` is not ``method``, the
    chosen axis is quantized again by ``method``. Returns the axes and the selector's details (None when no
    selector ran). ``workers``: threads that quantize (default: the cores this process may use).
    ``release_hessians``: each plan drops its H once its candidates are measured (``WeightPlan.release_hessian``),
    before the selector runs; only where ``choice_method`` is ``method`` (nothing is quantized again)."""
    if release_hessians and choice_method != method:
        raise ValueError("the chosen axes are quantized again by the method, which reads the Hessians")
    candidates = _in_threads(
        quantizer,
        plans,
        lambda own, plan: own.candidates(plan, choice_method),
        f"quantize weights ({choice_method})",
        workers,
    )
    for plan, found in zip(plans, candidates):
        plan.candidates = found
        if release_hessians:
            plan.release_hessian()
    if release_hessians:
        release_free_memory()  # the measures' temporaries, freed into this thread's arena (see ``_in_threads``)
    details = None
    if selector is None or model is None:
        choices = axis_selectors.select_matrix(plans)
    else:
        choices = selector(model, plans, samples)
        details = selector.details
    if choice_method != method:  # the chosen axis, by the recipe's own method
        requantize = [(plan, axis) for plan, axis in zip(plans, choices) if _method_matters(plan)]
        for plan, _ in requantize:
            if plan.hessian is not None:
                plan.choice_errors = axis_selectors.matrix_errors(plan)
        chosen = _along(quantizer, [plan for plan, _ in requantize], [axis for _, axis in requantize], method, workers)
        for (plan, axis), quantized in zip(requantize, chosen):
            plan.candidates[axis] = quantized
    return choices, details


def quantize_chosen(
    quantizer: CandidateQuantizer,
    plans: list[axis_selectors.WeightPlan],
    axes: list[str],
    widths: list[int],
    method: str,
    workers: int | None = None,
) -> None:
    """Quantize each plan along its axis at its width by ``method``, as its only candidate (a budget's choice,
    quantized again where its layer is calibrated a second time)."""
    for plan, axis, candidate in zip(plans, axes, _along(quantizer, plans, axes, method, workers, widths)):
        plan.candidates = {axis: candidate}


def _along(
    quantizer: CandidateQuantizer,
    plans: list[axis_selectors.WeightPlan],
    axes: list[str],
    method: str,
    workers: int | None,
    widths: list[int] | None = None,
) -> list[QuantizedWeight]:
    """Each plan quantized along its axis by ``method`` (at its width; default the quantizer's), in threads."""
    chosen = {
        id(plan): (axis, bits) for plan, axis, bits in zip(plans, axes, widths or [None] * len(plans), strict=True)
    }
    return _in_threads(
        quantizer,
        plans,
        lambda own, plan: own.quantize(plan, chosen[id(plan)][0], method, chosen[id(plan)][1]),
        f"quantize weights ({method})",
        workers,
    )


def _method_matters(plan: axis_selectors.WeightPlan) -> bool:
    """Whether the method changes how ``plan`` is quantized (a plain embedding table is always RTN)."""
    return plan.first.kind != "embedding" or plan.tied_head_hessian is not None


def transposed(quantized: QuantizedWeight) -> QuantizedWeight:
    """The same codes, scales and zero points for the transposed weight (the group axis flips)."""
    return dataclasses.replace(
        quantized,
        codes=np.ascontiguousarray(quantized.codes.T),
        scales=np.ascontiguousarray(quantized.scales.T),
        zero_points=np.ascontiguousarray(quantized.zero_points.T),
        block_axis=1 - quantized.block_axis,
    )


def _in_threads(quantizer: CandidateQuantizer, plans: list, work, desc: str, workers: int | None) -> list:
    """``work(own, plan)`` for every plan, in order. Consecutive plans that share a Hessian array make one job
    (its GPTQ factor made once), run with its own ``own`` copy of ``quantizer``; jobs run on ``workers`` threads
    (NumPy, BLAS and torch release the GIL), each calling BLAS on one thread where there are several workers
    (``threads.one_blas_thread``). A job computes what it would alone, so the results do not depend on the number
    of threads. After each job the heap's free pages go back to the system (``release_free_memory``): a worker's
    temporaries below ``runtime.memory.LARGE_ALLOCATION_BYTES`` are freed into its own glibc arena and stay resident
    there, so over a layer's weights they added up to more than the layer's candidates. (Once per job, not per
    weight: pages handed back are faulted in again by the next weight's temporaries.)"""
    jobs: list[list] = []
    for plan in plans:
        if jobs and plan.hessian is not None and jobs[-1][-1].hessian is plan.hessian:
            jobs[-1].append(plan)
        else:
            jobs.append([plan])

    def run(job: list) -> list:
        own = dataclasses.replace(quantizer)  # a factor cache of its own
        results = [work(own, plan) for plan in job]
        release_free_memory()
        return results

    results = []
    workers = min(len(jobs), workers or usable_cores()) or 1
    blas_threads = one_blas_thread() if workers > 1 else contextlib.nullcontext()
    with (
        blas_threads,
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(plans), desc=desc, unit="weight", leave=False) as bar,
    ):
        for job_results in pool.map(run, jobs):
            results.extend(job_results)
            bar.update(len(job_results))
    return results


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1
