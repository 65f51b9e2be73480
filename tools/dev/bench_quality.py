"""Quality benchmark: lowbit's RTN / GPTQ with per-OC, per-IC and AdaDim groups (each selector), and the
main ones with clip search (``+ clip``), against fp32 and ONNX Runtime's own weight-only quantizer, at
W4 / W3 / W2 g128.

    python -m lowbit.tools.dev.bench_quality --model smollm2 --out bench-quality
    python -m lowbit.tools.dev.bench_quality --model minilm --out bench-quality-minilm

SmolLM2: calibration on 128 windows x 256 tokens of the calibration plays, perplexity on 40 x 512 tokens
of the held-out play (activations fp32 everywhere: ONNX Runtime's MatMulNBits at accuracy level 0).
MiniLM: calibration on sentences of the calibration plays, mean embedding cosine against fp32 on
sentences of the held-out play. Each finished row is cached in ``--out/rows.json``, so an interrupted
run resumes (a folder whose rows were measured under another setting is refused); ``--out`` also gets
``results.md``, ``axis_choices.md`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import time

import numpy as np
import onnx

import lowbit
from lowbit.ir.files import model_bytes
from lowbit.passes.axis_selectors import SELECTORS
from lowbit.runtime.calibration import CalibrationStats, collect
from lowbit.tools import models, text

#: (method, axis, AdaDim selector, clip search) of every lowbit row.
LOWBIT_ROWS = [("rtn", "oc", None, False), ("rtn", "ic", None, False)] + [
    ("rtn", "adadim", s, False) for s in SELECTORS
]
LOWBIT_ROWS += [("gptq", "oc", None, False), ("gptq", "ic", None, False)] + [
    ("gptq", "adadim", s, False) for s in SELECTORS
]
LOWBIT_ROWS += [("rtn", "oc", None, True), ("gptq", "oc", None, True), ("gptq", "adadim", "block", True)]
ORT_ALGORITHMS = {"DEFAULT": (2, 4, 8), "HQQ": (2, 4, 8), "GPTQ": (4,)}  # bit widths each supports


@dataclasses.dataclass
class Setting:
    model: str
    bits: tuple[int, ...]
    group_size: int
    calibration_windows: int
    calibration_length: int
    eval_windows: int
    eval_length: int
    out: pathlib.Path

    @classmethod
    def from_args(cls, args: argparse.Namespace, bits) -> Setting:
        """The setting of a benchmark's parsed command line (the shared flags), measuring ``bits``."""
        fields = ("group_size", "calibration_windows", "calibration_length", "eval_windows", "eval_length", "out")
        return cls(args.model, tuple(bits), **{name: getattr(args, name) for name in fields})


class Bench:
    """Runs and caches rows; the model-specific parts are the input feeds and the quality metric."""

    def __init__(self, setting: Setting):
        self.setting = setting
        setting.out.mkdir(parents=True, exist_ok=True)
        self.rows_path = setting.out / "rows.json"
        self.rows: dict[str, dict] = json.loads(self.rows_path.read_text()) if self.rows_path.exists() else {}
        _check_rows_setting(setting, bool(self.rows))
        self.source = setting.out / f"{setting.model}.fp32.onnx"
        if not self.source.exists():
            (models.export_smollm2 if setting.model == "smollm2" else models.export_minilm)(self.source)
        self._statistics: CalibrationStats | None = None

    # -- model-specific -------------------------------------------------------------------------
    def calibration_feeds(self) -> list[dict[str, np.ndarray]]:
        s = self.setting
        if s.model == "smollm2":
            return text.calibration_feeds(
                models.smollm2_tokenizer(), ["input_ids"], s.calibration_length, s.calibration_windows
            )
        sentences = text.sentences(text.calibration_text(), count=16 * s.calibration_windows)
        return _sentence_feeds(models.minilm_tokenizer(), sentences, batch=16)

    def quality(self, path: pathlib.Path) -> float:
        s = self.setting
        if s.model == "smollm2":
            from lowbit.tools.eval_perplexity import perplexity

            windows = text.token_windows(
                models.smollm2_tokenizer(), text.evaluation_text(), s.eval_length, s.eval_windows
            )
            return perplexity(path, windows)
        from lowbit.tools.eval_embedding import embedding_cosine

        sentences = text.sentences(text.evaluation_text(), count=256)
        return embedding_cosine(self.source, path, models.minilm_tokenizer(), sentences)["mean"]

    # -- shared -----------------------------------------------------------------------------------
    def statistics(self) -> CalibrationStats:
        if self._statistics is None:
            start = time.perf_counter()
            feeds = self.calibration_feeds()
            self._statistics = collect(lowbit.load(self.source), feeds, total=len(feeds))
            self.calibration_seconds = time.perf_counter() - start
            print(f"calibration: {len(feeds)} batches in {self.calibration_seconds:.1f} s")
        return self._statistics

    def run(self, key: str, build=None) -> dict:
        """``build(path) -> dict`` writes the model at path (no build: the fp32 model); quality and bytes
        are added and the row is cached."""
        if key in self.rows:
            return self.rows[key]
        path = self.setting.out / f"{key.replace(' ', '_')}.onnx" if build else self.source
        start = time.perf_counter()
        try:
            extra = build(path) if build else {}
        except Exception as error:  # a baseline quantizer that crashes is a result too; say it and go on
            row = {"error": f"{type(error).__name__}: {error}"}
            print(f"{key}: FAILED {row['error']}")
            self.rows[key] = row
            self.rows_path.write_text(json.dumps(self.rows, indent=1))
            return row
        seconds = time.perf_counter() - start
        row = {"quality": self.quality(path), "bytes": model_bytes(path), "optimize_s": seconds, **extra}
        print(f"{key}: {row['quality']:.4f}, {row['bytes'] / 2**20:.1f} MiB, {seconds:.1f} s")
        self.rows[key] = row
        self.rows_path.write_text(json.dumps(self.rows, indent=1))
        if build:
            path.unlink()  # keep the folder small; the row is cached
        return row

    def lowbit_row(self, bits: int, method: str, axis: str, selector: str | None, clip_search: bool):
        recipe = lowbit.Recipe(
            bits=bits,
            group_size=self.setting.group_size,
            axis=axis,
            method=method,
            selector=selector or "matrix",
            clip_search=clip_search,
        )
        calibrated = recipe.needs_calibration or clip_search  # the search weighs channels by diag(H)

        def build(path):
            result = lowbit.optimize(
                lowbit.load(self.source), recipe, calibration=self.statistics() if calibrated else None
            )
            lowbit.save(result.model, path)
            choices = {}
            for weight in result.report.weights:
                choices.setdefault(layer_type(weight.layer), {"oc": 0, "ic": 0})[weight.axis] += 1
            return {"choices": choices}

        return build

    def ort_row(self, bits: int, algorithm: str):
        from onnxruntime.quantization import matmul_nbits_quantizer as quantizer
        from onnxruntime.quantization.calibrate import CalibrationDataReader

        group = self.setting.group_size

        class Feeds(CalibrationDataReader):
            def __init__(self, feeds):
                self.iterator = iter(feeds)

            def get_next(self):
                return next(self.iterator, None)

        def build(path):
            if algorithm == "DEFAULT":
                config = quantizer.DefaultWeightOnlyQuantConfig(
                    block_size=group, is_symmetric=False, accuracy_level=0, bits=bits
                )
            elif algorithm == "HQQ":
                config = quantizer.HQQWeightOnlyQuantConfig(block_size=group, bits=bits)
            else:
                config = quantizer.GPTQWeightOnlyQuantConfig(
                    Feeds(self.calibration_feeds()), block_size=group, actorder=True
                )
            model = onnx.load(str(self.source))
            quant = quantizer.MatMulNBitsQuantizer(
                model, bits=bits, block_size=group, accuracy_level=0, algo_config=config
            )
            quant.process()
            onnx.save(quant.model.model, str(path))
            return {}

        return build

    def all_rows(self) -> None:
        self.run("fp32")
        for bits in self.setting.bits:
            for algorithm, supported in ORT_ALGORITHMS.items():
                if bits in supported:
                    self.run(f"W{bits} ORT {algorithm}", self.ort_row(bits, algorithm))
            for row in LOWBIT_ROWS:
                self.run(_lowbit_key(bits, *row), self.lowbit_row(bits, *row))


def _check_rows_setting(setting: Setting, has_rows: bool) -> None:
    """Refuse a folder whose cached rows were measured under another setting (the widths aside: rows are keyed by
    width), then record this one (``setting.json``) for the next run."""
    recorded = {name: value for name, value in dataclasses.asdict(setting).items() if name not in ("bits", "out")}
    path = setting.out / "setting.json"
    if has_rows and path.exists():
        cached = json.loads(path.read_text())
        differing = sorted(name for name in recorded if cached.get(name) != recorded[name])
        if differing:
            changes = ", ".join(f"{name} {cached.get(name)!r} -> {recorded[name]!r}" for name in differing)
            raise ValueError(f"{setting.out} holds rows measured with another setting ({changes}): use another --out")
    path.write_text(json.dumps(recorded, indent=1))


def _lowbit_key(bits: int, method: str, axis: str, selector: str | None, clip_search: bool) -> str:
    return f"W{bits} lowbit {method} {axis}" + (f" {selector}" if selector else "") + (" + clip" if clip_search else "")


def _sentence_feeds(tokenizer, sentences: list[str], batch: int) -> list[dict[str, np.ndarray]]:
    feeds = []
    for start in range(0, len(sentences), batch):
        encoded = tokenizer(sentences[start : start + batch], padding=True, truncation=True, return_tensors="np")
        feeds.append({key: encoded[key].astype(np.int64) for key in ("input_ids", "attention_mask")})
    return feeds


def markdown(rows: dict[str, dict], setting: Setting, metric: str) -> str:
    """Rows = methods, columns = bit widths: quality (MiB)."""
    methods = ["ORT DEFAULT", "ORT HQQ", "ORT GPTQ"] + [_lowbit_key(0, *row)[3:] for row in LOWBIT_ROWS]
    header = "| method | " + " | ".join(f"W{b} g{setting.group_size}" for b in setting.bits) + " |"
    lines = [f"fp32: {metric} {rows['fp32']['quality']:.4f}, {rows['fp32']['bytes'] / 2**20:.1f} MiB", "", header]
    lines.append("|---|" + "---:|" * len(setting.bits))
    for method in methods:
        cells = []
        for bits in setting.bits:
            row = rows.get(f"W{bits} {method}")
            if row is None:
                cells.append("n/a")
            elif "error" in row:
                cells.append("crashed")
            else:
                cells.append(f"{row['quality']:.4g} ({row['bytes'] / 2**20:.0f} MiB)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_type(path: str) -> str:
    """A weight's module path without the layer index: ``model.layers.3.self_attn.q_proj`` ->
    ``self_attn.q_proj``, ``encoder.layer.3.attention.output.dense`` -> ``attention.output.dense``."""
    return re.sub(r"^.*?\.\d+\.", "", path)


def axis_choice_table(rows: dict[str, dict]) -> str:
    """How often each layer type got per-IC groups under each AdaDim row (columns in order of appearance)."""
    adadim = {key: row["choices"] for key, row in rows.items() if "adadim" in key and "choices" in row}
    types = list(dict.fromkeys(layer for choices in adadim.values() for layer in choices))
    lines = ["| row | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
    for key, choices in adadim.items():
        cells = [f"{c['ic']}/{c['ic'] + c['oc']}" if (c := choices.get(layer)) else "-" for layer in types]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], setting: Setting, metric: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({key.split(" ", 1)[1] for key in rows if key != "fp32"})
    figure, axes = plt.subplots(
        1, len(setting.bits), figsize=(5 * len(setting.bits), 0.35 * len(methods) + 1.5), sharey=True
    )
    for ax, bits in zip(np.atleast_1d(axes), setting.bits):
        values = [rows.get(f"W{bits} {m}", {}).get("quality", np.nan) for m in methods]  # crashed/missing: no bar
        ax.barh(methods, values, color=["tab:gray" if m.startswith("ORT") else "tab:blue" for m in methods])
        ax.axvline(rows["fp32"]["quality"], color="black", linestyle="--", label="fp32")
        ax.set_title(f"W{bits} g{setting.group_size}")
        ax.set_xlabel(metric)
        if metric == "perplexity":
            ax.set_xscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.tools.dev.bench_quality", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-length", type=int, default=512)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-quality"))
    args = parser.parse_args(argv)
    setting = Setting.from_args(args, args.bits)
    bench = Bench(setting)
    bench.all_rows()
    metric = "perplexity" if args.model == "smollm2" else "cosine"
    report = (
        markdown(bench.rows, setting, metric)
        + "\n\nAdaDim: per-IC choices per layer type\n\n"
        + axis_choice_table(bench.rows)
    )
    (args.out / "results.md").write_text(report + "\n")
    plot(bench.rows, setting, metric, args.out / "quality.png")
    print(report)


if __name__ == "__main__":
    main()
