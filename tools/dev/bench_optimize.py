"""What ``lowbit optimize`` costs, phase by phase: seconds, share of the total, peak resident memory and that
peak against the model's fp32 bytes. One row is printed as each phase ends; the table with shares follows.

    python -m lowbit.tools.dev.bench_optimize smollm2.onnx                 # W3 g128 AdaDim GPTQ + clip, 128 windows
    python -m lowbit.tools.dev.bench_optimize model.onnx --recipe '{"bits": 4, "method": "gptq"}' --windows 32

It does what the command does (load, calibration windows of the Shakespeare plays, the recipe's pipeline,
save), one pass at a time: calibration (in the calibration pass, or layer by layer inside QuantizeWeightsPass)
is split into the ONNX Runtime runs and the statistics' time they did not hide (the passes' own timers),
quantization into the candidates, the AdaDim selection and the writing (timers put around those functions
here). Calibrated by layer, a layer is quantized on a second thread while the next one is calibrated, so those
parts overlap the ONNX Runtime runs; "quantization not hidden" is the time the calibration waited for them.
Peak RSS is sampled from ``/proc/self/status`` (Linux) during each phase; the ratio divides it by the bytes of
the fp32 model files (``ir.files.model_bytes``). Run it on an idle machine and write the load beside the
figures: every phase is compute bound.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import lowbit
from lowbit.ir.files import check_writable_file, model_bytes
from lowbit.passes import axis_selectors, pipelines, quantize_candidates, quantize_weights
from lowbit.passes.report import OptimizeReport
from lowbit.runtime.memory import peak_rss_mb
from lowbit.tools import text
from lowbit.tools.dev.bench_large_model import Sampler

#: The recipe of issue 19's measurement: W3 g128 AdaDim (block selector) GPTQ with clip search.
DEFAULT_RECIPE = {"bits": 3, "group_size": 128, "axis": "adadim", "method": "gptq", "clip_search": True}
#: Parts of QuantizeWeightsPass timed apart: (module, function name, phase label).
QUANTIZE_PARTS = (
    (quantize_candidates, "_in_threads", "candidates (RTN/GPTQ per axis)"),
    (axis_selectors.SubgraphSelector, "__call__", "AdaDim selection (subgraphs)"),
    (quantize_weights, "write_weight", "writing the QDQ form"),
)
COLUMNS = "| phase | seconds | % of total | peak RSS MiB | peak RSS / fp32 bytes |"


@dataclasses.dataclass
class Phase:
    name: str
    seconds: float
    peak_mib: float | None  # None: a part of the phase above, whose peak that row shows


class Bench:
    """Times phases, samples their peak RSS and prints a row as each ends."""

    def __init__(self, fp32_bytes: int):
        self.fp32_mib = fp32_bytes / 2**20
        self.phases: list[Phase] = []
        self.sampler = Sampler()
        self.sampler.start()

    def run(self, name: str, function):
        self.sampler.stage = name
        start = time.perf_counter()
        result = function()
        time.sleep(2 * self.sampler.interval)  # let the sampler see the phase's last state
        seconds = time.perf_counter() - start
        peak = self.sampler.peaks.get(name, {}).get("rss", self.sampler.sample()["rss"])
        self.add(Phase(name, seconds, peak))
        return result

    def add(self, phase: Phase) -> None:
        self.phases.append(phase)
        print(self.row(phase, None), flush=True)

    def row(self, phase: Phase, total: float | None) -> str:
        share = "" if total is None else f"{100 * phase.seconds / total:.1f}"
        if phase.peak_mib is None:
            return f"| &nbsp;&nbsp;{phase.name} | {phase.seconds:.1f} | {share} | | |"
        return f"| {phase.name} | {phase.seconds:.1f} | {share} | {phase.peak_mib:.0f} | {phase.peak_mib / self.fp32_mib:.2f} |"

    def table(self) -> str:
        total = sum(phase.seconds for phase in self.phases if phase.peak_mib is not None)
        peak = peak_rss_mb()
        rows = [self.row(phase, total) for phase in self.phases]
        rows.append(f"| **total** | {total:.1f} | 100.0 | {peak:.0f} | {peak / self.fp32_mib:.2f} |")
        return "\n".join([COLUMNS, "|---|---:|---:|---:|---:|", *rows])


@contextlib.contextmanager
def timed_parts(parts=QUANTIZE_PARTS):
    """Wrap each (owner, function name) with a timer; yields label -> seconds spent inside (summed over calls)."""
    spent = {label: 0.0 for _, _, label in parts}
    originals = []
    for owner, name, label in parts:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def wrapper(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - start

        setattr(owner, name, wrapper)
    try:
        yield spent
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def measure(path: pathlib.Path, recipe: lowbit.Recipe, tokenizer: str, windows: int, length: int, output) -> Bench:
    """load -> calibration windows -> every pass of the recipe's pipeline -> save, a row per phase."""
    bench = Bench(model_bytes(path))
    model = bench.run("load", lambda: lowbit.load(path))
    feeds = None
    if recipe.needs_calibration:
        inputs = [value.name for value in model.graph.inputs]
        feeds = bench.run(
            "calibration windows (tokenize)",
            lambda: text.named_calibration_feeds(tokenizer, inputs, length, windows),
        )
    report = OptimizeReport(recipe=dataclasses.asdict(recipe))
    for pass_ in pipelines.portable_pipeline(recipe, calibration=feeds):
        name = type(pass_).__name__
        with timed_parts() as parts:
            model = bench.run(name, lambda pass_=pass_, model=model: pipelines.run_pipeline(model, [pass_], report))
        details = report.passes[-1].details
        for key, label in (
            ("seconds_onnxruntime", "ONNX Runtime forward"),
            ("seconds_statistics", "H not hidden"),
            ("seconds_quantization", "quantization not hidden"),
        ):
            if key in details:
                bench.add(Phase(label, details[key], None))
        for label, seconds in parts.items():
            if seconds:
                bench.add(Phase(label, seconds, None))
    bench.run("save", lambda: lowbit.save(model, output))
    bench.sampler.running = False
    return bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.tools.dev.bench_optimize", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", type=pathlib.Path, help="fp32 ONNX model (lowbit export smollm2 -o ...)")
    parser.add_argument("--recipe", default=json.dumps(DEFAULT_RECIPE), help="Recipe fields as JSON")
    parser.add_argument("--tokenizer", default="smollm2", help="calibration tokenizer (smollm2, minilm, HF folder)")
    parser.add_argument("--windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--length", type=int, default=256, help="tokens per calibration window")
    parser.add_argument(
        "-o", "--output", type=pathlib.Path, help="where to write the result (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    if args.output is not None:
        check_writable_file(args.output, "-o", suffix=".onnx")  # before the run, not when it saves at the end
    recipe = lowbit.Recipe(**json.loads(args.recipe))
    load = os.getloadavg()
    print(
        f"{args.model}: {model_bytes(args.model) / 2**20:.0f} MiB fp32; recipe {args.recipe}; load {load[0]:.2f}",
        flush=True,
    )
    print(COLUMNS + "\n|---|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        output = args.output or pathlib.Path(folder) / "model.onnx"
        bench = measure(args.model, recipe, args.tokenizer, args.windows, args.length, output)
    print(f"\nload after: {os.getloadavg()[0]:.2f} (before: {load[0]:.2f})\n\n{bench.table()}", flush=True)


if __name__ == "__main__":
    main()
