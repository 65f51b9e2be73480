"""FoldNormScalesPass folds BatchNorm into Conv itself rather than with onnxscript's FuseBatchNormIntoConv:
the two agree to float32 round-off, but onnxscript computes in the parameters' float32 where ours computes
in float64, so its weights differ in the last bits (and lowbit's outputs must not change)."""

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule

from lowbit.passes.fold_norm_scales import FoldNormScalesPass
from tests import factories
from tests.parity import run


def _conv_bn(seed: int = 0, bias: bool = True) -> ir.Model:
    rng = np.random.default_rng(seed)
    x = factories.graph_input("x", [2, 3, 8, 8])
    w = factories.constant("w", rng.standard_normal((5, 3, 3, 3)).astype(np.float32))
    inputs = [x, w]
    initializers = [w]
    if bias:
        b = factories.constant("b", rng.standard_normal(5).astype(np.float32))
        inputs.append(b)
        initializers.append(b)
    params = [
        factories.constant(name, array.astype(np.float32))
        for name, array in (
            ("gamma", rng.standard_normal(5)),
            ("beta", rng.standard_normal(5)),
            ("mean", rng.standard_normal(5)),
            ("var", rng.uniform(0.1, 2.0, 5)),
        )
    ]
    conv = factories.node("Conv", inputs, "conv")
    bn = factories.node("BatchNormalization", [conv.outputs[0], *params], "bn", output="y", epsilon=1e-3)
    return factories.model([x], [bn.outputs[0]], [conv, bn], initializers + params)


def test_ours_and_onnxscripts_batchnorm_fold_agree_to_round_off():
    for bias in (True, False):
        feeds = factories.feeds_for(_conv_bn(bias=bias))
        (expected,) = run(_conv_bn(bias=bias), feeds)
        ours, theirs = _conv_bn(bias=bias), _conv_bn(bias=bias)
        FoldNormScalesPass()(ours)
        rewriter.rewrite(theirs, pattern_rewrite_rules=[fuse_batchnorm_into_conv_rule])
        assert [n.op_type for n in ours.graph] == [n.op_type for n in theirs.graph] == ["Conv"]
        (got_ours,), (got_theirs,) = run(ours, feeds), run(theirs, feeds)
        np.testing.assert_allclose(got_ours, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_theirs, got_ours, rtol=1e-4, atol=1e-4)
