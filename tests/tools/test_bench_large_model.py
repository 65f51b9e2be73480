"""tools/dev/bench_large_model.py on a tiny model: the generated file is valid ONNX with external data that
load -> optimize -> save reads, and the measurement reports every stage (the > 2 GB run is not for CI)."""

from __future__ import annotations

import onnx

from lowbit.tools.dev import bench_large_model


def test_generated_model_is_valid_and_measured_per_stage(tmp_path):
    path, weight_bytes = bench_large_model.generate(tmp_path / "in", layers=3, width=64)
    assert weight_bytes == 3 * 64 * 64 * 4 == (tmp_path / "in" / "weights.bin").stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    (tmp_path / "out").mkdir()
    row = bench_large_model.measure(path, tmp_path / "out" / "model.w4.onnx")
    assert set(row["seconds"]) == {"load", "optimize", "save"} <= set(row["peaks"])
    assert all(row["peaks"][stage]["rss"] >= row["peaks"][stage]["anon"] > 0 for stage in row["seconds"])
    assert 0 < row["output_bytes"] < weight_bytes
