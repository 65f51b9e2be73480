"""The pass protocol (passes/base.py): every pass reports through the same attributes and refuses, before it
runs, a model without what it needs, naming itself and the missing statistics."""

import onnx_ir as ir
import pytest

from lowbit.passes import pipelines
from lowbit.passes.base import LowbitPass
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.recipe import Recipe
from lowbit.passes.reorder_channels import ReorderChannelsPass
from lowbit.passes.split_outliers import SplitOutliersPass
from tests import factories


@pytest.mark.parametrize(
    "pass_",
    [
        QuantizeWeightsPass(QuantScheme(method="gptq")),
        QuantizeWeightsPass(QuantScheme(), candidate_axes=("oc", "ic")),
        ReorderChannelsPass("hessian"),
        SplitOutliersPass(outlier_fraction=0.01, criterion="sensitivity"),
    ],
)
def test_a_pass_without_its_calibration_is_refused_before_it_runs(pass_):
    model = factories.mlp()
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(ir.passes.PreconditionError, match=f"{type(pass_).__name__} needs calibration statistics"):
        pass_(model)
    assert ir.to_proto(model).SerializeToString() == before
    with pytest.raises(ValueError):  # and a ValueError, as lowbit's other refusals
        pass_(model)


def test_every_pipeline_pass_reports_through_the_protocol():
    recipe = Recipe(bits=4, group_size=8, fused=True, outlier_fraction=0.01, fold_norms=True, include_lm_head=True)
    passes = pipelines.portable_pipeline(recipe, calibration=[factories.feeds_for(factories.mlp())])
    assert all(isinstance(pass_, LowbitPass) for pass_ in passes)
    model = factories.mlp()
    for pass_ in passes:
        pass_(model)
        assert (
            isinstance(pass_.details, dict)
            and isinstance(pass_.weight_records, list)
            and isinstance(pass_.skipped, list)
        )
    quantize = next(p for p in passes if isinstance(p, QuantizeWeightsPass))
    assert len(quantize.weight_records) == 2
    quantize(model)  # a second run reports only itself
    assert quantize.weight_records == []
