"""Rewrite rule ``Gather(DequantizeLinear(q, s[, z]), ids)`` -> a gather of the quantized rows.

A quantized embedding table read by a Gather is dequantized whole on every run in the portable form
(SmolLM2: 28 M weights for a handful of token rows). The fused form dequantizes only the gathered rows:

* a table that a fused LM head also reads (tied: ``MatMul(x, Transpose(DequantizeLinear(table)))`` became a
  ``lowbit::QuantMatMul`` of the transposed codes) becomes ``lowbit::QuantGather`` over that op's own packed
  codes, scales and zero points: one copy of the table serves both;
* any other 4-bit table quantized in blocks along the row (``axis=1``, power-of-two block >= 16) becomes ONNX
  Runtime's ``com.microsoft::GatherBlockQuantized`` over the same initializers (zero copy);
* every other table (2, 3 or 8 bits, other blocks) becomes ``lowbit::QuantGather`` over codes packed at
  their own width.

Same numbers in every case (the codes, scales and zero points are ONNX ``DequantizeLinear``'s). Tables that
none of them takes (gathered along another axis, non-constant, int32 ids for ``QuantGather``) stay as they
are and are listed with the reason.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from lowbit.kernels import model as lowbit_ops
from lowbit.passes.rules.quant_matmul import MATMULNBITS_DOMAIN, FusionState

_TABLE_TYPES = frozenset({ir.DataType.INT4, ir.DataType.UINT4})


def gather_blocker(gather: ir.Node, dequantize: ir.Node) -> str | None:
    """Why ``GatherBlockQuantized`` cannot replace ``gather`` of ``dequantize``'s output (None: it can)."""
    codes = dequantize.inputs[0]
    if any(value is not None and value.const_value is None for value in dequantize.inputs):
        return "DequantizeLinear inputs are not all constants"
    if codes.dtype not in _TABLE_TYPES or len(codes.const_value.shape) != 2:
        return f"GatherBlockQuantized takes 2-D int4/uint4 tables, not {codes.dtype} {codes.const_value.shape}"
    block = dequantize.attributes.get_int("block_size", 0)
    if dequantize.attributes.get_int("axis", 1) not in (1, -1) or block < 16 or block & (block - 1):
        return "GatherBlockQuantized needs blocks along the row (axis=1) of a power-of-two size >= 16"
    if gather.attributes.get_int("axis", 0) != 0:
        return "GatherBlockQuantized gathers rows (axis=0) only"
    declared = gather.outputs[0].dtype  # None without value_info: a Gather's output has its table's type
    if declared is not None and dequantize.inputs[1].dtype != declared:
        return "the table's scales and the Gather output differ in type"
    return None


def quant_gather_blocker(gather: ir.Node, ids: ir.Value, weight) -> str | None:
    """Why ``lowbit::QuantGather`` cannot replace ``gather`` (None: it can); ``weight`` is the table's
    ``FusionState.dequantized`` reading, transposed (``W = table^T``), or why it could not be read."""
    if isinstance(weight, str):
        return weight
    if gather.attributes.get_int("axis", 0) != 0:
        return "lowbit::QuantGather gathers rows (axis=0) only"
    if ids.dtype is not None and ids.dtype != ir.DataType.INT64:
        return f"lowbit::QuantGather takes int64 ids, not {ids.dtype}"
    return None


class _FuseDequantizeGather(pattern.RewriteRuleClassBase):
    """See the module docstring; ``state`` is the fuse run's ``FusionState`` (counts and rejections)."""

    def __init__(self, *, state: FusionState):
        super().__init__("FuseDequantizeGather", remove_nodes=True)
        self.state = state
        self._name: str | None = None  # of the Gather being fused

    def pattern(self, op, table, ids):
        return op.Gather(table, ids, _allow_other_attributes=True, _outputs=["gathered"])

    def check(self, context, table, ids, gathered, **_):
        result = pattern.MatchResult()
        self._name = gathered.producer().name  # the fused node keeps the Gather's name
        dequantize = table.producer()
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return result.fail("the Gather's table is not a DequantizeLinear output")
        target, reason = self._target(dequantize, ids, gathered.producer())
        if target is None:
            self.state.reject(dequantize, reason)
            return result.fail(reason)
        return result

    def _target(self, dequantize: ir.Node, ids: ir.Value, gather: ir.Node) -> tuple[str | None, str | None]:
        """``("shared" | "GatherBlockQuantized" | "packed", None)`` (see the module docstring), or
        ``(None, why)`` when the Gather stays."""
        source = (dequantize, True)
        weight = self.state.dequantized(*source)
        quant_gather = quant_gather_blocker(gather, ids, weight)
        if quant_gather is None and self.state.made_constants(source, "lowbit") is not None:
            return "shared", None
        block_quantized = gather_blocker(gather, dequantize)
        if block_quantized is None and (isinstance(weight, str) or weight.bits == 4):
            return "GatherBlockQuantized", None
        if quant_gather is None:
            return "packed", None
        return None, f"{block_quantized}; {quant_gather}" if block_quantized else quant_gather

    def rewrite(self, op, table, ids, gathered, **_):
        dequantize = table.producer()
        target, _ = self._target(dequantize, ids, gathered.producer())
        if target != "GatherBlockQuantized":
            return self._quant_gather(op, dequantize, ids, shared=target == "shared")
        codes, scales, zero_points = [*dequantize.inputs, None][:3]
        self.state.count("com.microsoft::GatherBlockQuantized 4")
        inputs = [codes, ids, scales] + ([zero_points] if zero_points is not None else [])
        gathered = op.op(
            "GatherBlockQuantized",
            *inputs,
            _name=self._name,
            _domain=MATMULNBITS_DOMAIN,
            _version=1,
            bits=4,
            block_size=dequantize.attributes.get_int("block_size"),
            gather_axis=0,
            quantize_axis=1,
        )
        gathered.dtype = scales.dtype  # the table's type; the rows: ids' shape + [D]
        if ids.shape is not None:
            gathered.shape = ir.Shape([*ids.shape, codes.const_value.shape[1]])
        return gathered

    def _quant_gather(self, op, dequantize: ir.Node, ids: ir.Value, shared: bool):
        """``lowbit::QuantGather`` of the columns of ``W = table^T``, over the tied head's initializers
        (``shared``) or over its own, made the same way."""
        source = (dequantize, True)
        weight = self.state.dequantized(*source)
        constants = self.state.lowbit_constants(op, source, weight)
        self.state.count(f"lowbit::QuantGather {weight.bits}" + (" (shares the LM head's codes)" if shared else ""))
        inputs = [constants["packed"], ids, constants["scales"], constants["zero_points"]]
        gathered = op.op(
            lowbit_ops.GATHER_OP_TYPE,
            *inputs,
            _name=self._name,
            _domain=lowbit_ops.DOMAIN,
            _version=1,
            **weight.op_attributes(),
        )
        gathered.dtype = ir.DataType.FLOAT
        if ids.shape is not None:
            gathered.shape = ir.Shape([*ids.shape, weight.shape[0]])
        return gathered


def rule_set(state: FusionState) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_FuseDequantizeGather.rule(state=state)])
