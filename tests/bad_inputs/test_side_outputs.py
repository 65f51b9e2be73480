"""Side outputs (the report, the HTML view, the per-pass dumps) never land on a file the input model
reads, and every output path is checked before any work is done."""

from __future__ import annotations

import hashlib
import pathlib

import onnx
import pytest

import lowbit
from lowbit.cli import main
from lowbit.passes.pipelines import DUMP_DIR_VARIABLE
from tests import factories


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def external_model(tmp_path) -> pathlib.Path:
    """in/model.onnx with its tensors in in/weights.bin."""
    folder = tmp_path / "in"
    folder.mkdir()
    proto = onnx.shape_inference.infer_shapes(lowbit.api.ir.to_proto(factories.mlp()))
    onnx.save(proto, folder / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "out").mkdir()
    return folder / "model.onnx"


def test_report_over_the_inputs_data_file_is_refused(external_model, capsys):
    before = _digests(external_model.parent)
    output = external_model.parent.parent / "out" / "m.onnx"
    code = main(
        ["optimize", str(external_model), "-o", str(output), "--report", str(external_model.parent / "weights.bin")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "refusing to overwrite" in err and "weights.bin" in err and "--report" in err
    assert _digests(external_model.parent) == before and not output.exists()


def test_output_model_over_the_inputs_data_file_is_refused(external_model, capsys):
    before = _digests(external_model.parent)
    code = main(["optimize", str(external_model), "-o", str(external_model.parent / "weights.bin.onnx")])
    assert code == 0  # a new name beside the input is fine
    code = main(["optimize", str(external_model), "-o", str(external_model.parent / "model.onnx")])
    assert code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert {name: digest for name, digest in _digests(external_model.parent).items() if name in before} == before


def test_view_over_the_inputs_data_file_is_refused(external_model, capsys):
    before = _digests(external_model.parent)
    code = main(["view", str(external_model), "-o", str(external_model.parent / "weights.bin")])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to overwrite" in err and "HTML view" in err
    assert _digests(external_model.parent) == before


def test_a_report_path_that_cannot_be_written_fails_before_the_model_is_written(external_model, capsys):
    output = external_model.parent.parent / "out" / "m.onnx"
    code = main(
        ["optimize", str(external_model), "-o", str(output), "--report", str(output.parent / "nowhere" / "r.json")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--report folder" in err and "nowhere" in err and "does not exist" in err
    assert not output.exists()


def test_an_output_under_a_file_says_the_parent_is_a_file(external_model, capsys):
    (external_model.parent.parent / "a_file").write_text("x")
    code = main(["optimize", str(external_model), "-o", str(external_model.parent.parent / "a_file" / "m.onnx")])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_dumps_never_overwrite_the_input(tmp_path, monkeypatch):
    """A dump folder that holds the input under a dump's name: the dump is refused, the input kept."""
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir()
    source = dump_dir / "00_FoldWeightsPass.onnx"
    lowbit.save(factories.mlp(), source)
    before = source.read_bytes()
    monkeypatch.setenv(DUMP_DIR_VARIABLE, str(dump_dir))
    with pytest.raises(
        ValueError, match="refusing to overwrite .*00_FoldWeightsPass.onnx' with the LOWBIT_DUMP_DIR dump"
    ):
        lowbit.optimize(lowbit.load(source), lowbit.Recipe(bits=4, group_size=8))
    assert source.read_bytes() == before
