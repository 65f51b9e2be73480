"""``files.file_bytes``: the bytes a model's file takes, counted without copying its tensors."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.ir import files
from tests import factories


def fused_with_outliers() -> ir.Model:
    model = factories.mlp(k=128, hidden=96, n=64)
    recipe = lowbit.Recipe(bits=3, group_size=32, fused=True, outlier_fraction=0.02, outlier_criterion="sensitivity")
    return lowbit.optimize(model, recipe, calibration=[factories.feeds_for(model)]).model


MODELS = {
    "mlp": factories.mlp,
    "tied_lm": factories.tied_lm,
    "gemm": factories.gemm,
    "export metadata": lambda: factories.with_export_metadata(factories.mlp(), 300),
    "fused with outliers": fused_with_outliers,
}


@pytest.mark.parametrize("name", MODELS)
def test_file_bytes_is_the_saved_file_size_and_leaves_the_model_unchanged(tmp_path, name):
    model = MODELS[name]()
    before = {value.name: value.const_value for value in model.graph.initializers.values()}
    counted = files.file_bytes(model)
    assert {value.name: value.const_value for value in model.graph.initializers.values()} == before
    assert all(model.graph.initializers[key].const_value is tensor for key, tensor in before.items())
    assert counted == lowbit.save(model, tmp_path / "model.onnx").stat().st_size
    assert counted > files.tensor_bytes(model)


@pytest.mark.parametrize("name", MODELS)
def test_file_bytes_with_a_data_file_is_an_upper_bound_within_the_offsets_digits(tmp_path, name):
    model = MODELS[name]()
    location = "model.onnx.data"
    counted = files.file_bytes(model, location)
    ir.save(model, tmp_path / "model.onnx", external_data=location)
    written = sum(path.stat().st_size for path in tmp_path.iterdir())
    assert written <= counted <= written + 20 * len(model.graph.initializers)


def quantized_int4() -> ir.Model:
    """Portable 3-bit codes: INT4/UINT4 tensors, whose bytes do not fill whole elements."""
    model = factories.mlp(k=128, hidden=96, n=64)
    return lowbit.optimize(model, lowbit.Recipe(bits=3, group_size=32, method="rtn", axis="oc")).model


@pytest.mark.parametrize("suffix", [".onnx", ".textproto"])
@pytest.mark.parametrize("make", [factories.mlp, quantized_int4], ids=["float", "int4"])
def test_model_bytes_counts_the_file_and_each_data_file_it_names_once(tmp_path, suffix, make):
    model = make()
    inline = tmp_path / f"inline{suffix}"
    onnx.save(ir.to_proto(model), inline)
    assert files.model_bytes(inline) == inline.stat().st_size
    split = tmp_path / "split.onnx"
    onnx.save(ir.to_proto(model), split, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert files.model_bytes(split) == split.stat().st_size + (tmp_path / "weights.bin").stat().st_size
