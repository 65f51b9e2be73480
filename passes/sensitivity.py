"""End-to-end sensitivity of the model's output to each weight's quantization, for size budgets.

``trace(dW^T H dW)`` says how much one matrix's output moves, not how much that matters at the model's
output. ``OutputSensitivity`` measures the latter: one ONNX Runtime session of the float model in which
every measured weight initializer is also a graph input (a feed replaces it; ONNX Runtime allows this from
IR version 4), the model cut to its first graph output. For each weight and each candidate, the weight alone
is fed as its dequantized candidate and the output is compared with the float model's (computed once):

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

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.ir import analysis
from lowbit.passes.axis_selectors import WeightPlan
from lowbit.passes.quant.rtn import QuantizedWeight
from lowbit.runtime.calibration import keep_nodes_needed_for
from lowbit.runtime.session import (
    external_data_dirs,
    proto_sharing_initializers,
    session_from_proto,
    session_options,
)

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
        and tuple(tensor.shape) == tuple(plan.weight.shape)
        and all(use.node.op_type == "MatMul" and use.weight is value for use in plan.uses)
    )


def output_measure(model: ir.Model) -> str:
    """``kl`` where the model has an output head (its first output is logits), else ``relative_mse``."""
    return "kl" if any(use.kind == "lm_head" for use in analysis.weight_uses(model.graph)) else "relative_mse"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class OutputSensitivity:
    """One session of the float ``model`` with the weights of ``plans`` overridable, its first output's float
    values on ``samples`` (feed dicts) kept as the reference. ``measured``: the positions in ``plans`` of the
    weights it measures (``overridable`` ones that the first output depends on); ``error`` and ``table`` count
    positions in that list. Make it before any weight of ``model`` changes and drop it after (the session reads
    the model's arrays)."""

    def __init__(self, model: ir.Model, plans: Sequence[WeightPlan], samples: Sequence[dict[str, np.ndarray]]):
        if not samples:
            raise ValueError("an end-to-end sensitivity needs calibration samples")
        if not model.graph.outputs:
            raise ValueError("the model has no graph output to measure")
        self.measure = output_measure(model)
        proto, memory = proto_sharing_initializers(model)
        output = proto.graph.output[0]
        self.output = output.name
        del proto.graph.output[1:]
        keep_nodes_needed_for(proto.graph, [self.output])
        if proto.ir_version < 4:  # initializers are overridable graph inputs from IR version 4
            proto.ir_version = 4
        initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
        self.measured = [
            i for i, plan in enumerate(plans) if overridable(plan) and plan.first.weight.name in initializers
        ]
        self.names = [plans[i].first.weight.name for i in self.measured]
        self.dtypes = [_OVERRIDABLE_TYPES[plans[i].first.weight.const_value.dtype] for i in self.measured]
        for name in self.names:
            tensor = initializers[name]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        options = session_options()
        options.log_severity_level = 3  # not one warning per weight that "an initializer is also an input"
        self.session = session_from_proto(proto, external_data_dirs(model), options, consume=True, memory_files=memory)
        weights = set(self.names)
        inputs = {value.name for value in self.session.get_inputs()} - weights
        self.samples = [{name: value for name, value in sample.items() if name in inputs} for sample in samples]
        self.reference = [self._run({}, sample) for sample in self.samples]
        if self.measure == "kl":
            self._reference_log = [_log_softmax(reference) for reference in self.reference]
        self._energy = sum(float(np.square(reference, dtype=np.float64).sum()) for reference in self.reference)

    def _run(self, weights: dict[str, np.ndarray], sample: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run([self.output], {**sample, **weights})[0])

    def error(self, position: int, weight: np.ndarray, context: dict[str, np.ndarray] | None = None) -> float:
        """The output's error with measured weight ``position``'s weight replaced by ``weight`` (``[K, N]``), the
        others float, or as ``context`` (``contexts``: feeds by weight name) gives them."""
        feed = {**(context or {}), self.names[position]: np.ascontiguousarray(weight, dtype=self.dtypes[position])}
        total = 0.0
        for index, sample in enumerate(self.samples):
            output = self._run(feed, sample)
            if self.measure == "kl":
                reference = self._reference_log[index]
                log_q = _log_softmax(output)
                per_position = (np.exp(reference) * (reference - log_q)).sum(axis=-1)
                total += float(per_position.mean()) / len(self.samples)
            else:
                total += float(np.square(output.astype(np.float64) - self.reference[index]).sum())
        if self.measure != "kl":
            total /= self._energy if self._energy > 0 else 1.0
        return max(total, 0.0)

    def table(
        self, candidates: Sequence[Sequence[QuantizedWeight]], chosen: Sequence[int] | None = None
    ) -> list[list[float]]:
        """``error`` of every measured weight (row, in ``measured`` order) at every candidate (column), with a
        progress bar. ``chosen`` (a column per row): measured in the context of that mix, every other weight at
        its chosen candidate instead of float, so that what one weight costs is judged beside the others'
        errors (they compound at low widths)."""
        context = None if chosen is None else self.contexts(candidates, chosen)
        errors = []
        desc = f"budget sensitivity ({self.measure}{', in context' if chosen is not None else ''})"
        with tqdm(total=sum(len(row) for row in candidates), desc=desc, unit="run") as bar:
            for position, row in enumerate(candidates):
                errors.append([])
                for candidate in row:
                    errors[-1].append(self.error(position, candidate.dequantize(), context))
                    bar.update()
        return errors

    def contexts(self, candidates: Sequence[Sequence[QuantizedWeight]], chosen: Sequence[int]) -> dict[str, np.ndarray]:
        """Feeds that set every measured weight to its ``chosen`` candidate."""
        return {
            name: np.ascontiguousarray(row[column].dequantize(), dtype=dtype)
            for name, dtype, row, column in zip(self.names, self.dtypes, candidates, chosen, strict=True)
        }
