"""Issue 16: every ONNX Runtime session that lowbit opens from an in-memory model (calibration, the AdaDim
block/layer selectors, the sequential sweep) finds the model's external data in the model's folder,
wherever the process stands; the result equals that of the same model with its tensors inline."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.runtime import session as runtime_session
from lowbit.runtime.calibration import collect
from tests import factories
from tests.parity import run

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the 'models' extra (transformers) is not installed")

from tests.passes.test_sequential import VOCAB, _llama_proto  # noqa: E402  (needs torch and transformers)


def _write_external(proto: onnx.ModelProto, folder: pathlib.Path, threshold: int = 0) -> pathlib.Path:
    """``folder/model.onnx`` with every tensor over ``threshold`` bytes in ``folder/weights.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    path = folder / "model.onnx"
    onnx.save(
        copy,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=threshold,
    )
    return path


def _write_inline(proto: onnx.ModelProto, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(proto, path)
    return path


def _feeds(count: int = 3, tokens: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, VOCAB, (2, tokens))} for _ in range(count)]


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def _external_tensors(model: ir.Model) -> list[str]:
    return [
        name for name, value in model.graph.initializers.items() if isinstance(value.const_value, ir.ExternalTensor)
    ]


RECIPES = {
    "adadim_gptq_block": dict(bits=4, group_size=16, axis="adadim", method="gptq", selector="block"),
    "sequential_layer": dict(
        bits=4, group_size=16, axis="adadim", method="gptq", selector="layer", calibration_mode="sequential"
    ),
}


@pytest.mark.parametrize("threshold", [0, 1024])  # 0: the shape constants are external too
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_calibrated_recipes_run_a_model_with_external_data_from_another_folder(
    recipe, threshold, tmp_path, monkeypatch
):
    proto = onnx.load_from_string(_llama_proto(2))
    external = _write_external(proto, tmp_path / "A", threshold)
    inline = _write_inline(proto, tmp_path / "inline")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    model = lowbit.load(external)
    assert _external_tensors(model)  # the case under test
    got = lowbit.optimize(model, lowbit.Recipe(**RECIPES[recipe]), calibration=_feeds())
    want = lowbit.optimize(lowbit.load(inline), lowbit.Recipe(**RECIPES[recipe]), calibration=_feeds())

    details = {p.name: p.details for p in got.report.passes}["QuantizeWeightsPass"]
    assert details["selection"]["modules"] > 0
    assert [(w.name, w.axis) for w in got.report.weights] == [(w.name, w.axis) for w in want.report.weights]
    have, expect = _initializers(got.model), _initializers(want.model)
    assert sorted(have) == sorted(expect)
    for name in expect:
        np.testing.assert_array_equal(have[name], expect[name], err_msg=name)


def test_collect_finds_external_data_wherever_the_process_stands(tmp_path, monkeypatch):
    proto = ir.to_proto(factories.mlp())
    external = _write_external(proto, tmp_path / "A")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = lowbit.load(external)
    batches = [factories.feeds_for(model, seed=seed) for seed in range(3)]
    got = collect(model, batches)
    want = collect(factories.mlp(), batches)
    for name, stats in want.by_activation.items():
        np.testing.assert_allclose(got.by_activation[name].hessian, stats.hessian, rtol=1e-12)


def test_session_from_model_reads_external_data_of_several_files(tmp_path, monkeypatch):
    """Tensors in two data files are found in the model's folder; nothing is read from the cwd."""
    model = factories.mlp()
    proto = ir.to_proto(model)
    folder = tmp_path / "A"
    folder.mkdir()
    for tensor, location in zip(proto.graph.initializer, ["one.bin", "two.bin", "one.bin", "two.bin"]):
        onnx.external_data_helper.set_external_data(tensor, location)
    onnx.save(proto, folder / "model.onnx")  # writes each tensor's bytes to its file
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "one.bin").write_bytes(b"\0" * 100000)  # a decoy in the working directory
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = lowbit.load(folder / "model.onnx")
    assert sorted(runtime_session.external_data_dirs(loaded)) == ["one.bin", "two.bin"]
    feeds = factories.feeds_for(model)
    np.testing.assert_array_equal(runtime_session.session_from_model(loaded).run(None, feeds)[0], run(model, feeds)[0])
