"""tools/dev/bench_optimize.py on a tiny model: a row per phase as it ends, the parts of quantization, the table."""

from __future__ import annotations

import json

import pytest

import lowbit
from lowbit.passes import quantize_candidates
from lowbit.tools.dev import bench_optimize
from tests import factories


def test_every_phase_is_a_row_and_the_timers_are_removed_after(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    lowbit.save(factories.mlp(), path)
    original = quantize_candidates._in_threads
    bench_optimize.main([str(path), "--recipe", json.dumps({"bits": 4}), "-o", str(tmp_path / "out.onnx")])
    assert quantize_candidates._in_threads is original
    printed = capsys.readouterr().out
    streamed, table = printed.split("\n\n")[0], printed.split("\n\n")[-1]
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == [
        "load",
        "FoldWeightsPass",
        "QuantizeWeightsPass",
        "&nbsp;&nbsp;candidates (RTN/GPTQ per axis)",
        "&nbsp;&nbsp;writing the QDQ form",
        "CleanupPass",
        "save",
        "**total**",
    ]
    assert all(name in streamed for name in names[:-1])
    shares = [float(line.split("|")[3]) for line in table.splitlines()[2:] if "&nbsp;" not in line]
    assert abs(sum(shares[:-1]) - 100) < 0.5
    assert (tmp_path / "out.onnx").exists()


def test_a_missing_output_folder_is_refused_before_the_run(tmp_path, monkeypatch):
    path = tmp_path / "mlp.onnx"
    lowbit.save(factories.mlp(), path)
    monkeypatch.setattr(bench_optimize, "measure", lambda *args: pytest.fail("the run started"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bench_optimize.main([str(path), "-o", str(tmp_path / "missing" / "out.onnx")])
