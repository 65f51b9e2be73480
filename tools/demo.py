"""The main job: export a real model, quantize it with several recipes, compare with fp32.

For SmolLM2-135M: file size, perplexity on a held-out play (activations in fp32, so the figure measures
weight quantization alone) and forward latency with ONNX Runtime's default settings (what a deployment
gets). For all-MiniLM-L6-v2: size, embedding cosine against fp32 on held-out sentences, latency.

Each table line is printed as soon as its row is measured; progress (which row, how many remain) goes to
stderr. The fp32 export comes from the export cache (``lowbit.tools.models``); each quantized file stays
in ``--workdir`` beside a note of its recipe, and a later run with the same recipe reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

import lowbit
from lowbit.ir import files
from lowbit.passes import pipelines
from lowbit.runtime.calibration import collect
from lowbit.runtime.session import session
from lowbit.tools import models, text

LATENCY_TOKENS = 128
LATENCY_RUNS = 10
CALIBRATION_LENGTH = 256


def say(message: str) -> None:
    """Progress on stderr, at once (the table goes to stdout)."""
    print(f"[lowbit demo] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Row:
    name: str
    bytes: int
    quality: float
    latency_ms: float
    #: None for the fp32 row; "reused" when an earlier run's file was taken.
    optimize_s: float | str | None = None


@dataclasses.dataclass
class Task:
    """What one model's demo needs: how to score a file against the fp32 source, the latency feeds, the
    calibration feeds and the table's wording."""

    model: str
    quality: Callable[[pathlib.Path, pathlib.Path | ort.InferenceSession], float]
    latency_feeds: dict[str, np.ndarray]
    calibration_feeds: Callable[[], list[dict[str, np.ndarray]]]
    quality_name: str
    latency_name: str
    heading: str


def latency_ms(model: pathlib.Path | ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    """Median forward time over ``LATENCY_RUNS`` runs after two warm-ups; a path is opened with ONNX
    Runtime's defaults."""
    model = model if isinstance(model, ort.InferenceSession) else session(model)
    for _ in range(2):
        model.run(None, feeds)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        model.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo_recipes(args: argparse.Namespace) -> list[tuple[str, lowbit.Recipe]]:
    """(row name, recipe) for every (bits, axis) of the run with RTN; then AdaDim + GPTQ (calibrated on the
    calibration plays) for each of ``--gptq-bits``, with ``--outliers`` also with ``outlier_pipeline``'s
    sparse outliers; with ``--whole-file`` the first setting again with the embedding table and LM head
    quantized too (the whole file's compression)."""
    fused = args.form == "fused"
    form = " (fused)" if fused else ""
    recipes = [
        (
            f"W{bits} g{args.group_size} {axis} RTN{form}",
            lowbit.Recipe(bits=bits, group_size=args.group_size, axis=axis, fused=fused),
        )
        for bits in args.bits
        for axis in args.axes
    ]
    outliers = pipelines.OUTLIER_DEFAULTS
    for bits in args.gptq_bits:
        adadim = lowbit.Recipe(
            bits=bits,
            group_size=args.group_size,
            axis="adadim",
            method="gptq",
            fused=fused,
            choice_method=args.choice_method,
        )
        recipes.append((f"W{bits} g{args.group_size} AdaDim GPTQ{form}", adadim))
        if args.outliers:
            recipes.append(
                (
                    f"W{bits} g{args.group_size} AdaDim GPTQ + {outliers['outlier_fraction']:.1%} outliers{form}",
                    dataclasses.replace(adadim, **outliers),
                )
            )
    if not args.whole_file:
        return recipes
    bits, axis = args.bits[0], args.axes[0]
    recipes.append(
        (
            f"W{bits} g{args.group_size} {axis} RTN{form} + embedding/head",
            lowbit.Recipe(
                bits=bits,
                group_size=args.group_size,
                axis=axis,
                fused=fused,
                include_embeddings=True,
                include_lm_head=True,
            ),
        )
    )
    return recipes


def float_model(workdir: pathlib.Path, name: str) -> pathlib.Path:
    """The fp32 file of ``name`` in ``workdir``: kept from an earlier run, or from the export cache."""
    path = workdir / f"{name}.fp32.onnx"
    if path.exists():
        say(f"reusing {path}")
        return path
    export = models.export_smollm2 if name == "smollm2" else models.export_minilm
    return export(path, cache=True)


def _recipe_note(recipe: lowbit.Recipe, calibration_windows: int) -> dict:
    """What a quantized file was made from: a later run reuses the file only when this matches."""
    windows = calibration_windows if recipe.needs_calibration else 0
    return {"recipe": dataclasses.asdict(recipe), "calibration_windows": windows, "length": CALIBRATION_LENGTH}


def quantized_model(
    source: pathlib.Path, name: str, recipe: lowbit.Recipe, args: argparse.Namespace, statistics_of: Callable
) -> tuple[pathlib.Path, float | str]:
    """(path, optimize seconds or "reused") of one row's model: reused when the workdir holds one made
    from the same recipe, else made now. ``statistics_of()`` returns the calibration statistics, collected
    once for all rows (the first row that needs them is charged the time)."""
    stem = source.name.split(".")[0]
    slug = name.lower().replace(" + ", ".").replace(" (", ".").replace(")", "").replace("/", "-")
    path = source.with_name(f"{stem}.{slug.replace(' ', '.').replace('%', 'pct')}.onnx")
    note_path = path.with_name(path.name + ".recipe.json")
    note = _recipe_note(recipe, args.calibration_windows)
    if path.exists() and note_path.exists() and json.loads(note_path.read_text()) == note:
        say(f"reusing {path} (an earlier run made it from the same recipe; delete it to make it again)")
        return path, "reused"
    start = time.perf_counter()
    calibration = statistics_of() if recipe.needs_calibration else None
    result = lowbit.optimize(lowbit.load(source), recipe, calibration=calibration)
    say(f"saving {path}")
    lowbit.save(result.model, path)
    note_path.write_text(json.dumps(note, indent=1))
    return path, time.perf_counter() - start


def smollm2_task(args: argparse.Namespace) -> Task:
    from lowbit.tools.eval_perplexity import perplexity

    tokenizer = models.smollm2_tokenizer()
    windows = text.token_windows(tokenizer, text.evaluation_text(), args.length, args.windows)
    return Task(
        model="smollm2",
        quality=lambda source, path: perplexity(path, windows),
        latency_feeds={"input_ids": windows[:1, :LATENCY_TOKENS]},
        calibration_feeds=lambda: text.calibration_feeds(
            tokenizer, ["input_ids"], CALIBRATION_LENGTH, args.calibration_windows
        ),
        quality_name="perplexity",
        latency_name="forward",
        heading=f"SmolLM2-135M-Instruct, perplexity on {args.windows} x {args.length} tokens of "
        f"{text.EVALUATION_PLAY} (activations fp32), latency of one forward over {LATENCY_TOKENS} tokens "
        "(ONNX Runtime defaults, CPU)",
    )


def minilm_task(args: argparse.Namespace) -> Task:
    from lowbit.tools.eval_embedding import embedding_cosine

    tokenizer = models.minilm_tokenizer()
    sentences = text.sentences(text.evaluation_text(), count=256)
    encoded = tokenizer(sentences[:8], padding=True, return_tensors="np")
    inputs = ["input_ids", "attention_mask"]
    return Task(
        model="minilm",
        quality=lambda source, path: embedding_cosine(source, path, tokenizer, sentences)["mean"],
        latency_feeds={key: encoded[key].astype(np.int64) for key in inputs},
        calibration_feeds=lambda: text.calibration_feeds(
            tokenizer, inputs, CALIBRATION_LENGTH, args.calibration_windows
        ),
        quality_name="cosine",
        latency_name="batch-8",
        heading=f"all-MiniLM-L6-v2, mean embedding cosine vs fp32 on 256 sentences of {text.EVALUATION_PLAY}",
    )


def table_lines(rows: list[Row], quality_name: str, latency_name: str) -> list[str]:
    """Markdown table with ratios against the fp32 row (the first)."""
    base = rows[0]
    lines = [
        f"| model | MiB | size vs fp32 | {quality_name} | change vs fp32 | {latency_name} ms | speed vs fp32 | optimize s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        change = (row.quality - base.quality) / base.quality * 100
        optimize = f"{row.optimize_s:.1f}" if isinstance(row.optimize_s, float) else (row.optimize_s or "-")
        lines.append(
            f"| {row.name} | {row.bytes / 2**20:.1f} | {base.bytes / row.bytes:.2f}x smaller | {row.quality:.4f} | "
            f"{change:+.2f} % | {row.latency_ms:.1f} | {base.latency_ms / row.latency_ms:.2f}x | {optimize} |"
        )
    return lines


def measured(path: pathlib.Path, args: argparse.Namespace) -> pathlib.Path | ort.InferenceSession:
    """What quality and latency are measured on: for the fused form one session serves both (it holds no
    MatMulNBits, whose accuracy level is the only setting in which they differ), saving a model load and
    warm-up per row; for the portable form the path, opened by each as it needs."""
    return session(path, matmulnbits_accuracy_level=0) if args.form == "fused" else path


def run(workdir: pathlib.Path, args: argparse.Namespace, task: Task) -> list[Row]:
    """Measure fp32, then every recipe of ``demo_recipes``, printing each table line as it is measured."""
    recipes = demo_recipes(args)
    total = len(recipes) + 1
    say(f"{total} rows: fp32, {', '.join(name for name, _ in recipes)}; files in {workdir}")
    say(f"[1/{total}] fp32")
    source = float_model(workdir, task.model)
    fp32 = Row("fp32", files.model_bytes(source), 1.0, 0.0)
    say(f"measuring {task.quality_name} and latency of {source.name}")
    target = measured(source, args)
    if task.model == "smollm2":
        fp32.quality = task.quality(source, target)
    fp32.latency_ms = latency_ms(target, task.latency_feeds)
    rows = [fp32]
    print(f"\n{task.heading}\n", flush=True)
    for line in table_lines(rows, task.quality_name, task.latency_name):
        print(line, flush=True)
    calibration_stats = None

    def statistics_of():
        nonlocal calibration_stats
        if calibration_stats is None:
            say(f"collecting calibration statistics ({args.calibration_windows} x {CALIBRATION_LENGTH} tokens)")
            calibration_stats = collect(lowbit.load(source), task.calibration_feeds())
        return calibration_stats

    for index, (name, recipe) in enumerate(recipes, 2):
        after = total - index
        say(f"[{index}/{total}] {name} ({after} row{'' if after == 1 else 's'} after it)")
        path, seconds = quantized_model(source, name, recipe, args, statistics_of)
        say(f"measuring {task.quality_name} and latency of {path.name}")
        target = measured(path, args)
        rows.append(
            Row(
                name,
                files.model_bytes(path),
                task.quality(source, target),
                latency_ms(target, task.latency_feeds),
                seconds,
            )
        )
        print(table_lines(rows, task.quality_name, task.latency_name)[-1], flush=True)
    return rows


def main(args: argparse.Namespace) -> None:
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = smollm2_task(args) if args.model == "smollm2" else minilm_task(args)
    run(workdir, args, task)
    print(
        "\nRows without '+ embedding/head' quantize the decoder's linear layers and keep the embedding table and"
        "\nLM head in float (lowbit's default; `lowbit optimize --include-embeddings --include-lm-head` includes them)."
        "\n'(fused)': lowbit's fused kernels (`--fused`); `lowbit demo --form qdq` shows the portable QDQ form"
        "\nthat stock ONNX Runtime runs (same accuracy, slower per-IC and 2/3-bit)."
        f"\nCalibrated rows use {args.calibration_windows} x {CALIBRATION_LENGTH} tokens of "
        f"{', '.join(text.CALIBRATION_PLAYS)}; 'reused': the file of an earlier run with the same recipe.",
        flush=True,
    )
    say(f"done in {time.perf_counter() - start:.0f} s")
