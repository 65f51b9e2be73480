"""The bad-input corpus through the API and the CLI: a clear error (type, stage, a message that names
the file, tensor or node), one line and exit status 2 on the command line (the exception itself with
``--debug``), odd-but-valid inputs optimized, and no file of the user's changed. Saves are atomic."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib

import onnx
import pytest

import lowbit
from lowbit.cli import main
from tests import factories
from tests.bad_inputs.corpus import CASES, CLI_CASES, STAGES, Case
from tests.parity import check_valid

#: One case per stage that can fail, run with ``--debug``.
DEBUG_CASES = ("group_size_zero", "cycle", "external_data_missing", "nan_weight", "output_equals_input")


@pytest.fixture
def case(request, tmp_path) -> Case:
    with contextlib.ExitStack() as cleanup:
        yield CASES[request.param](tmp_path, cleanup)


def _digests(folder: pathlib.Path, leave_out: pathlib.Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks read through), by relative path."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = pathlib.Path(root) / name
            if path == leave_out or not path.exists():
                continue
            digests[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _run_api(case: Case):
    """``Recipe -> load -> optimize -> save`` as a user writes it: (failing stage, error, result)."""
    stage, result = STAGES[0], None
    try:
        recipe = lowbit.Recipe(**case.recipe)
        stage = "load"
        model = lowbit.load(case.model)
        stage = "optimize"
        calibration = case.calibration(model) if case.calibration else None
        result = lowbit.optimize(model, recipe, calibration=calibration)
        stage = "save"
        lowbit.save(result.model, case.output)
    except Exception as error:
        return stage, error, result
    return None, None, result


def _check_output(case: Case) -> None:
    if case.runs_in_ort:
        check_valid(lowbit.load(case.output))
    else:
        onnx.checker.check_model(str(case.output), full_check=True)


@pytest.mark.parametrize("case", sorted(CASES), indirect=True)
def test_api_gives_a_clear_error_and_changes_no_file(case, tmp_path):
    before = _digests(tmp_path)
    stage, error, result = _run_api(case)
    if case.error is None:
        assert error is None, f"odd but valid input failed at {stage}: {error!r}"
        _check_output(case)
        if case.check:
            case.check(result)
    else:
        assert isinstance(error, case.error), (
            f"expected {case.error.__name__} at {case.stage}, got {error!r} at {stage}"
        )
        assert stage == case.stage, f"{error!r} came at {stage}, expected at {case.stage}"
        for name in case.mentions:
            assert name in str(error), f"the message does not name {name!r}: {error}"
    assert _digests(tmp_path, leave_out=case.output if case.error is None else None) == before


def _run_cli(arguments: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(arguments)
    except SystemExit as exit_:  # argparse rejects a bad option value before lowbit runs
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CLI_CASES), indirect=True)
def test_cli_prints_one_line_and_changes_no_file(case, tmp_path, capsys):
    before = _digests(tmp_path)
    code, err = _run_cli(case.cli_arguments(), capsys)
    if case.error is None:
        assert code == 0, err
        _check_output(case)
        assert _digests(tmp_path, leave_out=case.output) == before
        return
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]  # stderr also carries progress bars
    assert len(lines) == 1, err
    assert lines[0].startswith("lowbit: error:") or lines[0].startswith("lowbit optimize: error: argument --"), err
    for name in case.mentions:
        assert name in err, f"the message does not name {name!r}: {err}"
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("case", DEBUG_CASES, indirect=True)
def test_cli_debug_raises_the_exception_itself(case):
    with pytest.raises(case.error):
        main(["--debug", *case.cli_arguments()])


def test_a_failed_save_keeps_the_previous_output_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The write goes to a temporary file that replaces the output only once complete."""
    output = tmp_path / "model.out.onnx"
    output.write_bytes(b"previous output")
    model = factories.mlp()

    def failing_write(model, path):
        pathlib.Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lowbit.api.proto_stream, "write_model", failing_write)
    with pytest.raises(OSError, match="model.out.onnx"):
        lowbit.save(model, output)
    assert output.read_bytes() == b"previous output"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.out.onnx"]
