"""The main job: export a real model, quantize it with several recipes, compare with fp32.

For SmolLM2-135M: file size, perplexity on a held-out play (activations in fp32, so the figure measures
weight quantization alone) and forward latency with ONNX Runtime's default settings (what a deployment
gets). For all-MiniLM-L6-v2: size, embedding cosine against fp32 on held-out sentences, latency.
ONNX files go to ``--workdir`` and are reused on the next run (the fp32 export takes about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time

import numpy as np

import lowbit
from lowbit.passes import pipelines
from lowbit.runtime.calibration import collect
from lowbit.runtime.session import session
from lowbit.tools import models, text

LATENCY_TOKENS = 128
LATENCY_RUNS = 10
CALIBRATION_LENGTH = 256


@dataclasses.dataclass
class Row:
    name: str
    bytes: int
    quality: float
    latency_ms: float
    optimize_s: float | None = None


def file_bytes(path: pathlib.Path) -> int:
    """The model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def latency_ms(path: pathlib.Path, feeds: dict[str, np.ndarray]) -> float:
    """Median forward time over ``LATENCY_RUNS`` runs after two warm-ups, ONNX Runtime defaults."""
    model = session(path)
    for _ in range(2):
        model.run(None, feeds)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        model.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def float_model(workdir: pathlib.Path, name: str) -> pathlib.Path:
    path = workdir / f"{name}.fp32.onnx"
    if path.exists():
        print(f"reusing {path}")
        return path
    export = models.export_smollm2 if name == "smollm2" else models.export_minilm
    return export(path)


def demo_recipes(args: argparse.Namespace) -> list[tuple[str, lowbit.Recipe]]:
    """(row name, recipe) for every (bits, axis) of the run with RTN; then AdaDim + GPTQ (calibrated on the
    calibration plays) for each of ``--gptq-bits``, alone and with ``outlier_pipeline``'s sparse outliers
    (lowbit's best); then the first setting again with the embedding table and LM head quantized too (the
    whole file's compression)."""
    fused = args.form == "fused"
    form = " (fused)" if fused else ""
    recipes = [
        (f"W{bits} g{args.group_size} {axis} RTN{form}",
         lowbit.Recipe(bits=bits, group_size=args.group_size, axis=axis, fused=fused))
        for bits in args.bits for axis in args.axes
    ]
    outliers = pipelines.OUTLIER_DEFAULTS
    for bits in args.gptq_bits:
        adadim = lowbit.Recipe(bits=bits, group_size=args.group_size, axis="adadim", method="gptq", fused=fused)
        recipes.append((f"W{bits} g{args.group_size} AdaDim GPTQ{form}", adadim))
        recipes.append((
            f"W{bits} g{args.group_size} AdaDim GPTQ + {outliers['outlier_fraction']:.1%} outliers{form}",
            dataclasses.replace(adadim, **outliers),
        ))
    bits, axis = args.bits[0], args.axes[0]
    recipes.append((
        f"W{bits} g{args.group_size} {axis} RTN{form} + embedding/head",
        lowbit.Recipe(bits=bits, group_size=args.group_size, axis=axis, fused=fused,
                      include_embeddings=True, include_lm_head=True),
    ))
    return recipes


def quantized_models(source: pathlib.Path, args: argparse.Namespace, calibration_feeds):
    """Yield (name, path, optimize seconds) for every ``demo_recipes`` row; ``calibration_feeds()`` makes
    the calibration batches, whose statistics are collected once (by the first row that needs them, which
    is charged the time) and shared by the rows after it."""
    stem = source.name.split(".")[0]
    calibration_stats = None
    for name, recipe in demo_recipes(args):
        slug = name.lower().replace(" + ", ".").replace(" (", ".").replace(")", "").replace("/", "-")
        path = source.with_name(f"{stem}.{slug.replace(' ', '.').replace('%', 'pct')}.onnx")
        start = time.perf_counter()
        if recipe.needs_calibration and calibration_stats is None:
            calibration_stats = collect(lowbit.load(source), calibration_feeds())
        calibration = calibration_stats if recipe.needs_calibration else None
        result = lowbit.optimize(lowbit.load(source), recipe, calibration=calibration)
        lowbit.save(result.model, path)
        yield name, path, time.perf_counter() - start


def run_smollm2(workdir: pathlib.Path, args: argparse.Namespace) -> list[Row]:
    from lowbit.tools.eval_perplexity import perplexity

    source = float_model(workdir, "smollm2")
    windows = text.token_windows(models.smollm2_tokenizer(), text.evaluation_text(), args.length, args.windows)
    feeds = {"input_ids": windows[:1, :LATENCY_TOKENS]}
    rows = [Row("fp32", file_bytes(source), perplexity(source, windows), latency_ms(source, feeds))]

    def calibration_feeds():
        return text.calibration_feeds(models.smollm2_tokenizer(), ["input_ids"], CALIBRATION_LENGTH, args.calibration_windows)

    for name, path, seconds in quantized_models(source, args, calibration_feeds):
        rows.append(Row(name, file_bytes(path), perplexity(path, windows), latency_ms(path, feeds), seconds))
    return rows


def run_minilm(workdir: pathlib.Path, args: argparse.Namespace) -> list[Row]:
    from lowbit.tools.eval_embedding import embedding_cosine

    source = float_model(workdir, "minilm")
    tokenizer = models.minilm_tokenizer()
    sentences = text.sentences(text.evaluation_text(), count=256)
    encoded = tokenizer(sentences[:8], padding=True, return_tensors="np")
    feeds = {key: encoded[key].astype(np.int64) for key in ("input_ids", "attention_mask")}
    rows = [Row("fp32", file_bytes(source), 1.0, latency_ms(source, feeds))]

    def calibration_feeds():
        return text.calibration_feeds(tokenizer, ["input_ids", "attention_mask"], CALIBRATION_LENGTH, args.calibration_windows)

    for name, path, seconds in quantized_models(source, args, calibration_feeds):
        cosine = embedding_cosine(source, path, tokenizer, sentences)["mean"]
        rows.append(Row(name, file_bytes(path), cosine, latency_ms(path, feeds), seconds))
    return rows


def table(rows: list[Row], quality_name: str, latency_name: str) -> str:
    """Markdown table with ratios against the fp32 row."""
    base = rows[0]
    lines = [
        f"| model | MiB | size vs fp32 | {quality_name} | change vs fp32 | {latency_name} ms | speed vs fp32 | optimize s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        change = (row.quality - base.quality) / base.quality * 100
        optimize = f"{row.optimize_s:.1f}" if row.optimize_s is not None else "-"
        lines.append(
            f"| {row.name} | {row.bytes / 2**20:.1f} | {base.bytes / row.bytes:.2f}x smaller | {row.quality:.4f} | "
            f"{change:+.2f} % | {row.latency_ms:.1f} | {base.latency_ms / row.latency_ms:.2f}x | {optimize} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        rows = run_smollm2(workdir, args)
        heading = (
            f"SmolLM2-135M-Instruct, perplexity on {args.windows} x {args.length} tokens of "
            f"{text.EVALUATION_PLAY} (activations fp32), latency of one forward over {LATENCY_TOKENS} tokens "
            "(ONNX Runtime defaults, CPU)"
        )
        print(f"\n{heading}\n\n{table(rows, 'perplexity', 'forward')}")
    else:
        rows = run_minilm(workdir, args)
        heading = f"all-MiniLM-L6-v2, mean embedding cosine vs fp32 on 256 sentences of {text.EVALUATION_PLAY}"
        print(f"\n{heading}\n\n{table(rows, 'cosine', 'batch-8')}")
    print(
        "\nRows without '+ embedding/head' quantize the decoder's linear layers and keep the embedding table and"
        "\nLM head in float (lowbit's default; `lowbit optimize --include-embeddings --include-lm-head` includes them)."
        "\n'(fused)': lowbit's fused kernels (`--fused`); `lowbit demo --form qdq` shows the portable QDQ form"
        "\nthat stock ONNX Runtime runs (same accuracy, slower per-IC and 2/3-bit)."
        f"\nAdaDim GPTQ rows are calibrated on {args.calibration_windows} x {CALIBRATION_LENGTH} tokens of "
        f"{', '.join(text.CALIBRATION_PLAYS)}."
    )
