"""FoldWeightsPass: lossless, folds layout/cast ops on weights, never duplicates a shared table."""

import numpy as np

from lowbit.passes.fold_weights import FoldWeightsPass
from tests import factories
from tests.parity import assert_parity, check_valid, serialized


def test_folds_transpose_and_cast_of_a_weight_losslessly():
    reference = factories.transposed_weight()
    model = factories.transposed_weight()
    result = FoldWeightsPass()(model)
    assert result.modified
    assert [node.op_type for node in model.graph] == ["MatMul"]
    weight = model.graph.node(0).inputs[1]
    assert weight.is_initializer() and list(weight.shape) == [33, 20]
    assert "w_nk" not in model.graph.initializers  # the unfolded source is gone
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), rtol=0, atol=0)


def test_nothing_to_fold_leaves_the_model_byte_identical():
    model = factories.mlp()
    before = serialized(model)
    result = FoldWeightsPass()(model)
    assert not result.modified
    assert serialized(model) == before


def test_tied_embedding_transpose_is_not_duplicated():
    model = factories.tied_lm()
    before = serialized(model)
    assert not FoldWeightsPass()(model).modified
    assert serialized(model) == before


def test_report_details_count_the_folded_nodes():
    fold = FoldWeightsPass()
    fold(factories.transposed_weight())
    assert fold.details["folded_nodes"] == 2
    np.testing.assert_equal(sorted(entry.split()[0] for entry in fold.details["folded"]), ["Cast", "Transpose"])


def test_folded_transpose_survives_save_reload_and_the_full_pipeline(tmp_path):
    """Regression: the folded Transpose used to be a non-contiguous view that broke initializer dedup."""
    import onnx_ir as ir

    import lowbit

    path = tmp_path / "t.onnx"
    ir.save(factories.transposed_weight(), path)
    recipe = lowbit.Recipe(bits=4, group_size=8, axis="ic", include_lm_head=True)  # its MatMul is the output
    result = lowbit.optimize(lowbit.load(path), recipe)
    check_valid(result.model)
    assert [record.shape for record in result.report.weights] == [[33, 20]]
