"""FoldNormScalesPass: move normalisation scales into the weights that read the normalised tensor.

``(z * gamma + beta) @ W == z @ (diag(gamma) W) + beta @ W``. The per-channel ``gamma`` of a
``LayerNormalization``, an ``RMSNormalization`` (opset 23) or the decomposed RMSNorm exporters write
(``Mul(gamma, x * rsqrt(mean(x^2) + eps))``; any ``Mul`` by a constant along the last axis folds the same
way) scales the rows of every weight that reads the norm's output, and the norm's own gamma becomes 1.
A LayerNorm's ``beta`` becomes the bias ``beta @ W`` of each reader: added into its bias ``Add`` when it
has one, else a new ``Add``; the LayerNorm's bias input goes. The norm node stays (gamma = 1), so ONNX
Runtime's norm fusions still apply and the node count grows only by the bias Adds a LayerNorm needs.

It folds only when *every* reader of the norm's output is a weight MatMul whose constant weight no
other node reads: a residual branch (post-LN encoders such as MiniLM), a tied LM head (its weight is
the embedding table) or a shared weight keep the norm as it is, and the report says why.
``BatchNormalization`` after a ``Conv`` folds into the Conv's weight and bias, and the BatchNorm goes.

Why: the scale moves into the weights, where per-IC groups can isolate it. The calibration statistics
then describe the unscaled normalised tensor, so run this before CaptureCalibrationPass. Lossless up
to float round-off.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.ir import analysis
from lowbit.ir.builders import NameAllocator, add_initializer, replace_graph_output, set_input_constant
from lowbit.passes.base import LowbitPass

NORM_OPS = frozenset({"LayerNormalization", "RMSNormalization"})


class NormNotFoldable(Exception):
    """This norm cannot be folded; the message says why."""


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
        graph.initializers.pop(value.name)


def _reroute(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every reader of ``old`` (graph outputs included, keeping their name) reads ``new`` instead."""
    for usage in list(old.uses()):
        if usage.node is not new.producer():
            usage.node.replace_input_with(usage.idx, new)
    replace_graph_output(graph, old, new)


class FoldNormScalesPass(LowbitPass):
    """Fold norm gammas (and LayerNorm betas) into the weight MatMuls reading the norm; BatchNorm into Conv."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights = {use.node: use for use in analysis.weight_uses(graph) if use.kind in ("matmul", "lm_head")}
        folded, skipped = [], []
        names = NameAllocator(graph)  # new values and nodes unique across the graph and its subgraphs
        for node in list(graph):
            try:
                if node.op_type == "BatchNormalization":
                    record = self._fold_batch_norm(graph, node, names)
                else:
                    record = self._fold_scale(graph, node, weights, names)
            except NormNotFoldable as reason:
                skipped.append({"node": node.name, "op": node.op_type, "reason": str(reason)})
                continue
            if record is not None:
                folded.append(record)
        self.details = {
            "folded_norms": len(folded),
            "scaled_weights": sum(len(record["weights"]) for record in folded),
            "bias_adds": sum(record.get("new_adds", 0) for record in folded),
            "skipped_norms": len(skipped),
            "folded": folded,
            "skipped": skipped,
        }
        return ir.passes.PassResult(model, modified=bool(folded))

    @staticmethod
    def _scale_operands(node: ir.Node) -> tuple[int, np.ndarray, np.ndarray | None] | None:
        """(gamma input index, gamma as [C] or [1], beta or None) of a norm / per-channel Mul, else None."""
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in NORM_OPS:
            gamma = analysis.constant_array(node.inputs[1])
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            beta = analysis.constant_array(bias) if bias is not None else None
            if gamma is None or (bias is not None and beta is None):
                raise NormNotFoldable("its scale or bias is not a constant")
            if gamma.ndim != 1:
                raise NormNotFoldable(f"it normalises over several axes (scale shape {list(gamma.shape)})")
            return 1, gamma, beta
        if node.op_type != "Mul" or len(node.inputs) != 2:
            return None
        constants = [analysis.constant_array(value) for value in node.inputs]
        if (constants[0] is None) == (constants[1] is None):
            return None
        index = 0 if constants[0] is not None else 1
        gamma, other = constants[index], node.inputs[1 - index]
        if gamma.dtype.kind != "f" or gamma.ndim == 0 or any(dim != 1 for dim in gamma.shape[:-1]):
            return None
        if gamma.ndim > 1 and (other.shape is None or len(other.shape) < gamma.ndim):
            return None  # the Mul would also broadcast the activation to a higher rank
        return index, gamma.reshape(-1), None

    def _readers(self, node: ir.Node, weights: dict) -> list[analysis.WeightUse]:
        """The weight MatMuls reading ``node``'s output; NormNotFoldable unless they are its only readers."""
        output = node.outputs[0]
        if output.is_graph_output():
            raise NormNotFoldable("its output is a graph output")
        readers = []
        for usage in output.uses():
            use = weights.get(usage.node)
            if use is None or usage.idx != 0:
                raise NormNotFoldable(f"{usage.node.op_type} {usage.node.name!r} reads its output")
            if use.weight.const_value is None:
                raise NormNotFoldable(f"{use.kind} {use.layer!r} reads a weight tied to the embedding table")
            if not use.weight.is_initializer():  # a Constant node's output: its attribute, not const_value, is saved
                raise NormNotFoldable(f"the weight of {use.layer!r} is a Constant node's output, not an initializer")
            if use.node.op_type == "Gemm" and use.node.attributes.get_int("transA", 0):
                raise NormNotFoldable(f"Gemm {use.layer!r} has transA=1")
            if len(use.weight.uses()) != 1:
                raise NormNotFoldable(f"the weight {use.weight.name!r} of {use.layer!r} is shared with another node")
            readers.append(use)
        return readers

    def _fold_scale(self, graph: ir.Graph, node: ir.Node, weights: dict, names: NameAllocator) -> dict | None:
        operands = self._scale_operands(node)
        if operands is None:
            return None
        index, gamma, beta = operands
        has_beta = beta is not None and np.any(beta != 0)
        if np.all(gamma == 1) and not has_beta:
            return None  # nothing to move
        if node.op_type == "Mul" and not any(usage.node in weights for usage in node.outputs[0].uses()):
            return None  # a Mul that feeds no weight: not a norm scale
        readers = self._readers(node, weights)
        if not readers:
            raise NormNotFoldable("nothing reads its output")
        rows = sorted({analysis.gemm_weight_kn(use.node, use.weight.const_value.numpy()).shape[0] for use in readers})
        if gamma.size != 1 and rows != [gamma.size]:
            raise NormNotFoldable(f"its readers' weight rows {rows} do not match the scale's {gamma.size} channels")
        new_adds = 0
        for use in readers:
            weight = use.weight.const_value.numpy()
            if has_beta:  # beta @ (alpha W) in the [K, N] layout of a MatMul
                product = analysis.gemm_weight_kn(use.node, weight.astype(np.float64))
                new_adds += self._add_bias(graph, use.node, beta.astype(np.float64) @ product, use.weight.dtype, names)
            input_axis = 1 if analysis.stores_weight_transposed(use.node) else 0
            scale = gamma.astype(np.float64).reshape((1, -1) if input_axis else (-1, 1))
            scaled = (scale * weight).astype(weight.dtype)
            use.weight.const_value = ir.tensor(np.ascontiguousarray(scaled), name=use.weight.name)
        source_gamma = node.inputs[index]
        set_input_constant(
            graph, node, index, np.ones(source_gamma.const_value.shape), names.fresh(f"{node.name}_unit_scale")
        )
        _drop_if_unused(graph, source_gamma)
        if beta is not None:
            bias = node.inputs[2]
            node.resize_inputs(2)  # drop it: ONNX Runtime 1.32 crashes on an empty ('') LayerNorm bias input
            _drop_if_unused(graph, bias)
        return {
            "node": node.name,
            "op": node.op_type,
            "weights": [use.layer for use in readers],
            "new_adds": new_adds,
        }

    @staticmethod
    def _add_bias(graph: ir.Graph, matmul: ir.Node, bias: np.ndarray, dtype: ir.DataType, names: NameAllocator) -> int:
        """Add ``bias`` to ``matmul``'s output: into its bias Add when it has one (0), else a new Add (1).
        ``dtype``: the weight's type, which the product has (the file may carry no value_info)."""
        output = matmul.outputs[0]
        uses = output.uses()
        if len(uses) == 1 and not output.is_graph_output() and uses[0].node.op_type == "Add":
            add = uses[0].node
            other = 1 - uses[0].idx
            existing = analysis.constant_array(add.inputs[other])
            if existing is not None and existing.size == bias.size and existing.shape[-1] == bias.size:
                total = existing.astype(np.float64) + bias.reshape(existing.shape)
                set_input_constant(graph, add, other, total, names.fresh(f"{add.name}_folded_bias"))
                return 0
        value = add_initializer(graph, names.fresh(f"{matmul.name}_norm_bias"), bias.astype(dtype.numpy()))
        add = ir.node("Add", [output, value], name=names.fresh_node(f"{matmul.name}_norm_bias"))
        add.outputs[0].name = names.fresh(f"{output.name}_norm_bias")
        add.outputs[0].shape, add.outputs[0].type = output.shape, output.type or ir.TensorType(dtype)
        graph.insert_after(matmul, add)
        _reroute(graph, output, add.outputs[0])
        return 1

    @staticmethod
    def _fold_batch_norm(graph: ir.Graph, node: ir.Node, names: NameAllocator) -> dict:
        """``BatchNormalization(Conv(x, W, b))`` -> ``Conv(x, W * s, (b - mean) * s + beta)``, s = gamma / sqrt(var + eps).

        Not onnxscript's ``FuseBatchNormIntoConv``: it agrees to float32 round-off
        (tests/passes/test_batchnorm_parity.py), but computes in the parameters' float32 where this computes in
        float64, so its folded weights differ in the last bit (51 of 135 in that test) and our outputs would
        change; it also does not check that a training-mode BatchNorm's statistics outputs are unread."""
        if node.attributes.get_int("training_mode", 0) or any(output.uses() for output in node.outputs[1:]):
            raise NormNotFoldable("training mode (running statistics are outputs)")
        conv = node.inputs[0].producer()
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            raise NormNotFoldable("it does not follow a Conv")
        if len(conv.outputs[0].uses()) != 1 or conv.outputs[0].is_graph_output():
            raise NormNotFoldable(f"the output of Conv {conv.name!r} has other readers")
        params = [analysis.constant_array(value) for value in node.inputs[1:5]]
        weight = analysis.constant_array(conv.inputs[1])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
        bias = (
            analysis.constant_array(conv.inputs[2])
            if has_bias
            else np.zeros(weight.shape[0] if weight is not None else 0)
        )
        if any(array is None for array in params) or weight is None or bias is None:
            raise NormNotFoldable(f"Conv {conv.name!r} or the BatchNorm has a non-constant parameter")
        if len(conv.inputs[1].uses()) != 1:
            raise NormNotFoldable(f"the weight of Conv {conv.name!r} is shared")
        gamma, beta, mean, var = (array.astype(np.float64) for array in params)
        scale = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
        new_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        conv.inputs[1].const_value = ir.tensor(new_weight.astype(weight.dtype), name=conv.inputs[1].name)
        new_bias = ((bias - mean) * scale + beta).astype(weight.dtype)
        if has_bias:
            set_input_constant(graph, conv, 2, new_bias, names.fresh(f"{conv.name}_folded_bias"))
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, add_initializer(graph, names.fresh(f"{conv.name}_folded_bias"), new_bias))
        _reroute(graph, node.outputs[0], conv.outputs[0])
        inputs = list(node.inputs)
        graph.remove(node, safe=True)
        for value in inputs[1:]:
            _drop_if_unused(graph, value)
        return {"node": node.name, "op": node.op_type, "weights": [conv.name], "new_adds": 0}
