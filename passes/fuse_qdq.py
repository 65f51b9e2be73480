"""FuseQDQPass: ``DequantizeLinear + MatMul [+ bias Add]`` -> one fused op (``lowbit::QuantMatMul``, or on
request ``com.microsoft::MatMulNBits`` for per-OC 4-bit weights).

ONNX Runtime fuses only per-OC ``DequantizeLinear(axis=0)`` into ``MatMulNBits``; per-IC, 3-bit and 2-bit
weights run as a full float dequantization per call, many times slower than the float model. The fused
form runs them on lowbit's kernels (``kernels/``), so the model needs lowbit's op library at run time
(``lowbit.runtime.session`` registers it). Lossless with respect to the QDQ graph: the op dequantizes the
same integer codes with the same scales (the sum order differs: float32 round-off).

Quantized embedding tables read by a Gather are gathered from their codes (only the gathered rows are
dequantized): a tied LM head ``MatMul(x, Transpose(DequantizeLinear(table)))`` becomes a
``lowbit::QuantMatMul`` of the transposed codes and the embedding a ``lowbit::QuantGather`` over the same
initializers (one copy of the table); other 4-bit tables become ``com.microsoft::GatherBlockQuantized``, the
rest ``lowbit::QuantGather`` (``passes/rules/quantized_gather.py``).

Rules: ``passes/rules/quant_matmul.py`` and ``passes/rules/quantized_gather.py``. What is not fused (fp16 activations, a weight made by something
other than a constant DequantizeLinear, ...) stays as it was and is listed in ``details["unfused"]``
(``{DequantizeLinear node name, i.e. "<layer>.DequantizeLinear": reason}``; in an ``OptimizeReport``, the
details of the ``PassRecord`` named ``FuseQDQPass``). Dead DequantizeLinear nodes and their initializers
are removed. Fusion needs no declared types: a file without value_info fuses every weight (an activation
of unknown type is float32 like the weight it is multiplied with), and the fused ops' outputs get their
type and, where the activation's shape is known, their shape.
"""

from __future__ import annotations

import collections

import onnx_ir as ir
import onnx_ir.passes.common as common

from lowbit.ir import analysis
from lowbit.kernels import model as quant_matmul_op
from lowbit.passes.base import LowbitPass


class FuseQDQPass(LowbitPass):
    """Rewrite quantized weight MatMuls into fused ops.

    ``use_matmulnbits``: per-OC weights whose codes fit 4 bits and whose group is a power of two >= 16 go
    to ONNX Runtime's ``MatMulNBits`` instead, with ``matmulnbits_accuracy_level`` (0: fp32 activations,
    the QDQ graph's numerics; 4: int8 activations, adds activation error). Off by default: level 0 is
    lossless but slower than lowbit's own kernel, level 4 is not lossless (bench_matmul's tables, README).
    Every other weight whose activation is float32, or of unknown type, goes to ``lowbit::QuantMatMul``.

    ``int8_activations``: the ``lowbit::QuantMatMul`` nodes get ``int8_activations=1`` (activations quantized
    to int8 at run time, ``kernels/reference.py``): faster, not lossless, the counterpart of level 4.
    """

    def __init__(
        self, *, use_matmulnbits: bool = False, matmulnbits_accuracy_level: int = 0, int8_activations: bool = False
    ):
        super().__init__()
        if matmulnbits_accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"matmulnbits_accuracy_level must be 0..4, got {matmulnbits_accuracy_level}")
        self.use_matmulnbits = use_matmulnbits
        self.matmulnbits_accuracy_level = matmulnbits_accuracy_level
        self.int8_activations = int8_activations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Imported here: the rules load onnxscript's rewriter, whose memory a compile need not hold while it
        # quantizes (this pass runs after the weights are written).
        from lowbit.passes.rules import quant_matmul, quantized_gather

        state = quant_matmul.FusionState(model.graph)
        rule_sets = quant_matmul.rule_sets(
            state,
            use_matmulnbits=self.use_matmulnbits,
            accuracy_level=self.matmulnbits_accuracy_level,
            int8_activations=self.int8_activations,
        )
        bytes_before = analysis.initializer_bytes(model.graph)
        rule_sets.append(quantized_gather.rule_set(state))
        # Matching evaluates Constant nodes and may give their outputs a type: undone when nothing is fused,
        # so that a pass with nothing to do leaves the model byte-identical.
        declared = {id(value): (value, value.type, value.shape) for node in model.graph for value in node.outputs}
        rewrites = sum(rule_set.apply_to_model(model) for rule_set in rule_sets)
        if rewrites:
            common.RemoveUnusedNodesPass()(model)
            common.RemoveUnusedOpsetsPass()(model)
        else:
            for value, type_, shape in declared.values():
                value.type, value.shape = type_, shape
        # A rejected weight producer that is still in the graph still feeds an unfused MatMul.
        unfused = {
            node.name or node.outputs[0].name or "<unnamed>": reason
            for node, reason in state.rejected.items()
            if node.graph is not None
        }
        self.details = {
            "fused": dict(sorted(state.fused.items())),
            "unfused": unfused,
            "initializer_bytes_before": bytes_before,
            "initializer_bytes_after": analysis.initializer_bytes(model.graph),
            "scale_types": _scale_types(model.graph),
        }
        return ir.passes.PassResult(model, modified=bool(rewrites))


def _scale_types(graph: ir.Graph) -> dict[str, int]:
    """How many of lowbit's fused weights store their scales in each type (float16 where lossless)."""
    scales = {
        id(node.inputs[2]): node.inputs[2]
        for node in graph
        if node.domain == quant_matmul_op.DOMAIN
        and node.op_type in (quant_matmul_op.OP_TYPE, quant_matmul_op.GATHER_OP_TYPE)
    }
    counts = collections.Counter(value.dtype.name.lower() for value in scales.values())
    return dict(sorted(counts.items()))
