"""Benchmark weight-quantized MatMul on ONNX Runtime's CPU provider against fp32 and memory bandwidth.

    python -m lowbit.tools.dev.bench_matmul [--quick] [--threads 2] [--shapes 4096x4096 ...] [--batches 1 8 32]
        [--modes non-resident resident] [--llc-multiple 3] [--methods ...] [--json out.json] [--plot out.svg]

For each ``K x N`` weight and batch ``M`` it times ``Y[M, N] = A[M, K] @ W`` as:

* ``fp32``: plain MatMul;
* ``nbits-acc0`` / ``nbits-acc4``: per-OC 4-bit g128 ``com.microsoft::MatMulNBits`` (accuracy level 0: fp32
  activations; 4: int8 activations);
* ``lowbit-{ic,oc}{6,5,4,3,2}``: ``lowbit::QuantMatMul``, g128, asymmetric;
* ``lowbit-i8-{ic,oc}{6,5,4,3,2}``: the same with ``int8_activations=1`` (the counterpart of ``nbits-acc4``).

Two modes, each a table:

* ``non-resident`` (the headline): each measurement runs one graph of many nodes, each with its own copy of
  the weight, so many that their bytes exceed ``--llc-multiple`` times the last-level cache (its size read
  from the OS), each copy different in content (``distinct_copy``). Every weight then comes from main memory,
  as in a model, which reads each weight once per token. Its ``%dram`` column is the rate (bytes of the
  stored weight, scales and zero points included, per second) as a share of the streaming-read bandwidth of
  a buffer of that size, measured in the same run (NumPy/OpenBLAS sgemv on all CPUs, which reads a matrix
  once; with ``--clock thread``, ORT's fp32 MatMul of one row on the same thread and clock as the kernels).
* ``resident``: one weight called again and again; a weight smaller than the last-level cache stays there,
  so this measures the kernel's arithmetic, not what a model sees. Its ``%cache`` column is against the
  streaming read of a 16 MiB buffer read again and again.

Each table gives the time per call in us, the speed-up over the baseline method of the same run
(``--baseline``, fp32 by default), the bandwidth share, and for the other widths the time relative to the
4-bit time scaled by bytes (1.00: as fast as its bytes). Timings go through I/O binding; the nodes' outputs
share one buffer. On a machine shared with other jobs, multi-threaded calls wait for descheduled worker
threads: run it on an idle machine, or compare with ``--threads 1 --clock thread`` (the CPU time of the one
thread that runs the kernels: memory bandwidth is still shared); the load average is printed.

``--model smollm2.onnx`` adds end-to-end forward latency of SmolLM2 (the fp32 export of ``lowbit export
smollm2``) quantized with RTN g128 in the portable QDQ form and in the fused form (``Recipe(fused=True)``),
for a 128-token prompt and a single token, against the fp32 model, ONNX Runtime defaults otherwise
(``--e2e-only`` skips the kernel tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from lowbit.kernels import _lib, packing
from lowbit.kernels.model import DOMAIN, INPUT_NAMES, OP_TYPE, QuantMatMulWeights
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.runtime import session as runtime

SHAPES = ((576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008))
BATCHES = (1, 8, 32)
GROUP = 128
LOWBIT_METHODS = tuple(f"lowbit-{axis}{bits}" for axis in ("ic", "oc") for bits in (6, 5, 4, 3, 2))
INT8_METHODS = tuple(method.replace("lowbit-", "lowbit-i8-") for method in LOWBIT_METHODS)
METHODS = ("fp32", "nbits-acc0", "nbits-acc4", *LOWBIT_METHODS, *INT8_METHODS)
MODES = ("non-resident", "resident")
#: Alignment of each weight copy in the in-memory data file (a page: no copy shares a page with another).
ALIGN = 4096
DATA_FILE = "weights.bin"


def time_call(
    call, seconds: float, max_runs: int = 2000, min_runs: int = 5, clock=time.perf_counter
) -> tuple[float, float]:
    """Median and minimum seconds per ``call()`` on ``clock``, over at least ``seconds`` (wall) of runs after 2
    warm-up calls."""
    call()
    call()
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start < seconds or len(times) < min_runs) and len(times) < max_runs:
        t0 = clock()
        call()
        times.append(clock() - t0)
    return statistics.median(times), min(times)


def stream_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes per second of a streaming read of an ``nbytes`` float32 matrix (sgemv reads it once); the best
    run, as a capability (the median suffers from waiting for descheduled BLAS threads on a busy machine)."""
    matrix = np.ones((max(1, nbytes // 4096), 1024), dtype=np.float32)
    vector = np.ones(1024, dtype=np.float32)
    return matrix.nbytes / time_call(lambda: matrix @ vector, seconds)[1]


def last_level_cache_bytes(cpu_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of the last-level data (or unified) cache of CPU 0, from Linux's sysfs; an error where it is
    not there (then give ``--llc-bytes``)."""
    caches = []
    for index in sorted(cpu_dir.glob("index*")) if cpu_dir.is_dir() else []:
        if (index / "type").read_text().strip() in ("Data", "Unified"):
            size = (index / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            caches.append((int((index / "level").read_text()), int(size.rstrip("KMG")) * scale))
    if not caches:
        raise RuntimeError(f"no cache sizes under {cpu_dir}: give the last-level cache size with --llc-bytes")
    return max(caches)[1]


@dataclasses.dataclass
class Kernel:
    """One method's node: ``op_type(A, *tensors)`` with attributes; absent optional inputs are None."""

    op_type: str
    domain: str
    attributes: dict
    tensors: list[tuple[str, np.ndarray | None]]

    @property
    def nbytes(self) -> int:
        """Bytes the node reads for its weight (codes, scales and zero points)."""
        return sum(array.nbytes for _, array in self.tensors if array is not None)


def make_kernel(method: str, weight: np.ndarray) -> Kernel:
    """The node of ``method`` (see the module docstring) for the float weight ``[K, N]``."""
    k, n = weight.shape
    if method == "fp32":
        return Kernel("MatMul", "", {}, [("W", weight)])
    if method.startswith("nbits-acc"):
        oc4 = quantize_rtn(weight, QuantScheme(bits=4, group_size=GROUP, group_axis="oc"))
        tensors = [
            ("B", packing.pack_matmulnbits(oc4.codes, GROUP)),
            ("scales", np.ascontiguousarray(oc4.scales.T.reshape(-1))),
            ("zero_points", packing.pack_matmulnbits_zero_points(oc4.zero_points)),
        ]
        level = int(method[len("nbits-acc") :])
        attributes = {"K": k, "N": n, "bits": 4, "block_size": GROUP, "accuracy_level": level}
        return Kernel("MatMulNBits", "com.microsoft", attributes, tensors)
    if method in LOWBIT_METHODS or method in INT8_METHODS:
        axis, bits = method[-3:-1], int(method[-1])
        quantized = quantize_rtn(weight, QuantScheme(bits=bits, group_size=GROUP, group_axis=axis))
        weights = QuantMatMulWeights.from_quantized(quantized)
        weights.int8_activations = method in INT8_METHODS
        return Kernel(OP_TYPE, DOMAIN, weights.attributes, list(zip(INPUT_NAMES[1:], weights.inputs())))
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def copies_for(nbytes: int, llc_bytes: int, multiple: float) -> int:
    """Copies of an ``nbytes`` weight whose bytes together exceed ``multiple`` x the last-level cache."""
    return max(1, math.floor(multiple * llc_bytes / nbytes) + 1)


def distinct_copy(array: np.ndarray, i: int) -> np.ndarray:
    """Copy ``i`` of a weight tensor, different in content from every other copy but of the same kind:
    float tensors (fp32 weights, scales) scaled by ``1 + i / 1024``, integer ones (codes, zero points) rolled
    by ``i`` along their first axis (valid codes stay valid; a quad's padding stays in its quad). Copy 0 is
    the tensor itself.

    Identical copies are not all read from memory: with them, ONNX Runtime's MatMul and MatMulNBits ran as
    fast as with one resident weight (apparently one pre-packed buffer serves every node); lowbit's op did not.
    """
    array = np.ascontiguousarray(array)
    if i == 0:
        return array
    if array.dtype.kind == "f":
        return np.ascontiguousarray(array * array.dtype.type(1 + i / 1024))
    return np.ascontiguousarray(np.roll(array, i, axis=0))


def cycled_model(kernel: Kernel, k: int, n: int, copies: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """``copies`` nodes ``Y.i = kernel(A, copy i of its tensors)`` and the data file (one buffer) they read.

    Each copy's tensors differ in content (:func:`distinct_copy`). The tensors are external data of
    ``DATA_FILE``, given to ONNX Runtime in memory: no 2 GiB protobuf limit.
    """
    present = [(name, np.ascontiguousarray(array)) for name, array in kernel.tensors if array is not None]
    copy_bytes = sum(-(-array.nbytes // ALIGN) * ALIGN for _, array in present)
    data = np.empty(copy_bytes * copies, dtype=np.uint8)
    nodes, initializers, outputs, offset = [], [], [], 0
    for i in range(copies):
        inputs = ["A"]
        for name, array in kernel.tensors:
            if array is None:
                inputs.append("")
                continue
            array = distinct_copy(array, i)
            data[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
            tensor = onnx.TensorProto(
                name=f"{name}.{i}", dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
            )
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", offset), ("length", array.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(tensor)
            inputs.append(tensor.name)
            offset += -(-array.nbytes // ALIGN) * ALIGN
        while inputs[-1] == "":
            inputs.pop()
        nodes.append(helper.make_node(kernel.op_type, inputs, [f"Y.{i}"], domain=kernel.domain, **kernel.attributes))
        outputs.append(helper.make_tensor_value_info(f"Y.{i}", onnx.TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["M", k])],
        outputs,
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), data


@dataclasses.dataclass
class Result:
    k: int
    n: int
    mode: str
    m: int
    method: str
    nbytes: int  # of one copy of the weight
    copies: int
    seconds: float  # median per call of one node
    min_seconds: float


class Bench:
    """Sessions of ``threads`` intra-op threads timed for ``seconds`` each; ``clock`` ``thread``: the CPU time of
    the calling thread, which runs the kernels when ``threads`` is 1 (time descheduled by other jobs left out)."""

    def __init__(self, threads: int, seconds: float, min_runs: int = 5, clock: str = "wall"):
        if clock == "thread" and threads != 1:
            raise ValueError("the thread clock measures the calling thread: it needs --threads 1")
        self.threads, self.seconds, self.min_runs = threads, seconds, min_runs
        self.clock = time.thread_time if clock == "thread" else time.perf_counter

    def session(self, kernel: Kernel, k: int, n: int, copies: int) -> ort.InferenceSession:
        model, data = cycled_model(kernel, k, n, copies)
        options = runtime.session_options(self.threads, use_lowbit_ops=kernel.domain == DOMAIN)
        options.add_external_initializers_from_files_in_memory([DATA_FILE], [data], [data.size])
        # ONNX Runtime copies the initializers out of the in-memory file while it makes the session (the
        # tests check it), so the buffer goes when this returns: peak memory one copy of the weights, not two
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def time_session(self, sess: ort.InferenceSession, a: np.ndarray, n: int, copies: int) -> tuple[float, float]:
        """Median and minimum seconds per node of one run of all ``copies`` nodes (outputs in one buffer)."""
        binding = sess.io_binding()
        y = np.empty((a.shape[0], n), dtype=np.float32)
        binding.bind_cpu_input("A", a)
        for i in range(copies):
            binding.bind_output(f"Y.{i}", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
        median, best = time_call(
            lambda: sess.run_with_iobinding(binding), self.seconds, min_runs=self.min_runs, clock=self.clock
        )
        return median / copies, best / copies

    def stream_bandwidth(self, mode: str, llc_bytes: int, multiple: float) -> float:
        """Bytes per second (best run) of ORT's fp32 MatMul of one row: a streaming read of a 16 MiB weight,
        called again and again (``resident``) or of copies beyond ``multiple`` x the last-level cache."""
        side = 2048 if mode == "resident" else 4096
        kernel = make_kernel("fp32", np.ones((side, side), np.float32))
        copies = 1 if mode == "resident" else copies_for(kernel.nbytes, llc_bytes, multiple)
        sess = self.session(kernel, side, side, copies)
        return kernel.nbytes / self.time_session(sess, np.ones((1, side), np.float32), side, copies)[1]


def bench_shape(
    bench: Bench, k: int, n: int, batches, methods, modes, llc_bytes: int, multiple: float, rng, log=print
) -> list[Result]:
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    inputs = {m: rng.standard_normal((m, k)).astype(np.float32) for m in batches}
    results = []
    for method in methods:
        kernel = make_kernel(method, weight)
        for mode in modes:
            copies = copies_for(kernel.nbytes, llc_bytes, multiple) if mode == "non-resident" else 1
            sess = bench.session(kernel, k, n, copies)
            for m in batches:
                median, best = bench.time_session(sess, inputs[m], n, copies)
                results.append(Result(k, n, mode, m, method, kernel.nbytes, copies, median, best))
                log(f"  {k}x{n} {mode} M={m} {method}: {median * 1e3:.3f} ms ({copies} copies)")
            del sess
    return results


def bytes_ratio(row: dict[str, Result], method: str) -> float | None:
    """A lowbit method's time (other than 4-bit) over (its bytes / the 4-bit bytes) x the 4-bit time of the same axis, in
    one row of results: 1.00 when time follows bytes. None when the row has no 4-bit cell of that axis."""
    four = row.get(method[:-1] + "4")
    if four is None:
        return None
    return row[method].seconds / (row[method].nbytes / four.nbytes * four.seconds)


def _grid(title: str, rows: dict[int, dict[str, Result]], methods: Sequence[str], fmt) -> list[str]:
    """A markdown table: a row per M, a column per method, ``fmt(row, method)`` (None: "-") in each cell."""
    lines = [f"{title}:", "", "| M | " + " | ".join(methods) + " |", "|---:" + "|---:" * len(methods) + "|"]
    for m, row in rows.items():
        cells = [fmt(row, method) if method in row else None for method in methods]
        lines.append(f"| {m} | " + " | ".join("-" if cell is None else cell for cell in cells) + " |")
    return lines + [""]


#: The name of the bandwidth share column of each mode (a GPU benchmark names its memory otherwise).
SHARES = {"non-resident": "%dram", "resident": "%cache"}


def shape_tables(results: Sequence[Result], bandwidth: float, baseline: str, share: str) -> list[str]:
    """The tables of one (shape, mode); ``bandwidth``: bytes per second the rates are shares of, in the
    column named ``share``."""
    first = results[0]
    methods = list(dict.fromkeys(r.method for r in results))
    rows: dict[int, dict[str, Result]] = {}
    for r in results:
        rows.setdefault(r.m, {})[r.method] = r
    one = {r.method: r for r in results}
    out = [
        f"### {first.k}x{first.n}, {first.mode}",
        "",
        "MB per weight: " + ", ".join(f"{method} {one[method].nbytes / 1e6:.2f}" for method in methods),
        "copies per run: " + ", ".join(f"{method} {one[method].copies}" for method in methods),
        "",
    ]
    out += _grid("us per call (median)", rows, methods, lambda row, method: f"{row[method].seconds * 1e6:.1f}")
    if baseline in methods:
        out += _grid(
            f"speed-up over {baseline} (same run)",
            rows,
            methods,
            lambda row, method: f"{row[baseline].seconds / row[method].seconds:.2f}x" if baseline in row else None,
        )
    out += _grid(
        f"{share}: weight bytes per second / {bandwidth / 1e9:.1f} GB/s",
        rows,
        methods,
        lambda row, method: f"{100 * row[method].nbytes / row[method].seconds / bandwidth:.0f}",
    )
    low = [method for method in methods if method.startswith("lowbit-") and method[-1] != "4"]
    if low:
        out += _grid(
            "time / (bytes / 4-bit bytes x 4-bit time), same axis (1.00: as fast as its bytes)",
            rows,
            low,
            lambda row, method: _fmt(bytes_ratio(row, method)),
        )
    ic = [method for method in methods if method.startswith(("lowbit-ic", "lowbit-i8-ic"))]
    if ic:
        out += _grid(
            "per-IC time / per-OC time",
            rows,
            ic,
            lambda row, method: (
                _fmt(row[method].seconds / row[method.replace("-ic", "-oc")].seconds)
                if method.replace("-ic", "-oc") in row
                else None
            ),
        )
    return out


def tables(
    results: Sequence[Result], bandwidth: dict[str, float], baseline: str = "fp32", shares: dict[str, str] = SHARES
) -> str:
    """Markdown tables, one set per (shape, mode) in the order measured: us per call, speed-up over
    ``baseline`` of the same run (where measured), the rate as a share of ``bandwidth[mode]`` (bytes per
    second; column ``shares[mode]``), time relative to bytes for widths other than 4, and per-IC against per-OC."""
    out = []
    for key in dict.fromkeys((r.k, r.n, r.mode) for r in results):
        chosen = [r for r in results if (r.k, r.n, r.mode) == key]
        out += shape_tables(chosen, bandwidth[key[2]], baseline, shares[key[2]])
    return "\n".join(out)


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def svg_bars(results: Sequence[Result]) -> str:
    """An SVG of one panel per (shape, mode, M): a bar per method, its height the time per call (each panel
    scaled to its slowest method), labelled with the value. Plain SVG: no plotting library needed."""
    panels = list(dict.fromkeys((r.k, r.n, r.mode, r.m) for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    bar, gap, height, top, bottom = 28, 6, 160, 30, 90
    panel_width = len(methods) * (bar + gap) + 40
    parts = []
    for p, (k, n, mode, m) in enumerate(panels):
        cells = {r.method: r.seconds for r in results if (r.k, r.n, r.mode, r.m) == (k, n, mode, m)}
        slowest, x0 = max(cells.values()), p * panel_width + 20
        parts.append(f'<text x="{x0}" y="18" font-size="13">{k}x{n} {mode} M={m} (us per call)</text>')
        for i, method in enumerate(methods):
            if method not in cells:
                continue
            h, x = height * cells[method] / slowest, x0 + i * (bar + gap)
            y = top + height - h
            parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="#4878a8"/>')
            parts.append(
                f'<text x="{x + bar / 2}" y="{y - 3:.1f}" font-size="9" text-anchor="middle">'
                f"{cells[method] * 1e6:.4g}</text>"
            )
            label_y = top + height + 8
            parts.append(
                f'<text x="{x + bar / 2}" y="{label_y}" font-size="10" text-anchor="end" '
                f'transform="rotate(-60 {x + bar / 2} {label_y})">{method}</text>'
            )
    width, total = len(panels) * panel_width + 20, top + height + bottom
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" font-family="sans-serif">'
        f"\n{body}\n</svg>\n"
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


def end_to_end(source: Path, threads: int, seconds: float, workdir: Path) -> list[tuple[str, int, dict[int, float]]]:
    """(name, file bytes, {tokens: median seconds}) for fp32 and every ``E2E_SETTINGS`` model of ``source``."""
    import lowbit
    from lowbit.ir.files import model_bytes

    feeds = {tokens: {"input_ids": np.arange(tokens, dtype=np.int64)[None] % 1000 + 100} for tokens in E2E_TOKENS}
    models = [("fp32", source)]
    for bits, axis, fused in E2E_SETTINGS:
        path = workdir / f"smollm2.w{bits}.{axis}.{'fused' if fused else 'qdq'}.onnx"
        recipe = lowbit.Recipe(bits=bits, group_size=GROUP, axis=axis, fused=fused)
        lowbit.save(lowbit.optimize(lowbit.load(source), recipe).model, path)
        models.append((f"W{bits} g{GROUP} {axis} {'fused' if fused else 'QDQ'}", path))
    rows = []
    for name, path in models:
        sess = runtime.session(path, intra_op_threads=threads)
        times = {
            tokens: time_call(lambda f=feed, s=sess: s.run(None, f), seconds * 10)[0] for tokens, feed in feeds.items()
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
    parser.add_argument("--quick", action="store_true", help="short measurements (noisier)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2: both cores here)")
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN weights")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="thread: CPU time of the calling thread (needs --threads 1), for a machine shared with other jobs",
    )
    parser.add_argument("--baseline", default="fp32", choices=METHODS, help="the method speed-ups are against")
    parser.add_argument(
        "--llc-multiple", type=float, default=3.0, help="non-resident: weight copies whose bytes exceed this x the LLC"
    )
    parser.add_argument("--llc-bytes", type=int, help="last-level cache size (default: read from /sys)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw the first mode's times per call as an SVG bar chart")
    parser.add_argument("--model", type=Path, help="fp32 SmolLM2 ONNX (lowbit export smollm2): end-to-end rows")
    parser.add_argument("--e2e-only", action="store_true", help="with --model: skip the kernel tables")
    args = parser.parse_args(argv)
    if args.e2e_only and args.model is None:
        parser.error("--e2e-only needs --model")
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread needs --threads 1 (the calling thread runs the kernels only then)")
    if not _lib.is_built():
        print(_lib.not_built_error(), file=sys.stderr)
        return 1
    seconds = 0.05 if args.quick else 0.3
    llc = args.llc_bytes or last_level_cache_bytes()
    rng = np.random.default_rng(0)
    bench = Bench(args.threads, seconds, min_runs=3 if args.quick else 5, clock=args.clock)
    if args.clock == "wall":
        # before any ORT session: its spinning worker threads would take the cores from the BLAS threads
        bandwidth = {"resident": stream_bandwidth(16 << 20, seconds)}  # first: a big sgemv leaves BLAS threads idle
        bandwidth["non-resident"] = stream_bandwidth(int(args.llc_multiple * llc), seconds)
        probe = "NumPy sgemv, all CPUs"
    else:  # the same thread and clock as the kernels: ORT's fp32 MatMul of one row (MLAS sgemv)
        bandwidth = {mode: bench.stream_bandwidth(mode, llc, args.llc_multiple) for mode in MODES}
        probe = "ORT fp32 MatMul of one row, one thread, its CPU time"
    print(
        f"ONNX Runtime {ort.__version__}, intra_op_num_threads={args.threads}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, last-level cache {llc / 2**20:.0f} MiB, {args.clock} clock"
    )
    print(
        f"streaming read ({probe}): {bandwidth['non-resident'] / 1e9:.1f} GB/s from "
        f"{args.llc_multiple * llc / 2**20:.0f} MiB (%dram), {bandwidth['resident'] / 1e9:.1f} GB/s from "
        f"16 MiB read again and again (%cache)",
        flush=True,
    )
    if not args.e2e_only:
        results = []
        for shape in args.shapes:
            k, n = (int(x) for x in shape.lower().split("x"))
            results += bench_shape(bench, k, n, args.batches, args.methods, args.modes, llc, args.llc_multiple, rng)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        print(tables(results, bandwidth, args.baseline))
        if args.json:
            record = {"bandwidth": bandwidth, "llc_bytes": llc, "results": [dataclasses.asdict(r) for r in results]}
            args.json.write_text(json.dumps(record, indent=1))
        if args.plot:
            args.plot.write_text(svg_bars([r for r in results if r.mode == args.modes[0]]))
    if args.model is not None:
        with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
            print_end_to_end(end_to_end(args.model, args.threads, seconds, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
