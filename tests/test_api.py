"""Public API: load/save safety, Recipe validation, optimize end to end on a small graph."""

import hashlib
import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.passes.pipelines import DUMP_DIR_VARIABLE
from tests import factories
from tests.parity import check_valid, run


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(factories.mlp(), path)
    return path


def test_optimize_save_load_round_trip(mlp_file, tmp_path):
    digest = _sha(mlp_file)
    model = lowbit.load(mlp_file)
    result = lowbit.optimize(model, lowbit.Recipe(bits=4, group_size=16, axis="ic"))
    assert result.model is model
    output = lowbit.save(result.model, tmp_path / "mlp.w4.onnx")
    assert _sha(mlp_file) == digest  # the input is untouched
    reloaded = lowbit.load(output)
    check_valid(reloaded)
    assert output.stat().st_size < mlp_file.stat().st_size
    report = result.report
    assert [p.name for p in report.passes] == ["FoldWeightsPass", "QuantizeWeightsPass", "CleanupPass"]
    assert [w.name for w in report.weights] == ["w1", "w2"]
    assert all(0 < w.relative_error < 0.2 for w in report.weights)
    again = lowbit.OptimizeReport.from_json(report.to_json())
    assert again == report
    assert json.loads(report.to_json())["recipe"]["axis"] == "ic"
    feeds = factories.feeds_for(reloaded)
    float_out = run(factories.mlp(), feeds)[0]
    quant_out = run(reloaded, feeds)[0]
    assert np.linalg.norm(quant_out - float_out) / np.linalg.norm(float_out) < 0.1


def test_save_refuses_to_overwrite_the_input(mlp_file):
    digest = _sha(mlp_file)
    model = lowbit.load(mlp_file)
    lowbit.optimize(model, lowbit.Recipe())
    with pytest.raises(ValueError, match="refusing to overwrite"):
        lowbit.save(model, mlp_file)
    same_file_other_spelling = mlp_file.parent / "." / mlp_file.name
    with pytest.raises(ValueError, match="refusing to overwrite"):
        lowbit.save(model, same_file_other_spelling)
    assert _sha(mlp_file) == digest


def test_save_leaves_no_temporary_file_behind(mlp_file, tmp_path):
    lowbit.save(lowbit.load(mlp_file), tmp_path / "copy.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "mlp.onnx"]


@pytest.mark.parametrize("content, message", [(b"", "not a usable ONNX model"), (b"\x08\x07garbage\xff\xff", "not a readable ONNX")])
def test_load_rejects_files_that_are_not_onnx(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        lowbit.load(path)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        lowbit.load(tmp_path / "nope.onnx")


def _with_external_location(tmp_path, location: str):
    proto = ir.to_proto(factories.mlp())
    tensor = next(t for t in proto.graph.initializer if t.name == "w1")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path = tmp_path / "model" / "ext.onnx"
    path.parent.mkdir()
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize(
    "location, error, message",
    [
        ("../outside.bin", ValueError, "outside the model's folder"),
        ("/etc/passwd", ValueError, "absolute"),
        ("missing.bin", FileNotFoundError, "missing"),
    ],
)
def test_load_rejects_unsafe_or_missing_external_data(tmp_path, location, error, message):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 40 * 72 * 4)
    with pytest.raises(error, match=message):
        lowbit.load(_with_external_location(tmp_path, location))


def test_load_rejects_a_symlink_that_escapes_the_folder(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 40 * 72 * 4)
    path = _with_external_location(tmp_path, "link.bin")
    os.symlink(tmp_path / "outside.bin", path.parent / "link.bin")
    with pytest.raises(ValueError, match="outside the model's folder"):
        lowbit.load(path)


@pytest.mark.parametrize("kwargs", [{"axis": "adadim"}, {"method": "gptq"}])
def test_calibrated_recipes_without_calibration_are_refused(kwargs):
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.optimize(factories.mlp(), lowbit.Recipe(**kwargs))


def test_unknown_selector_is_refused():
    with pytest.raises(ValueError, match="selector"):
        lowbit.Recipe(axis="adadim", selector="oracle")


@pytest.mark.parametrize("kwargs", [{"bits": 5}, {"group_size": 0}, {"axis": "rows"}, {"method": "awq"}])
def test_recipe_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        lowbit.Recipe(**kwargs)


def test_optimize_with_calibration_runs_adadim_gptq_and_reports_output_error():
    model = factories.mlp()
    batches = [factories.feeds_for(model, seed=seed) for seed in range(4)]
    result = lowbit.optimize(model, lowbit.Recipe(bits=3, group_size=16, axis="adadim", method="gptq"), calibration=batches)
    assert [p.name for p in result.report.passes] == ["FoldWeightsPass", "CaptureCalibrationPass", "QuantizeWeightsPass", "CleanupPass"]
    assert result.report.passes[1].details["batches"] == 4
    assert all(w.method == "gptq" and w.output_error is not None and set(w.axis_errors) == {"oc", "ic"} for w in result.report.weights)
    check_valid(result.model)


def test_optimize_needs_an_ir_model(mlp_file):
    with pytest.raises(TypeError, match="lowbit.load"):
        lowbit.optimize(str(mlp_file), lowbit.Recipe())


def test_dump_dir_saves_the_model_after_each_pass(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_DIR_VARIABLE, str(tmp_path / "dump"))
    lowbit.optimize(factories.mlp(), lowbit.Recipe(bits=8))
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumped == ["00_FoldWeightsPass.onnx", "01_QuantizeWeightsPass.onnx", "02_CleanupPass.onnx"]
    check_valid(ir.load(tmp_path / "dump" / "02_CleanupPass.onnx"))


def test_fused_recipe_writes_fused_ops_that_run_in_a_lowbit_session(mlp_file, tmp_path, ops_library):
    from lowbit.runtime.session import session

    portable = lowbit.optimize(lowbit.load(mlp_file), lowbit.Recipe(bits=3, group_size=16, axis="ic")).model
    result = lowbit.optimize(lowbit.load(mlp_file), lowbit.Recipe(bits=3, group_size=16, axis="ic", fused=True))
    assert [p.name for p in result.report.passes][-2:] == ["FuseQDQPass", "CleanupPass"]
    assert [node.op_type for node in result.model.graph] == ["QuantMatMul", "Relu", "QuantMatMul"]
    path = lowbit.save(result.model, tmp_path / "mlp.w3.fused.onnx")
    feeds = factories.feeds_for(result.model)
    fused = session(path).run(None, feeds)[0]
    expected = run(portable, feeds)[0]
    np.testing.assert_allclose(fused, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
