"""Issue 16: a saved model does not depend on its input's files. Tensors that an optimized model still reads
from the input's external data file (a bias, an embedding table kept in float) are written inline, or into
the output's own ``<name>.data`` past the threshold, for the portable and the fused form; the input's data
file is never written; ONNX Runtime runs the output after the input's folder is gone."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.ir import files
from lowbit.kernels import _lib
from lowbit.runtime.session import session
from tests import factories

MODELS = {
    # Every tensor external (the biases too); both weights quantized, the biases left in float.
    "mlp": (factories.mlp, 0),
    # onnx.save's default threshold: the embedding table (kept in float, also the tied head) is external.
    "tied_lm": (factories.tied_lm, 1024),
}
RECIPES = {"portable": {}, "fused": {"fused": True}}


def _write_external(
    model: ir.Model, folder: pathlib.Path, threshold: int, location: str = "weights.bin"
) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(ir.to_proto(model), path, save_as_external_data=True, location=location, size_threshold=threshold)
    return path


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def _locations(path: pathlib.Path) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _optimize(path: pathlib.Path, recipe: str) -> lowbit.OptimizeResult:
    if recipe == "fused" and not _lib.is_built():
        pytest.skip("lowbit's op library is not built (python kernels/build.py)")
    model = lowbit.load(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    return lowbit.optimize(model, lowbit.Recipe(bits=4, group_size=8, **RECIPES[recipe]))


def _outputs(path: pathlib.Path, feeds) -> list[np.ndarray]:
    return session(path, matmulnbits_accuracy_level=0).run(None, feeds)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_in_another_folder_runs_without_the_input_folder(name, recipe, tmp_path):
    build, threshold = MODELS[name]
    source = _write_external(build(), tmp_path / "A", threshold)
    before = _digests(source.parent)
    result = _optimize(source, recipe)
    (tmp_path / "B").mkdir()
    output = lowbit.save(result.model, tmp_path / "B" / "out.onnx")
    assert _digests(source.parent) == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["out.onnx"]  # small: everything inline
    assert _locations(output) == set()
    feeds = factories.feeds_for(build())
    expected = _outputs(output, feeds)
    source.parent.rename(tmp_path / "A.moved")
    got = _outputs(output, feeds)
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)
    lowbit.load(output)  # and it loads back, checked


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_output_beside_the_input_does_not_read_its_data_file(recipe, tmp_path):
    source = _write_external(factories.mlp(), tmp_path / "A", 0)
    before = _digests(source.parent)
    result = _optimize(source, recipe)
    output = lowbit.save(result.model, source.parent / "out.onnx")
    assert {k: v for k, v in _digests(source.parent).items() if k != "out.onnx"} == before
    feeds = factories.feeds_for(factories.mlp())
    expected = _outputs(output, feeds)
    (source.parent / "weights.bin").unlink()
    for want, have in zip(expected, _outputs(output, feeds)):
        np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_past_the_threshold_every_tensor_goes_to_the_outputs_own_data_file(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", 0)
    source = _write_external(factories.tied_lm(), tmp_path / "A", 1024)
    before = _digests(source.parent)
    result = _optimize(source, recipe)
    (tmp_path / "B").mkdir()
    output = lowbit.save(result.model, tmp_path / "B" / "out.onnx")
    assert _digests(source.parent) == before
    assert _locations(output) == {"out.onnx.data"}
    feeds = factories.feeds_for(factories.tied_lm())
    expected = _outputs(output, feeds)
    source.parent.rename(tmp_path / "A.moved")
    for want, have in zip(expected, _outputs(output, feeds)):
        np.testing.assert_array_equal(have, want)


def test_save_leaves_the_model_reading_its_input_and_the_input_data_file_alone(tmp_path, monkeypatch):
    """After ``save`` the model still reads the input's file (nothing loaded into memory for good), and a
    model not made by ``lowbit.load`` is refused an output data file that is its own input data."""
    source = _write_external(factories.tied_lm(), tmp_path / "A", 1024, location="out.onnx.data")
    model = ir.load(source)  # no lowbit.load: save must still see which file the tensors read
    table = model.graph.initializers["embed"]
    assert isinstance(table.const_value, ir.ExternalTensor)
    lowbit.save(model, tmp_path / "A" / "copy.onnx")
    assert isinstance(table.const_value, ir.ExternalTensor)
    before = _digests(source.parent)
    monkeypatch.setattr(files, "EXTERNAL_DATA_THRESHOLD", 0)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        lowbit.save(model, tmp_path / "A" / "out.onnx")
    assert _digests(source.parent) == before
