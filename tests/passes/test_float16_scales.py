"""Float16 scales: the fused form's default stores every weight's scales as float16 (the values the
quantizer rounded them to before choosing the codes), so the file is smaller by half the scale bytes and
computes what a portable model with the same rounded scales computes; a weight whose scales leave float16's
normal range keeps float32 scales (lossless, never silently coarser)."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit.ir import files
from lowbit.passes.recipe import Recipe
from tests import factories
from tests.parity import run

RTOL = 1e-5  # as tests/passes/test_fuse_qdq.py


def _scale_inputs(model: ir.Model) -> list[ir.Value]:
    return [node.inputs[2] for node in model.graph if node.op_type in ("QuantMatMul", "QuantGather")]


def _fuse_details(result: lowbit.OptimizeResult) -> dict:
    return next(record for record in result.report.passes if record.name == "FuseQDQPass").details


def _tensor_bytes(model: ir.Model) -> int:
    return sum(tensor.nbytes for _, tensor in files.tensors(model) if tensor is not None)


@pytest.mark.parametrize("bits, axis", [(4, "oc"), (3, "ic"), (2, "ic"), (8, "oc")])
def test_fused_default_stores_float16_scales_and_computes_the_rounded_portable_model(ops_library, bits, axis):
    recipe = Recipe(bits=bits, group_size=8, axis=axis, fused=True)
    assert recipe.stored_scale_dtype == "float16" and Recipe().stored_scale_dtype == "float32"
    fused_result = lowbit.optimize(factories.mlp(), recipe)
    fused = fused_result.model
    scales = _scale_inputs(fused)
    assert len(scales) == 2 and {value.dtype for value in scales} == {ir.DataType.FLOAT16}
    assert _fuse_details(fused_result)["scale_types"] == {"float16": 2}
    wide = lowbit.optimize(factories.mlp(), dataclasses.replace(recipe, scale_dtype="float32")).model
    wide_scales = _scale_inputs(wide)
    assert {value.dtype for value in wide_scales} == {ir.DataType.FLOAT}
    saved = sum(value.const_value.nbytes for value in wide_scales) // 2
    assert _tensor_bytes(wide) - _tensor_bytes(fused) == saved > 0
    portable = lowbit.optimize(factories.mlp(), dataclasses.replace(recipe, fused=False, scale_dtype="float16")).model
    feeds = factories.feeds_for(fused)
    (want,) = run(portable, feeds)
    (got,) = run(fused, feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_tied_table_and_head_share_float16_scales(ops_library):
    recipe = Recipe(bits=4, group_size=16, include_lm_head=True, include_embeddings=True, fused=True)
    model = lowbit.optimize(factories.tied_lm(), recipe).model
    scales = _scale_inputs(model)
    assert [node.op_type for node in model.graph] == ["QuantGather", "Relu", "QuantMatMul"]
    assert scales[0] is scales[1] and scales[0].dtype == ir.DataType.FLOAT16
    portable = lowbit.optimize(factories.tied_lm(), dataclasses.replace(recipe, fused=False, scale_dtype="float16"))
    feeds = factories.feeds_for(model)
    (want,) = run(portable.model, feeds)
    (got,) = run(model, feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def _mlp_with_a_tiny_weight() -> ir.Model:
    model = factories.mlp()
    tiny = next(v for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 2)
    tiny.const_value = ir.tensor(tiny.const_value.numpy() * np.float32(1e-7), name=tiny.name)
    return model


def test_a_weight_with_scales_below_float16s_normal_range_keeps_float32_scales(ops_library):
    """Weights of magnitude 1e-7 have scales near 1e-8, which float16 holds only as a coarse subnormal: that
    weight is stored with float32 scales, the other with float16, and both compute as the portable model."""
    recipe = Recipe(bits=4, group_size=8, fused=True)
    result = lowbit.optimize(_mlp_with_a_tiny_weight(), recipe)
    assert _fuse_details(result)["scale_types"] == {"float": 1, "float16": 1}
    fused = result.model
    by_weight = {node.name: node.inputs[2].dtype for node in fused.graph if node.op_type == "QuantMatMul"}
    assert sorted(by_weight.values(), key=str) == sorted([ir.DataType.FLOAT, ir.DataType.FLOAT16], key=str)
    portable = lowbit.optimize(
        _mlp_with_a_tiny_weight(), dataclasses.replace(recipe, fused=False, scale_dtype="float16")
    ).model
    feeds = factories.feeds_for(fused)
    (want,) = run(portable, feeds)
    (got,) = run(fused, feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_recipe_scale_dtype_is_validated():
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        Recipe(fused=True, scale_dtype="bfloat16")
