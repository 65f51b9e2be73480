"""Benchmark weight-quantized MatMul on one CUDA GPU against fp16 cuBLAS and the GPU's memory bandwidth.

    python -m lowbit.tools.dev.bench_matmul_cuda [--shapes 4096x4096 8192x8192] [--batches 1 2 4 8 16 32]
        [--methods ...] [--json out.json]

For each ``K x N`` weight and batch ``M`` it times ``Y[M, N] = A[M, K] @ W`` as:

* ``fp16-torch``: ``torch.matmul`` in fp16 (cuBLAS), the baseline of the speed-ups;
* ``fp32``: ONNX Runtime's CUDA MatMul in fp32;
* ``nbits-acc0``: ONNX Runtime's CUDA ``com.microsoft::MatMulNBits``, per-OC 4-bit g128, fp32 activations;
* ``lowbit-{ic,oc}{4,3,2}``: ``lowbit::QuantMatMul`` on the CUDA execution provider, g128, asymmetric.

Weights are never resident in the GPU's L2 cache: as ``bench_matmul``'s non-resident mode, each measurement
runs many distinct copies of the weight (an ONNX graph of one node per copy; for torch, a loop over copies),
whose bytes exceed ``--l2-multiple`` times the L2 size the device reports. ``%hbm`` is the weight bytes per
second as a share of the read bandwidth of a large buffer (``torch.sum``) measured in the same run. ONNX
Runtime's calls include its per-node launch overhead (a few microseconds), which small weights cannot hide.
The ONNX sessions refuse to fall back to the CPU: every node must run on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lowbit.kernels import _lib
from lowbit.kernels.model import DOMAIN
from lowbit.runtime import session as runtime
from lowbit.tools.dev.bench_matmul import (
    DATA_FILE,
    LOWBIT_METHODS,
    Result,
    copies_for,
    cycled_model,
    make_kernel,
    tables,
)

SHAPES = ((4096, 4096), (8192, 8192))
BATCHES = (1, 2, 4, 8, 16, 32)
TORCH_METHOD = "fp16-torch"
#: lowbit at 4, 3 and 2 bits (the widths the GPU check was sized for: under 8 minutes in all).
ORT_METHODS = ("fp32", "nbits-acc0", *(method for method in LOWBIT_METHODS if method[-1] in "432"))
METHODS = (TORCH_METHOD, *ORT_METHODS)
MODE = "non-resident"
SHARES = {MODE: "%hbm"}


class CudaBench:
    """Times on the current CUDA device: the best of ``runs`` runs of every copy, after one warm-up run."""

    def __init__(self, runs: int, l2_multiple: float):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device: the GPU benchmark needs one (and a CUDA build of torch)")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu), "
                f"providers: {ort.get_available_providers()}"
            )
        self.torch, self.runs = torch, runs
        self.l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
        self.multiple = l2_multiple

    def best(self, call) -> float:
        """Best wall seconds of ``call()`` (which synchronizes the device itself)."""
        call()
        times = []
        for _ in range(self.runs):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return min(times)

    def read_bandwidth(self, nbytes: int) -> float:
        """Bytes per second of ``torch.sum`` over an ``nbytes`` float32 buffer (a streaming read)."""
        torch = self.torch
        x = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")

        def call():
            x.sum()
            torch.cuda.synchronize()

        return x.numel() * 4 / self.best(call)

    def torch_fp16(self, weight: np.ndarray, batches) -> list[tuple[int, int, float]]:
        """(M, copies, seconds per matmul) of fp16 ``torch.matmul`` over distinct weight copies."""
        torch = self.torch
        k, n = weight.shape
        copies = copies_for(weight.size * 2, self.l2_bytes, self.multiple)
        base = torch.from_numpy(weight).to("cuda", torch.float16)
        weights = [base.clone() for _ in range(copies)]
        rows = []
        for m in batches:
            a = torch.randn(m, k, device="cuda", dtype=torch.float16)

            def call(a=a):
                for w in weights:
                    torch.matmul(a, w)
                torch.cuda.synchronize()

            rows.append((m, copies, self.best(call) / copies))
        return rows

    def ort_method(self, method: str, weight: np.ndarray, batches) -> tuple[int, int, list[tuple[int, float]]]:
        return ort_method(method, weight, batches, self.l2_bytes, self.multiple, self.best)


def ort_method(
    method: str, weight, batches, cache_bytes: int, multiple: float, best, provider="CUDAExecutionProvider"
) -> tuple[int, int, list[tuple[int, float]]]:
    """(weight bytes, copies, [(M, seconds per node)]) of one ONNX method on ``provider``, no node on another:
    ``best(call)`` times a run of all copies, whose bytes exceed ``multiple`` x ``cache_bytes``."""
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    k, n = weight.shape
    kernel = make_kernel(method, weight)
    copies = copies_for(kernel.nbytes, cache_bytes, multiple)
    model, data = cycled_model(kernel, k, n, copies)
    options = runtime.session_options(use_lowbit_ops=kernel.domain == DOMAIN)
    if provider != "CPUExecutionProvider":  # every node on that provider, none falls back to the CPU
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_external_initializers_from_files_in_memory([DATA_FILE], [data], [data.size])
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
    rows = []
    for m in batches:
        binding = sess.io_binding()
        a = np.random.default_rng(m).standard_normal((m, k), np.float32)
        binding.bind_ortvalue_input("A", ort.OrtValue.ortvalue_from_numpy(a, device))
        y = ort.OrtValue.ortvalue_from_shape_and_type([m, n], np.float32, device, 0)
        for i in range(copies):
            binding.bind_ortvalue_output(f"Y.{i}", y)

        def call(binding=binding):
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()

        rows.append((m, best(call) / copies))
    return kernel.nbytes, copies, rows


def run(bench: CudaBench, shapes, batches, methods, log=print) -> tuple[list[Result], list[str]]:
    """Results of every (shape, method, M), and one line per method that failed (it is left out)."""
    results, failures = [], []
    rng = np.random.default_rng(0)
    for k, n in shapes:
        weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        for method in methods:
            try:
                if method == TORCH_METHOD:
                    measured = [(m, copies, s, weight.size * 2) for m, copies, s in bench.torch_fp16(weight, batches)]
                else:
                    nbytes, copies, rows = bench.ort_method(method, weight, batches)
                    measured = [(m, copies, s, nbytes) for m, s in rows]
            except Exception as error:  # reported, left out of the table, and the run fails at the end
                failures.append(f"{k}x{n} {method}: {type(error).__name__}: {error}")
                log(f"  FAILED {failures[-1]}")
                continue
            for m, copies, seconds, nbytes in measured:
                results.append(Result(k, n, MODE, m, method, nbytes, copies, seconds, seconds))
                log(f"  {k}x{n} M={m} {method}: {seconds * 1e6:.1f} us ({copies} copies)")
    return results, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN weights")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per cell (the best counts)")
    parser.add_argument("--l2-multiple", type=float, default=4.0, help="weight copies exceed this x the L2 cache")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not _lib.is_built():
        print(_lib.not_built_error(), file=sys.stderr)
        return 1
    bench = CudaBench(args.runs, args.l2_multiple)
    torch = bench.torch
    hbm = bench.read_bandwidth(1 << 30)
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, L2 {bench.l2_bytes / 2**20:.0f} MiB; ONNX Runtime "
        f"{ort.__version__}, torch {torch.__version__}; read bandwidth (torch.sum of 1 GiB) {hbm / 1e9:.0f} GB/s",
        flush=True,
    )
    shapes = [tuple(int(x) for x in shape.lower().split("x")) for shape in args.shapes]
    results, failures = run(bench, shapes, args.batches, args.methods)
    print(tables(results, {MODE: hbm}, baseline=TORCH_METHOD, shares=SHARES))
    if args.json:
        record = {"device": props.name, "hbm_read_bandwidth": hbm, "l2_bytes": bench.l2_bytes}
        record.update(results=[dataclasses.asdict(r) for r in results], failures=failures)
        args.json.write_text(json.dumps(record, indent=1))
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
