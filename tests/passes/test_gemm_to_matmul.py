"""Why QuantizeWeightsPass keeps its own Gemm -> MatMul rewrite (passes/gemm_to_matmul.py): onnxscript's
rule (Reshape -> Gemm(alpha=1, beta=1) -> Reshape only) does not match the Gemms lowbit meets, whatever
their transB, alpha, beta and bias shape; ours writes the same function for all of them."""

import numpy as np
import pytest
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

import lowbit
from tests import factories
from tests.parity import run

CASES = [
    dict(trans_b=1, alpha=0.5, beta=2.0),
    dict(trans_b=0, alpha=1.0, beta=1.0),
    dict(trans_b=1, alpha=1.0, beta=1.0),
    dict(trans_b=0, alpha=-1.5, beta=0.25),
]


@pytest.mark.parametrize("case", CASES)
def test_onnxscript_rule_leaves_our_gemms_alone(case):
    model = factories.gemm(**case)
    rewriter.rewrite(model, pattern_rewrite_rules=[gemm_to_matmul_add_rule])
    assert [node.op_type for node in model.graph] == ["Gemm"]


@pytest.mark.parametrize("case", CASES)
def test_ours_computes_the_gemm_of_the_quantized_weight(case):
    model = factories.gemm(**case)
    feeds = factories.feeds_for(model)
    w = model.graph.initializers["w"].const_value.numpy()
    c = model.graph.initializers["c"].const_value.numpy()
    result = lowbit.optimize(model, lowbit.Recipe(bits=8, group_size=-1, include_lm_head=True))
    assert "Gemm" not in [node.op_type for node in result.model.graph]
    (actual,) = run(result.model, feeds)
    b = w.T if case["trans_b"] else w
    expected = case["alpha"] * feeds["x"] @ b + case["beta"] * c
    np.testing.assert_allclose(actual, expected, rtol=0.02, atol=0.05 * np.abs(expected).max())
