"""tools/gpu_check.sh and its benchmark (tools/dev/bench_matmul_cuda.py): what runs without a GPU."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowbit.tools.dev import bench_matmul_cuda
from lowbit.tools.dev.bench_matmul import Result

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU: run the check itself")
def test_script_without_a_gpu_fails_loudly_at_its_first_step(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "FAILED: environment" in result.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "FAILED: environment" in summary and "== build" not in summary
    assert (tmp_path / "out" / "env.txt").is_file()


def test_usage_without_an_output_folder():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode != 0 and "usage: bash tools/gpu_check.sh OUT_DIR" in result.stderr


def test_bench_refuses_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        bench_matmul_cuda.CudaBench(1, 4.0)


@pytest.mark.parametrize("method", ["fp32", "lowbit-ic3"])
def test_ort_method_times_every_batch_on_the_given_provider(ops_library, method):
    weight = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
    calls = []

    def best(call):
        call()
        calls.append(call)
        return 1e-3

    nbytes, copies, rows = bench_matmul_cuda.ort_method(
        method, weight, [1, 4], 1 << 16, 2.0, best, provider="CPUExecutionProvider"
    )
    assert copies * nbytes > 2.0 * (1 << 16) and len(calls) == 2
    assert rows == [(1, 1e-3 / copies), (4, 1e-3 / copies)]


class FakeBench:
    """Canned times; one ONNX method fails, as an unsupported ORT kernel would."""

    def torch_fp16(self, weight, batches):
        return [(m, 9, 2e-6 * m) for m in batches]

    def ort_method(self, method, weight, batches):
        if method == "nbits-acc0":
            raise RuntimeError("no CUDA kernel for MatMulNBits(float)")
        return 1000, 5, [(m, 1e-6 * m) for m in batches]


def test_run_reports_failures_and_keeps_the_rest_then_tables_name_hbm():
    methods = ["fp16-torch", "nbits-acc0", "lowbit-oc4"]
    results, failures = bench_matmul_cuda.run(FakeBench(), [(64, 32)], [1, 2], methods, log=lambda *_: None)
    assert failures == ["64x32 nbits-acc0: RuntimeError: no CUDA kernel for MatMulNBits(float)"]
    assert [(r.method, r.m) for r in results] == [
        ("fp16-torch", 1),
        ("fp16-torch", 2),
        ("lowbit-oc4", 1),
        ("lowbit-oc4", 2),
    ]
    assert results[0] == Result(64, 32, "non-resident", 1, "fp16-torch", 64 * 32 * 2, 9, 2e-6, 2e-6)
    text = bench_matmul_cuda.tables(
        results, {"non-resident": 1e9}, baseline="fp16-torch", shares=bench_matmul_cuda.SHARES
    )
    assert "%hbm: weight bytes per second / 1.0 GB/s:" in text
    assert "| 1 | 1.00x | 2.00x |" in text  # speed-up over fp16 cuBLAS
