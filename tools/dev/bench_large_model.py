"""Peak memory of load -> optimize (RTN W4) -> save on a generated model over 2 GB (external data).

    python -m lowbit.tools.dev.bench_large_model --layers 22 --width 5120 --workdir /tmp/lowbit-large

The model is a chain of fp32 ``MatMul`` + ``Relu`` layers whose weights are written straight into one
external data file, a block of rows at a time, so the generator itself stays small. A fresh process
then loads, optimizes and saves it while a thread samples ``/proc/self/status`` (Linux): resident
memory split into anonymous (copies the process made) and file-backed (the memory-mapped external
data, which the kernel can drop and re-read). Prints a markdown table per stage; the generated files
are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
from onnx import helper

_ROWS_PER_WRITE = 256
_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}


def generate(folder: pathlib.Path, layers: int, width: int, seed: int = 0) -> tuple[pathlib.Path, int]:
    """Write ``model.onnx`` + ``weights.bin`` (``layers`` fp32 ``[width, width]`` weights); returns (path, bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    initializers, nodes, current, offset = [], [], "x", 0
    with open(folder / "weights.bin", "wb") as data:
        for layer in range(layers):
            for start in range(0, width, _ROWS_PER_WRITE):
                rows = min(_ROWS_PER_WRITE, width - start)
                data.write((rng.standard_normal((rows, width), dtype=np.float32) * np.float32(width**-0.5)).tobytes())
            length = width * width * 4
            initializer = onnx.TensorProto(name=f"w{layer}", data_type=onnx.TensorProto.FLOAT, dims=[width, width])
            initializer.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(length))):
                initializer.external_data.add(key=key, value=value)
            initializers.append(initializer)
            nodes.append(helper.make_node("MatMul", [current, f"w{layer}"], [f"h{layer}"], name=f"layers.{layer}.proj"))
            nodes.append(helper.make_node("Relu", [f"h{layer}"], [f"a{layer}"], name=f"layers.{layer}.act"))
            current, offset = f"a{layer}", offset + length
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, width])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, width])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx", offset


class Sampler(threading.Thread):
    """Peak resident memory (MiB) per stage, sampled from /proc/self/status every ``interval`` s."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.stage, self.peaks, self.running = interval, "start", {}, True

    def sample(self) -> dict[str, float]:
        values = {}
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in _FIELDS:
                values[_FIELDS[key]] = int(rest.split()[0]) / 1024
        return values

    def run(self) -> None:
        while self.running:
            peaks = self.peaks.setdefault(self.stage, {})
            for key, value in self.sample().items():
                peaks[key] = max(peaks.get(key, 0.0), value)
            time.sleep(self.interval)


def measure(model_path: pathlib.Path, output: pathlib.Path) -> dict:
    """load -> optimize(RTN W4 g128 per-OC) -> save in this process; peaks and seconds per stage."""
    import lowbit

    sampler = Sampler()
    baseline = sampler.sample()  # the interpreter and the imported libraries
    sampler.start()
    seconds = {}

    def stage(name, function):
        sampler.stage = name
        start = time.perf_counter()
        result = function()
        time.sleep(2 * sampler.interval)  # let the sampler see the stage's last state
        seconds[name] = time.perf_counter() - start
        return result

    model = stage("load", lambda: lowbit.load(model_path))
    result = stage("optimize", lambda: lowbit.optimize(model, lowbit.Recipe(bits=4, group_size=128, axis="oc")))
    stage("save", lambda: lowbit.save(result.model, output))
    sampler.running = False
    return {
        "baseline": baseline,
        "peaks": sampler.peaks,
        "seconds": seconds,
        "output_bytes": sum(p.stat().st_size for p in output.parent.glob(output.name + "*")),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.tools.dev.bench_large_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--width", type=int, default=5120, help="each weight is [width, width] fp32")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("lowbit-large-model"))
    parser.add_argument("--keep", action="store_true", help="keep the generated and optimized files")
    parser.add_argument("--measure", nargs=2, type=pathlib.Path, metavar=("MODEL", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process
        print(json.dumps(measure(*args.measure)))
        return
    if args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists; choose a new --workdir (it is deleted afterwards)")
    try:
        start = time.perf_counter()
        model_path, weight_bytes = generate(args.workdir / "in", args.layers, args.width)
        print(
            f"generated {model_path} + {weight_bytes / 2**30:.2f} GiB of external data in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        (args.workdir / "out").mkdir()
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "lowbit.tools.dev.bench_large_model",
                "--measure",
                str(model_path),
                str(args.workdir / "out" / "model.w4.onnx"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise SystemExit(f"the measuring process failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    weights_mib = weight_bytes / 2**20
    print(
        f"\nweights: {args.layers} x [{args.width}, {args.width}] fp32 = {weights_mib:.0f} MiB (external data); "
        f"output {row['output_bytes'] / 2**20:.0f} MiB\n"
    )
    print(
        "| stage | seconds | peak RSS MiB | peak anonymous MiB | peak file-backed MiB | (peak RSS - baseline) / weights |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    base = row["baseline"]
    print(f"| after import (baseline) | | {base['rss']:.0f} | {base['anon']:.0f} | {base['file']:.0f} | |")
    for name, peaks in row["peaks"].items():
        if name in row["seconds"]:
            print(
                f"| {name} | {row['seconds'][name]:.0f} | {peaks['rss']:.0f} | {peaks['anon']:.0f} | {peaks['file']:.0f} | {(peaks['rss'] - base['rss']) / weights_mib:.2f} |"
            )


if __name__ == "__main__":
    main()
