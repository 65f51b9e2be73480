"""Non-uniform codes (k-means tables, BCQ) against lowbit's integer grid at about the same bytes, on SmolLM2
or MiniLM.

    python -m lowbit.tools.dev.bench_codebook --bits 3 --out bench-codebook
    python -m lowbit.tools.dev.bench_codebook --model minilm --bits 3 --gptq --out bench-codebook-minilm

Every MatMul weight (the head and the embedding stay float, as in the README's quality table) is replaced by
its reconstruction under each format ("fake quantization": the float model with the quantized values, so the
figure is the format's accuracy, not a kernel's); quality as ``bench_quality`` measures it (SmolLM2: perplexity
on othello windows; MiniLM: mean embedding cosine to fp32 on its sentences), the H-weighted output error
averaged over the weights (``trace(dW^T H dW) / trace(W^T H W)``, the AdaDim criterion) and the stored bits
per weight (integer: ``quantize_plan.stored_bytes`` of the fused form; shared table: that plus its float32
table; codebook: codes + float32 tables; BCQ: codes + float16 scales). Rows stream as they finish and are
cached in ``--out/rows.json`` (a run that was stopped resumes; rows of another setting are refused: use a new
folder); ``--out`` keeps the table in ``results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys

import numpy as np
import onnx_ir as ir

import lowbit
from lowbit.ir import analysis
from lowbit.kernels import packing
from lowbit.passes.quant.adadim import output_error
from lowbit.passes.quant.codebook import (
    fit_bcq,
    fit_codebook,
    fit_shared_table,
    gptq_onto_tables,
    quantize_gptq_codebook,
)
from lowbit.passes.quant.gptq import factor_hessian, quantize_gptq
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.passes.quantize_plan import stored_bytes
from lowbit.tools.dev.bench_quality import Bench, Setting


@dataclasses.dataclass(frozen=True)
class Format:
    """One row: how every weight is quantized; ``quantize(weight, hessian) -> (approx, stored bits)``."""

    name: str
    quantize: object


def int_format(bits: int, group_size: int, axis: str, method: str, clip_search: bool) -> Format:
    scheme = QuantScheme(bits=bits, group_size=group_size, group_axis=axis, method=method, clip_search=clip_search)

    def quantize(weight, hessian):
        if method == "gptq":
            quantized = quantize_gptq(weight, hessian, scheme)
        else:
            quantized = quantize_rtn(weight, scheme, np.diag(hessian))
        return quantized.dequantize(), 8 * stored_bytes(quantized, ir.DataType.FLOAT, fused=True)

    label = f"int{bits} g{group_size} {axis} {method}" + (" + clip" if clip_search else "")
    return Format(label, quantize)


def codebook_format(bits: int, block_size: int, axis: str, method: str = "rtn") -> Format:
    """Tables by k-means; ``rtn``: each weight to its nearest entry, ``gptq``: GPTQ's sweep onto the tables."""
    block_axis = 0 if axis == "oc" else 1

    def quantize(weight, hessian):
        if method == "gptq":
            fitted = quantize_gptq_codebook(weight, factor_hessian(hessian), bits, block_size, block_axis)
        else:
            fitted = fit_codebook(weight, bits, block_size, block_axis, np.diag(hessian))
        return fitted.dequantize(), weight.size * bits + fitted.tables.size * 32

    group = "per channel" if block_size < 1 else f"g{block_size}"
    return Format(f"codebook{bits} {group} {axis} {method}", quantize)


def shared_table_format(bits: int, group_size: int, axis: str, method: str, clip_search: bool) -> Format:
    """The integer grid's groups (scales, zero points, clip search) with one fitted table of levels per weight
    (``fit_shared_table``); ``gptq``: GPTQ's sweep onto those tables. Stored as the fused integer form plus
    the table in float32."""
    scheme = QuantScheme(bits=bits, group_size=group_size, group_axis=axis, clip_search=clip_search)

    def quantize(weight, hessian):
        fitted = fit_shared_table(weight, scheme, np.diag(hessian))
        if method == "gptq":
            fitted = gptq_onto_tables(weight, factor_hessian(hessian), fitted)
        tiles, quads, block = packing.packed_shape(bits, *weight.shape)
        groups = fitted.tables.size >> bits
        return fitted.dequantize(), 8 * (tiles * quads * block + 5 * groups) + 32 * (1 << bits)

    label = f"table{bits} g{group_size} {axis} {method}" + (" + clip" if clip_search else "")
    return Format(label, quantize)


def bcq_format(bits: int, group_size: int, axis: str, method: str) -> Format:
    """Binary-coded groups (``fit_bcq``: ``bits`` float16 scales per group, every signed sum of them a level), by
    nearest level or by GPTQ's sweep onto those levels. Stored as the codes plus the scales."""
    block_axis = 0 if axis == "oc" else 1

    def quantize(weight, hessian):
        fitted = fit_bcq(weight, bits, group_size, block_axis, np.diag(hessian))
        if method == "gptq":
            fitted = gptq_onto_tables(weight, factor_hessian(hessian), fitted)
        groups = fitted.tables.size >> bits
        return fitted.dequantize(), weight.size * bits + groups * bits * 16

    return Format(f"bcq{bits} g{group_size} {axis} {method}", quantize)


def adadim(first: Format, second: Format) -> Format:
    """Per weight, the format with the lower H-weighted output error (AdaDim's matrix selector)."""

    def quantize(weight, hessian):
        options = [first.quantize(weight, hessian), second.quantize(weight, hessian)]
        return min(options, key=lambda option: output_error(weight, option[0], hessian))

    return Format(f"{first.name} | {second.name} (AdaDim)", quantize)


def formats(bits: int, group_size: int, with_gptq: bool) -> list[Format]:
    """The integer grid (per-OC, and AdaDim over both layouts) against the same groups with a fitted table of
    levels (per-OC, and AdaDim), against BCQ and against per-channel codebooks (per-OC, per-IC, AdaDim), by
    nearest rounding and, with ``with_gptq``, by GPTQ."""
    methods = ("rtn", "gptq") if with_gptq else ("rtn",)
    rows = []
    for method in methods:
        rows += [
            int_format(bits, group_size, "oc", method, True),
            shared_table_format(bits, group_size, "oc", method, True),
            adadim(
                shared_table_format(bits, group_size, "oc", method, True),
                shared_table_format(bits, group_size, "ic", method, True),
            ),
            bcq_format(bits, group_size, "oc", method),
            adadim(int_format(bits, group_size, "oc", method, True), int_format(bits, group_size, "ic", method, True)),
            codebook_format(bits, -1, "oc", method),
            codebook_format(bits, -1, "ic", method),
            adadim(codebook_format(bits, -1, "oc", method), codebook_format(bits, -1, "ic", method)),
        ]
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Every chosen format's row (fp32 first), printed and cached as each finishes."""
    bench = Bench(Setting.from_args(args, [args.bits]))
    rows = [{"format": "fp32", "bits": 32.0, "output_error": 0.0, **bench.run("fp32")}]
    _print_row(rows[0], metric(args.model), header=True)
    for fmt in formats(args.bits, args.group_size, args.gptq):
        if _chosen(fmt.name, args.only):
            rows.append({"format": fmt.name, **bench.run(fmt.name, functools.partial(fake_quantize, bench, fmt))})
            _print_row(rows[-1], metric(args.model))
    (args.out / "results.md").write_text(markdown(rows, args))
    return rows


def fake_quantize(bench: Bench, fmt: Format, path: pathlib.Path) -> dict:
    """Write the float model with every MatMul weight replaced by its reconstruction under ``fmt``; returns the
    stored bits per weight and the mean relative output error."""
    model = lowbit.load(bench.source)
    stored_bits = weights = 0
    errors = []
    for use in analysis.weight_uses(model.graph):
        if use.kind != "matmul" or use.weight.const_value is None:
            continue
        weight = np.asarray(use.weight.const_value.numpy(), dtype=np.float32)
        hessian = bench.statistics().for_use(use).hessian
        approx, bits = fmt.quantize(weight, hessian)
        energy = output_error(weight, np.zeros_like(weight), hessian)
        errors.append(output_error(weight, approx, hessian) / energy if energy > 0 else 0.0)
        use.weight.const_value = ir.tensor(np.asarray(approx, np.float32), name=use.weight.name)
        stored_bits += bits
        weights += weight.size
    lowbit.save(model, path)
    return {"bits": stored_bits / weights, "output_error": float(np.mean(errors))}


def metric(model: str) -> str:
    return "perplexity" if model == "smollm2" else "cosine"


def _chosen(name: str, only: list[str] | None) -> bool:
    """Whether the row ``name`` is asked for: every row without ``--only``, else the rows it names."""
    return not only or name in only


def _print_row(row: dict, metric_name: str, header: bool = False) -> None:
    if header:
        print(f"{'format':<48} {'bits/w':>7} {'mean rel. output error':>23} {metric_name:>11}", flush=True)
    if "error" in row:  # the format raised (Bench.run keeps the message)
        print(f"{row['format']:<48} failed: {row['error']}", flush=True)
    else:
        print(
            f"{row['format']:<48} {row['bits']:>7.3f} {row['output_error']:>23.5f} {row['quality']:>11.4f}", flush=True
        )


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    if args.model == "smollm2":
        what = f"SmolLM2, decoder weights at {args.bits} bits (head and embedding float)"
        measured = f"perplexity on othello {args.eval_windows} x {args.eval_length} tokens"
    else:
        what = f"MiniLM, every MatMul weight at {args.bits} bits (embeddings float)"
        measured = "mean embedding cosine to fp32 on the held-out play's sentences"
    lines = [
        f"{what}, calibration {args.calibration_windows} x {args.calibration_length}, {measured}, fake quantization.",
        "",
        f"| format | bits per weight | mean relative output error | {metric(args.model)} |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['format']} | failed: {r['error']} | | |"
        if "error" in r
        else f"| {r['format']} | {r['bits']:.3f} | {r['output_error']:.5f} | {r['quality']:.4f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128, help="group size of the integer rows")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=10, help="SmolLM2's perplexity windows")
    parser.add_argument("--eval-length", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--gptq", action="store_true", help="add the integer GPTQ row (slower)")
    parser.add_argument("--only", nargs="+", help="only these rows (format names as the table prints them)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-codebook"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
