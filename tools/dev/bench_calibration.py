"""Calibration cost: peak memory and time for N and 2N calibration windows (each in a fresh process).

    python -m lowbit.tools.dev.bench_calibration smollm2.onnx --windows 16 32 64

Statistics are streamed (``H = X^T X`` and channel magnitudes per weight input), so peak memory should
not grow with the number of windows; this prints the figures that show whether it does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = """
import json, resource, sys, time
import lowbit
from lowbit.runtime.calibration import collect
from lowbit.tools import models, text
path, windows, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
feeds = text.calibration_feeds(models.smollm2_tokenizer(), ["input_ids"], length, windows)
model = lowbit.load(path)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
stats = collect(model, feeds, total=len(feeds))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"windows": windows, "tokens": windows * length, "seconds": seconds,
                  "peak_rss_mb": peak / 1024, "rss_before_mb": before / 1024,
                  "statistics_mb": sum(a.hessian.nbytes for a in stats.by_activation.values()) / 2**20}))
"""


def measure(path: str, windows: int, length: int) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, path, str(windows), str(length)], capture_output=True, text=True, check=True
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.tools.dev.bench_calibration", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", help="SmolLM2 fp32 ONNX (lowbit export smollm2 -o ...)")
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    print("| windows | tokens | seconds | s / window | peak RSS MB | RSS before calibration MB | H matrices MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for windows in args.windows:
        row = measure(args.model, windows, args.length)
        print(
            f"| {row['windows']} | {row['tokens']} | {row['seconds']:.1f} | {row['seconds'] / windows:.2f} | "
            f"{row['peak_rss_mb']:.0f} | {row['rss_before_mb']:.0f} | {row['statistics_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
