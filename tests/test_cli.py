"""The command line: same results as the API, one-line errors with exit status 2, inputs untouched."""

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


def test_console_script_runs(mlp_file, tmp_path):
    """The installed entry point, as a user runs it."""
    completed = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "optimize", str(mlp_file), "-o", str(tmp_path / "o.onnx")],
        capture_output=True, text=True, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "o.onnx").is_file()
