"""Rewrite rule ``Gather(DequantizeLinear(q, s[, z]), ids) -> com.microsoft::GatherBlockQuantized(q, ids, s[, z])``.

A quantized embedding table read by a Gather is dequantized whole on every run in the portable form
(SmolLM2: 28 M weights for a handful of token rows). ONNX Runtime's ``GatherBlockQuantized`` reads the
same 4-bit initializers and dequantizes only the gathered rows: zero copy, same numbers (the codes,
scales and zero points are ONNX ``DequantizeLinear``'s). It takes ``int4``/``uint4`` tables quantized in
blocks along the row (``axis=1``, power-of-two block >= 16), gathered along ``axis=0``; other tables stay
as they are and are listed with the reason.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

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


class _FuseDequantizeGather(pattern.RewriteRuleClassBase):
    """See the module docstring; ``state`` is the fuse run's ``FusionState`` (counts and rejections)."""

    def __init__(self, *, state: FusionState):
        super().__init__("FuseDequantizeGather", remove_nodes=True)
        self.state = state

    def pattern(self, op, table, ids):
        return op.Gather(table, ids, _allow_other_attributes=True, _outputs=["gathered"])

    def check(self, context, table, ids, gathered, **_):
        result = pattern.MatchResult()
        dequantize = table.producer()
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return result.fail("the Gather's table is not a DequantizeLinear output")
        reason = gather_blocker(gathered.producer(), dequantize)
        if reason is not None:
            self.state.reject(dequantize, reason)
            return result.fail(reason)
        return result

    def rewrite(self, op, table, ids, **_):
        dequantize = table.producer()
        codes, scales, zero_points = [*dequantize.inputs, None][:3]
        self.state.count("com.microsoft::GatherBlockQuantized 4")
        inputs = [codes, ids, scales] + ([zero_points] if zero_points is not None else [])
        gathered = op.op(
            "GatherBlockQuantized",
            *inputs,
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


def rule_set(state: FusionState) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_FuseDequantizeGather.rule(state=state)])
