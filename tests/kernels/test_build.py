"""The kernel build says why it cannot build, without touching the built library."""

import pytest

from lowbit.kernels import build


def test_a_wrong_ort_include_dir_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(build.BuildError, match=f"ORT_INCLUDE_DIR={tmp_path} does not contain onnxruntime_cxx_api.h"):
        build.build(force=True, fetch=False)


def test_missing_headers_without_fetching_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setattr(build, "HEADER_CACHE", tmp_path / "ort-headers")
    if build.find_ort_headers() is not None:
        pytest.skip("this machine has system ONNX Runtime headers")
    with pytest.raises(build.BuildError, match="set ORT_INCLUDE_DIR"):
        build.build(force=True, fetch=False)
