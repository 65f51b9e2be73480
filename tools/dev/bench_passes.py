"""What each compile-time pass buys on SmolLM2: norm folding, channel reordering, dense-and-sparse
outliers at 0.1 / 0.5 / 1 %, and layer splitting, on top of RTN and GPTQ with per-OC and AdaDim groups.

    python -m lowbit.tools.dev.bench_passes --bits 3 2 --out bench-passes              # perplexity and bytes
    python -m lowbit.tools.dev.bench_passes --latency --out bench-passes               # forward-time cost

Quality: every (bits, method, axis, variant) cell is quantized from the fp32 export, its perplexity taken on
``--eval-windows`` x 512 held-out tokens, its file bytes counted; rows are cached in ``--out/rows.json``
(an interrupted run resumes) and ``--out/passes.md`` gets the table. Calibration statistics are
collected once and shared, except where norms are folded (folding changes the activations they describe).

Latency: the cost of each variant's extra work, as the time of one forward (128 tokens, and 1 token)
relative to the base quantized model of the same form, portable QDQ and fused (FuseQDQPass). The cost
depends on the graph's structure and the outliers' count, not on the rounding method, so it is measured on
RTN per-OC W3 models (sensitivity-ranked outliers, like the quality rows).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

import lowbit
from lowbit.ir.files import model_bytes
from lowbit.passes.fuse_qdq import FuseQDQPass
from lowbit.runtime import session as runtime
from lowbit.tools import models, text
from lowbit.tools.dev import bench_quality
from lowbit.tools.dev.bench_matmul import time_call

#: Variant name -> Recipe fields added to the base recipe.
VARIANTS = {
    "base": {},
    "+ fold norms": {"fold_norms": True},
    "+ reorder": {"reorder": "hessian"},
    "+ outliers 0.1 %": {"outlier_fraction": 0.001, "outlier_criterion": "sensitivity"},
    "+ outliers 0.5 %": {"outlier_fraction": 0.005, "outlier_criterion": "sensitivity"},
    "+ outliers 1 %": {"outlier_fraction": 0.01, "outlier_criterion": "sensitivity"},
    "+ layer split": {"split": True},
}
SETTINGS = [("rtn", "oc"), ("rtn", "adadim"), ("gptq", "oc"), ("gptq", "adadim")]
LATENCY_TOKENS = (128, 1)


class PassBench(bench_quality.Bench):
    """bench_quality's row cache, calibration and perplexity, over the pass variants."""

    def recipe(self, bits: int, method: str, axis: str, variant: str) -> lowbit.Recipe:
        return lowbit.Recipe(
            bits=bits,
            group_size=self.setting.group_size,
            axis=axis,
            method=method,
            selector="block",
            **VARIANTS[variant],
        )

    def optimize(self, recipe: lowbit.Recipe) -> lowbit.api.OptimizeResult:
        if recipe.fold_norms:  # statistics of the unfolded graph would describe the wrong activations
            calibration = self.calibration_feeds() if recipe.needs_calibration else None
        else:
            calibration = self.statistics() if recipe.needs_calibration else None
        return lowbit.optimize(lowbit.load(self.source), recipe, calibration=calibration)

    def quality_row(self, bits: int, method: str, axis: str, variant: str) -> dict:
        def build(path):
            result = self.optimize(self.recipe(bits, method, axis, variant))
            lowbit.save(result.model, path)
            return {
                "passes": {
                    record.name: record.details
                    for record in result.report.passes
                    if record.name in ("SplitOutliersPass", "FoldNormScalesPass", "ReorderChannelsPass")
                }
            }

        return self.run(f"W{bits} {method} {axis} | {variant}", build)

    def latency_rows(self, bits: int) -> list[tuple[str, str, int, dict[int, float]]]:
        """(variant, form, file bytes, {tokens: median seconds}) for every variant, portable and fused."""
        window = text.token_windows(models.smollm2_tokenizer(), text.evaluation_text(), max(LATENCY_TOKENS), 1)
        feeds = {tokens: {"input_ids": window[:, :tokens]} for tokens in LATENCY_TOKENS}
        rows = []
        for variant in VARIANTS:
            portable = self.setting.out / "latency.portable.onnx"
            fused = self.setting.out / "latency.fused.onnx"
            result = self.optimize(self.recipe(bits, "rtn", "oc", variant))
            lowbit.save(result.model, portable)
            model = lowbit.load(portable)
            FuseQDQPass()(model)
            lowbit.save(model, fused)
            for form, path in (("portable", portable), ("fused", fused)):
                sess = runtime.session(path, intra_op_threads=2)
                times = {t: time_call(lambda f=feed, s=sess: s.run(None, f), 3.0)[0] for t, feed in feeds.items()}
                rows.append((variant, form, model_bytes(path), times))
                print(
                    f"  {variant} {form}: " + ", ".join(f"{t} tokens {s * 1e3:.1f} ms" for t, s in times.items()),
                    flush=True,
                )
                del sess
        for path in (portable, fused):
            path.unlink()
        return rows


def quality_table(rows: dict[str, dict], bits: list[int]) -> str:
    """Rows = variants, columns = (bits, method, axis): perplexity; then the file MiB of each variant."""
    columns = [(b, m, a) for b in bits for m, a in SETTINGS]
    sized = (bits[0], *SETTINGS[0])  # the file size column: every setting of one width has about the same
    header = (
        "| variant | "
        + " | ".join(f"W{b} {m} {a}" for b, m, a in columns)
        + f" | MiB (W{sized[0]} {sized[1]} {sized[2]}) |"
    )
    lines = [f"fp32: {rows['fp32']['quality']:.2f}", "", header, "|---|" + "---:|" * (len(columns) + 1)]
    for variant in VARIANTS:
        cells = []
        for b, m, a in columns:
            row = rows.get(f"W{b} {m} {a} | {variant}")
            cells.append("-" if row is None else "crashed" if "error" in row else f"{row['quality']:.4g}")
        size = rows.get(f"W{sized[0]} {sized[1]} {sized[2]} | {variant}")
        cells.append(f"{size['bytes'] / 2**20:.1f}" if size and "bytes" in size else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(rows: list[tuple[str, str, int, dict[int, float]]]) -> str:
    """Time ratio of every variant to the base model of the same form."""
    base = {form: times for variant, form, _, times in rows if variant == "base"}
    lines = [
        "| variant | form | MiB | " + " | ".join(f"{t} tokens ms | vs base" for t in LATENCY_TOKENS) + " |",
        "|---|---|---:|" + "---:|---:|" * len(LATENCY_TOKENS),
    ]
    for variant, form, nbytes, times in rows:
        cells = " | ".join(f"{times[t] * 1e3:.1f} | {times[t] / base[form][t]:.2f}x" for t in LATENCY_TOKENS)
        lines.append(f"| {variant} | {form} | {nbytes / 2**20:.1f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.tools.dev.bench_passes", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=[f"{m}-{a}" for m, a in SETTINGS],
        help="method-axis pairs to run (default: all four)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--fp32", type=pathlib.Path, help="an existing SmolLM2 fp32 export (else exported)")
    parser.add_argument("--latency", action="store_true", help="measure the forward-time cost instead")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-passes"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fp32 is not None and not (args.out / "smollm2.fp32.onnx").exists():
        shutil.copyfile(args.fp32, args.out / "smollm2.fp32.onnx")
    setting = bench_quality.Setting(
        "smollm2", tuple(args.bits), args.group_size, args.calibration_windows, 256, args.eval_windows, 512, args.out
    )
    bench = PassBench(setting)
    if args.latency:
        table = latency_table(bench.latency_rows(args.bits[0]))
        (args.out / "latency.md").write_text(table + "\n")
        print(table)
        return 0
    bench.run("fp32")
    settings = [tuple(pair.split("-")) for pair in args.settings]
    for bits in args.bits:
        for method, axis in settings:
            for variant in args.variants:
                bench.quality_row(bits, method, axis, variant)
    table = quality_table(bench.rows, args.bits)
    (args.out / "passes.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
