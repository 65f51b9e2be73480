"""Benchmark weight-quantized MatMul on ONNX Runtime's CPU provider against fp32 and memory bandwidth.

    python -m lowbit.tools.dev.bench_matmul [--quick] [--threads 2] [--shapes 4096x4096 ...] [--batches 1 8 32]

For each ``K x N`` weight and batch ``M`` it times ``Y[M, N] = A[M, K] @ W`` as:

* ``fp32``: plain MatMul;
* ``nbits-acc0`` / ``nbits-acc4``: per-OC 4-bit g128 ``DequantizeLinear(axis=0) + MatMul``, which ORT fuses
  into ``com.microsoft::MatMulNBits`` (accuracy level 0: fp32 activations; 4: int8 activations);
* ``qdq-ic4``: per-IC 4-bit g128 ``DequantizeLinear(axis=1) + MatMul`` (ORT does not fuse it);
* ``lowbit-{oc,ic}{4,3,2}``: ``lowbit::QuantMatMul``, g128, asymmetric.

``--model smollm2.onnx`` adds end-to-end forward latency of SmolLM2 (the fp32 export of ``lowbit export
smollm2``) quantized with RTN g128 in the portable QDQ form and in the fused form (``Recipe(fused=True)``),
for a 128-token prompt and a single token, against the fp32 model, ONNX Runtime defaults otherwise
(``--e2e-only`` skips the kernel table).

Columns: median (and minimum) time per call, ``fp32/t`` (speed-up over fp32), ``GB/s`` (bytes of the stored weight,
scales and zero points included, per second), and that rate as a share of two streaming-read bandwidths
measured first (NumPy/OpenBLAS sgemv on all CPUs, which reads a matrix once): ``%dram`` of a 1 GiB buffer
(main memory) and ``%cache`` of a 16 MiB buffer read again and again, which stays in the last-level
cache -- as the weights of the smaller shapes do between calls. Timings go through I/O binding; tiny
shapes include ~10 us of ORT call overhead. On a machine shared with other jobs, multi-threaded calls
wait for descheduled worker threads: run it on an idle machine (or compare with ``--threads 1``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from lowbit.ir import builders
from lowbit.kernels import _lib
from lowbit.kernels.model import QuantMatMulWeights, quant_matmul_model
from lowbit.passes.quant.rtn import QuantizedWeight, quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.runtime import session as runtime

SHAPES = ((576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008))
BATCHES = (1, 8, 32)
GROUP = 128
LOWBIT_METHODS = tuple(f"lowbit-{axis}{bits}" for axis in ("oc", "ic") for bits in (4, 3, 2))


def time_call(call, seconds: float, max_runs: int = 2000) -> tuple[float, float]:
    """Median and minimum seconds per ``call()``, over at least ``seconds`` of runs after 2 warm-up calls."""
    call()
    call()
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start < seconds or len(times) < 5) and len(times) < max_runs:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def stream_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes per second of a streaming read of an ``nbytes`` float32 matrix (sgemv reads it once); the best
    run, as a capability (the median suffers from waiting for descheduled BLAS threads on a busy machine)."""
    matrix = np.ones((max(1, nbytes // 4096), 1024), dtype=np.float32)
    vector = np.ones(1024, dtype=np.float32)
    return matrix.nbytes / time_call(lambda: matrix @ vector, seconds)[1]


class Bench:
    def __init__(self, threads: int, seconds: float, workdir: Path):
        self.threads, self.seconds, self.workdir = threads, seconds, workdir

    def session(self, model: ir.Model, name: str, accuracy_level: int | None = None) -> ort.InferenceSession:
        path = self.workdir / f"{name}.onnx"
        ir.save(model, path)
        return runtime.session(
            path,
            intra_op_threads=self.threads,
            matmulnbits_accuracy_level=accuracy_level,
            use_lowbit_ops=name.startswith("lowbit"),
        )

    def time_session(self, sess: ort.InferenceSession, a: np.ndarray, n: int) -> tuple[float, float]:
        binding = sess.io_binding()
        y = np.empty((a.shape[0], n), dtype=np.float32)
        binding.bind_cpu_input("A", a)
        binding.bind_output("Y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
        return time_call(lambda: sess.run_with_iobinding(binding), self.seconds)


def _input(k: int) -> ir.Value:
    return ir.Value(name="A", shape=ir.Shape(["M", k]), type=ir.TensorType(ir.DataType.FLOAT))


def _model(graph_nodes, inputs, initializers, output: ir.Value) -> ir.Model:
    output.name = "Y"
    graph = ir.Graph(inputs, [output], nodes=graph_nodes, initializers=initializers, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def fp32_model(weight: np.ndarray) -> ir.Model:
    a = _input(weight.shape[0])
    w = ir.Value(
        name="W",
        shape=ir.Shape(weight.shape),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(weight, name="W"),
    )
    node = ir.node("MatMul", [a, w])
    return _model([node], [a], [w], node.outputs[0])


def qdq_model(quantized: QuantizedWeight) -> ir.Model:
    a = _input(quantized.codes.shape[0])
    dq = builders.dequantize_linear("W", quantized, ir.DataType.FLOAT)
    node = ir.node("MatMul", [a, dq.output])
    return _model([dq.node, node], [a], dq.initializers, node.outputs[0])


def fused_ops(sess_model_path: Path) -> set[str]:
    return {node.op_type for node in ir.load(sess_model_path).graph}


def check_nbits_fused(bench: Bench, model: ir.Model) -> bool:
    """Whether ORT rewrote the per-OC QDQ graph into MatMulNBits (else the row is mislabelled)."""
    path, optimized = bench.workdir / "nbits_check.onnx", bench.workdir / "nbits_check.opt.onnx"
    ir.save(model, path)
    options = runtime.session_options(bench.threads)
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # no warning about saving an optimized model
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return "MatMulNBits" in fused_ops(optimized)


def bench_shape(bench: Bench, k: int, n: int, batches, methods, rng) -> list[tuple]:
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    oc4 = quantize_rtn(weight, QuantScheme(bits=4, group_size=GROUP, group_axis="oc"))
    models = {"fp32": (fp32_model(weight), weight.nbytes, None)}
    nbits_bytes = oc4.codes.size // 2 + oc4.scales.nbytes + oc4.zero_points.size // 2
    fused = check_nbits_fused(bench, qdq_model(oc4))
    for level in (0, 4):
        models[f"nbits-acc{level}" + ("" if fused else "(UNFUSED)")] = (qdq_model(oc4), nbits_bytes, level)
    ic4 = quantize_rtn(weight, QuantScheme(bits=4, group_size=GROUP, group_axis="ic"))
    models["qdq-ic4"] = (qdq_model(ic4), ic4.codes.size // 2 + ic4.scales.nbytes + ic4.zero_points.size // 2, None)
    for method in methods:
        axis, bits = method[len("lowbit-") : -1], int(method[-1])
        quantized = quantize_rtn(weight, QuantScheme(bits=bits, group_size=GROUP, group_axis=axis))
        weights = QuantMatMulWeights.from_quantized(quantized)
        models[method] = (ir.from_proto(quant_matmul_model(weights, ("M", k))), weights.nbytes, None)

    rows = []
    for name, (model, nbytes, level) in models.items():
        sess = bench.session(model, name.split("(")[0] + f"_{k}x{n}", level)
        for m in batches:
            a = rng.standard_normal((m, k)).astype(np.float32)
            rows.append((k, n, m, name, nbytes, bench.time_session(sess, a, n)))
        del sess
    return rows


def print_table(rows: list[tuple], dram: float, cache: float) -> None:
    fp32 = {(k, n, m): t for k, n, m, name, _, (t, _min) in rows if name == "fp32"}
    rows = sorted(rows, key=lambda row: row[:3])  # stable: methods keep their order within a (shape, batch)
    print(
        f"{'K x N':>12} {'M':>3} {'method':<20} {'MB':>7} {'ms':>8} {'min ms':>8} {'fp32/t':>7} {'GB/s':>7} "
        f"{'%dram':>6} {'%cache':>6}"
    )
    previous = None
    for k, n, m, name, nbytes, (t, t_min) in rows:
        if previous is not None and (k, n, m) != previous:
            print()
        previous = (k, n, m)
        rate = nbytes / t
        print(
            f"{f'{k}x{n}':>12} {m:>3} {name:<20} {nbytes / 1e6:7.2f} {t * 1e3:8.3f} {t_min * 1e3:8.3f} "
            f"{fp32[k, n, m] / t:7.2f} {rate / 1e9:7.1f} {100 * rate / dram:6.0f} {100 * rate / cache:6.0f}"
        )


#: (bits, axis, fused) of the end-to-end rows.
E2E_SETTINGS = (
    (4, "oc", False),
    (4, "oc", True),
    (4, "ic", False),
    (4, "ic", True),
    (3, "oc", False),
    (3, "oc", True),
    (3, "ic", False),
    (3, "ic", True),
    (2, "ic", False),
    (2, "ic", True),
)
E2E_TOKENS = (128, 1)


def end_to_end(source: Path, bench: Bench) -> list[tuple[str, int, dict[int, float]]]:
    """(name, file bytes, {tokens: median seconds}) for fp32 and every ``E2E_SETTINGS`` model of ``source``."""
    import lowbit
    from lowbit.ir.files import model_bytes

    feeds = {tokens: {"input_ids": np.arange(tokens, dtype=np.int64)[None] % 1000 + 100} for tokens in E2E_TOKENS}
    models = [("fp32", source)]
    for bits, axis, fused in E2E_SETTINGS:
        path = bench.workdir / f"smollm2.w{bits}.{axis}.{'fused' if fused else 'qdq'}.onnx"
        recipe = lowbit.Recipe(bits=bits, group_size=GROUP, axis=axis, fused=fused)
        lowbit.save(lowbit.optimize(lowbit.load(source), recipe).model, path)
        models.append((f"W{bits} g{GROUP} {axis} {'fused' if fused else 'QDQ'}", path))
    rows = []
    for name, path in models:
        sess = runtime.session(path, intra_op_threads=bench.threads)
        times = {
            tokens: time_call(lambda f=feed, s=sess: s.run(None, f), bench.seconds * 10)[0]
            for tokens, feed in feeds.items()
        }
        rows.append((name, model_bytes(path), times))
        print(f"  {name}: " + ", ".join(f"{tokens} tokens {t * 1e3:.1f} ms" for tokens, t in times.items()), flush=True)
    return rows


def print_end_to_end(rows) -> None:
    base = rows[0][2]
    print("\n| SmolLM2-135M | MiB | " + " | ".join(f"{t} tokens ms | vs fp32" for t in E2E_TOKENS) + " |")
    print("|---|---:|" + "---:|---:|" * len(E2E_TOKENS))
    for name, nbytes, times in rows:
        cells = " | ".join(f"{times[t] * 1e3:.1f} | {base[t] / times[t]:.2f}x" for t in E2E_TOKENS)
        print(f"| {name} | {nbytes / 2**20:.1f} | {cells} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (noisier), smaller DRAM probe")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2: both cores here)")
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN weights")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--model", type=Path, help="fp32 SmolLM2 ONNX (lowbit export smollm2): end-to-end rows")
    parser.add_argument("--e2e-only", action="store_true", help="with --model: skip the kernel table")
    args = parser.parse_args(argv)
    if args.e2e_only and args.model is None:
        parser.error("--e2e-only needs --model")
    if not _lib.is_built():
        print(_lib.not_built_error(), file=sys.stderr)
        return 1
    seconds = 0.05 if args.quick else 0.3
    rng = np.random.default_rng(0)
    # before any ORT session: its spinning worker threads would take the cores from the BLAS threads
    cache = stream_bandwidth(16 << 20, seconds)  # first: after a 1 GiB sgemv, OpenBLAS threads idle for ms
    dram = stream_bandwidth((256 if args.quick else 1024) << 20, seconds)
    print(
        f"ONNX Runtime {ort.__version__}, intra_op_num_threads={args.threads}, {os.cpu_count()} CPUs, "
        f"{os.getloadavg()[0]:.1f} load average"
    )
    print(
        f"streaming read (NumPy sgemv, all CPUs): {dram / 1e9:.1f} GB/s from DRAM (%dram), "
        f"{cache / 1e9:.1f} GB/s from cache, 16 MiB (%cache)"
    )
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        bench = Bench(args.threads, seconds, Path(tmp))
        if not args.e2e_only:
            rows = []
            for shape in args.shapes:
                k, n = (int(x) for x in shape.lower().split("x"))
                rows += bench_shape(bench, k, n, args.batches, LOWBIT_METHODS, rng)
            print_table(rows, dram, cache)
        if args.model is not None:
            print_end_to_end(end_to_end(args.model, bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
