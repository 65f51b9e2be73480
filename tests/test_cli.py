"""The command line: same results as the API, one-line errors with exit status 2, inputs untouched."""

import hashlib
import json
import subprocess
import sys

import onnx_ir as ir
import pytest

from lowbit.cli import main
from tests import factories
from tests.parity import check_valid


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(factories.mlp(), path)
    return path


def test_optimize_writes_model_and_report(mlp_file, tmp_path, capsys):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["optimize", str(mlp_file), "-o", str(output), "--bits", "3", "--group-size", "8", "--axis", "ic", "--report", str(report)])
    assert code == 0
    check_valid(ir.load(output))
    data = json.loads(report.read_text())
    assert {w["bits"] for w in data["weights"]} == {3} and {w["axis"] for w in data["weights"]} == {"ic"}
    assert "quantized 2 weights" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--axis", "adadim"], "needs calibration data"),
        (["--method", "gptq"], "needs calibration data"),
        (["--group-size", "0"], "group_size"),
    ],
)
def test_bad_recipes_fail_with_one_line(mlp_file, tmp_path, capsys, arguments, message):
    code = main(["optimize", str(mlp_file), "-o", str(tmp_path / "out.onnx"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_output_equal_to_input_is_refused_and_input_untouched(mlp_file, capsys):
    digest = hashlib.sha256(mlp_file.read_bytes()).hexdigest()
    assert main(["optimize", str(mlp_file), "-o", str(mlp_file)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert hashlib.sha256(mlp_file.read_bytes()).hexdigest() == digest


def test_missing_input_fails_cleanly(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "none.onnx" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "optimize", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.onnx")])


def test_console_script_runs(mlp_file, tmp_path):
    """The installed entry point, as a user runs it."""
    completed = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "optimize", str(mlp_file), "-o", str(tmp_path / "o.onnx")],
        capture_output=True, text=True, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "o.onnx").is_file()
