"""Size-budget frontier: quality against megabytes for uniform widths and for ``Recipe(budget=...)`` allocations.

    python -m lowbit.tools.dev.bench_budget --model smollm2 --out bench-budget --budgets 2.5 3 3.5 4 --uniform 2 3 4
    python -m lowbit.tools.dev.bench_budget --model minilm --out bench-budget-minilm --budgets 3 --uniform 3 4
    python -m lowbit.tools.dev.bench_budget --model smollm2 --budgets 3 3.5 --sensitivity output kl --eval-windows 4

Every weight is measured once at every width (``quantize_plan.measure_widths``: the recipe's method and axes,
each width's axis chosen by the selector, output error and stored bytes), then each row allocates widths
(``allocate.allocate``; a uniform row takes one width everywhere) and writes the chosen reconstructions into
the float model, whose quality is measured as ``bench_quality`` does. Quality equals that of the quantized
file (its QDQ or fused graph computes the same weights); MB is the file as a megabyte budget counts it: the
chosen candidates' stored bytes (``--fused``: as lowbit::QuantMatMul packs them, float16 scales unless
``--scale-dtype float32``; else the portable form) plus every tensor left in float and the graph's own bytes
(names, metadata; ``quantize_plan.other_file_bytes``, an upper bound on the written file). ``--out`` gets ``rows.json``
(resumable), ``results.md`` and ``frontier.svg``.

``--sensitivity output kl``: each budget is allocated on each error table, the output error ``trace(dW^T H dW)``
(rows ``3``) and the end-to-end error of ``passes/sensitivity.py`` (rows ``3 kl``: KL of the logits for SmolLM2,
relative squared error of the embeddings for MiniLM), measured on the first ``--sensitivity-samples``
calibration samples, each cut to ``--sensitivity-length`` tokens. Every row lists both summed errors.
``--in-context 3``: also the row ``3 kl in context``, the ``3 kl`` mix measured again with every other weight
at its chosen width (``OutputSensitivity.table(..., chosen)``) and allocated on those errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import pathlib
import pickle

import numpy as np
import onnx_ir as ir

import lowbit
from lowbit.ir import files
from lowbit.passes import axis_selectors
from lowbit.passes.fold_weights import FoldWeightsPass
from lowbit.passes.quant.allocate import allocate, parse_budget, total_cost
from lowbit.passes.quant.scheme import SCALE_DTYPES, SUPPORTED_BITS, QuantScheme
from lowbit.passes.quantize_candidates import CandidateQuantizer, choose
from lowbit.passes.quantize_plan import SkipPolicy, WidthTable, measure_widths, other_file_bytes, plan_weights
from lowbit.passes.recipe import Recipe
from lowbit.passes.sensitivity import OutputSensitivity
from lowbit.tools.dev.bench_quality import Bench, Setting


@dataclasses.dataclass
class Measured:
    """The float model, its weight plans and every plan measured at every width."""

    model: ir.Model
    plans: list[axis_selectors.WeightPlan]
    table: WidthTable
    fused: bool  # bytes counted as lowbit::QuantMatMul stores them
    sensitivity: OutputSensitivity | None = None  # kept for ``in context`` rows
    in_context: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)  # by budget row

    @property
    def weights(self) -> int:
        return sum(plan.weight.size for plan in self.plans)

    def picks(self, row: str) -> list[int]:
        """``W3`` (uniform) or a budget (``3.5``, ``180MB``; ``3.5 kl``: on the end-to-end errors; ``3.5 kl in
        context``: the ``3.5 kl`` mix measured again with every other weight at its chosen width, then
        allocated on those errors; ``3.5 kl at 2,3,4,8``: allocated among these widths only): one width index
        per plan."""
        if row.startswith("W"):
            return [self.table.widths.index(int(row[1:]))] * len(self.plans)
        row, _, subset = row.partition(" at ")
        columns = list(range(len(self.table.widths)))
        if subset:
            if row.endswith("in context"):
                raise ValueError(f"{row!r}: rows in context are measured among every width")
            columns = [self.table.widths.index(int(bits)) for bits in subset.split(",")]
        budget, _, measure = row.partition(" ")
        limit = parse_budget(budget).limit(self.weights, self.other_bytes)
        if measure == "kl in context":
            first = f"{budget} kl"
            if first not in self.in_context:
                candidates = [self.table.candidates(position) for position in range(len(self.plans))]
                self.in_context[first] = self.sensitivity.table(candidates, self.picks(first))
            errors = self.in_context[first]
        else:
            errors = self.table.sensitivities if measure == "kl" else self.table.errors
        costs = [[line[c] for c in columns] for line in self.table.costs]
        picks = allocate(costs, [[line[c] for c in columns] for line in errors], limit)
        return [columns[pick] for pick in picks]

    @functools.cached_property
    def other_bytes(self) -> int:
        """The file's bytes besides the weights' stored arrays, as a megabyte budget counts them (the float
        model has the most tensor bytes of any row, so it decides whether a row may need a data file)."""
        may_be_external = files.tensor_bytes(self.model) > files.EXTERNAL_DATA_THRESHOLD
        return other_file_bytes(self.model, self.plans, self.fused, may_be_external)

    def write(self, picks: list[int], path: pathlib.Path) -> None:
        """The float model with every planned weight replaced by its chosen reconstruction."""
        originals = {}
        for position, (plan, pick) in enumerate(zip(self.plans, picks)):
            value = plan.first.weight
            if not value.is_initializer() or any(use.node.op_type != "MatMul" for use in plan.uses):
                raise ValueError(f"bench_budget writes MatMul initializers only; {value.name!r} is not one")
            candidate = self.table.plans[pick][position].candidates[self.table.axes[pick][position]]
            originals[value.name] = value.const_value
            value.const_value = ir.tensor(candidate.dequantize(), name=value.name)
        try:
            lowbit.save(self.model, path)
        finally:
            for plan in self.plans:
                plan.first.weight.const_value = originals[plan.first.weight.name]


def measure(bench: Bench, args) -> Measured:
    """Plans of the folded float model measured at every width."""
    model = FoldWeightsPass()(lowbit.load(bench.source)).model
    statistics = bench.statistics()
    plans = plan_weights(model.graph, SkipPolicy(), lambda uses: statistics.for_use(uses[0]).hessian).plans
    scale_dtype = Recipe(fused=args.fused, scale_dtype=args.scale_dtype).stored_scale_dtype
    scheme = QuantScheme(
        group_size=args.group_size, method=args.method, clip_search=args.clip_search, scale_dtype=scale_dtype
    )
    axes = ("oc", "ic") if args.axis == "adadim" else (args.axis,)
    selector = axis_selectors.make_selector(args.selector) if len(axes) > 1 else None

    def choose_width(bits: int, width_plans: list[axis_selectors.WeightPlan]) -> list[str]:
        quantizer = CandidateQuantizer(dataclasses.replace(scheme, bits=bits), axes)
        kwargs = {"choice_method": args.choice_method or args.method, "method": args.method, "selector": selector}
        return choose(quantizer, width_plans, model=model, samples=statistics.samples, **kwargs)[0]

    table = measure_widths(plans, tuple(args.widths), args.fused, choose_width)
    if "kl" in args.sensitivity:
        samples = [
            {name: value[:, : args.sensitivity_length] if value.ndim == 2 else value for name, value in sample.items()}
            for sample in statistics.samples[: args.sensitivity_samples]
        ]
        sensitivity = OutputSensitivity(model, plans, samples)
        if len(sensitivity.measured) != len(plans):
            raise ValueError("bench_budget: a weight the sensitivity session cannot replace")
        print(
            f"sensitivity: {sensitivity.measure} on {len(samples)} sample(s) of shapes "
            f"{[{k: v.shape for k, v in sample.items()} for sample in sensitivity.samples]}"
        )
        table.sensitivities = sensitivity.table([table.candidates(i) for i in range(len(plans))])
        kept = sensitivity if args.in_context else None  # for the in-context rows
        return Measured(model, plans, table, args.fused, kept)
    return Measured(model, plans, table, args.fused)


def statistics_cache(bench: Bench, path: pathlib.Path | None) -> None:
    """Calibration statistics from ``path`` when it exists, else collected and written there."""
    if path is None:
        return
    if path.exists():
        bench._statistics = pickle.loads(path.read_bytes())
    else:
        path.write_bytes(pickle.dumps(bench.statistics(), protocol=5))


def markdown(rows: dict[str, dict], metric: str) -> str:
    """The rows as a table; the summed end-to-end error column only where some row measured it."""
    end_to_end = any(row.get("sensitivity_error") is not None for row in rows.values())
    extra = (" summed end-to-end error |", "---:|") if end_to_end else ("", "")
    lines = [
        f"| row | MB | bits per weight | {metric} | widths ({'/'.join(map(str, SUPPORTED_BITS))}) | summed output error |"
        f"{extra[0]}",
        f"|---|---:|---:|---:|---|---:|{extra[1]}",
    ]
    for key, row in rows.items():
        if "error" in row:
            lines.append(f"| {key} | failed: {row['error']} |")
            continue
        if key == "fp32":
            lines.append(
                f"| fp32 | {row['bytes'] / 1e6:.1f} | 32 | {row['quality']:.4f} | - | - |{' - |' * end_to_end}"
            )
            continue
        widths = "/".join(str(row["widths"].get(str(bits), 0)) for bits in SUPPORTED_BITS)
        cells = f" {row['sensitivity_error']:.4g} |" if end_to_end and row.get("sensitivity_error") is not None else ""
        cells = cells or (" - |" if end_to_end else "")
        lines.append(
            f"| {key} | {row['megabytes']:.1f} | {row['bits_per_weight']:.3f} | {row['quality']:.4f} | {widths} | "
            f"{row['output_error']:.4g} |{cells}"
        )
    return "\n".join(lines)


def frontier_svg(rows: dict[str, dict], metric: str) -> str:
    """MB against quality, uniform widths and budgets as two series (log scale for perplexity), the fp32
    quality as a dashed line. Plain SVG in the viewer's colours: no plotting library needed."""
    width, height, left, right, top, bottom = 640, 400, 70, 20, 30, 50
    points = {
        key: (row["megabytes"], row["quality"]) for key, row in rows.items() if key != "fp32" and "error" not in row
    }
    fp32 = rows["fp32"]["quality"] if "fp32" in rows else None
    log = metric == "perplexity"
    ys = [y for _, y in points.values()] + ([fp32] if fp32 else [])
    transform = np.log10 if log else (lambda v: v)
    x_low, x_high = min(x for x, _ in points.values()) * 0.97, max(x for x, _ in points.values()) * 1.03
    y_low, y_high = transform(min(ys)), transform(max(ys))
    pad = (y_high - y_low) * 0.08 or 1.0
    y_low, y_high = y_low - pad, y_high + pad

    def sx(x):
        return left + (x - x_low) / (x_high - x_low) * (width - left - right)

    def sy(y):
        return top + (y_high - transform(y)) / (y_high - y_low) * (height - top - bottom)

    parts = [f'<rect width="{width}" height="{height}" fill="#fafafa"/>']
    parts.append(
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#567"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#567"/>'
    )
    for tick in np.linspace(x_low, x_high, 6):
        parts.append(
            f'<text x="{sx(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle" fill="#567">{tick:.0f}</text>'
        )
    for tick in np.linspace(y_low, y_high, 6):
        value = 10**tick if log else tick
        parts.append(f'<text x="{left - 6}" y="{sy(value) + 4:.1f}" text-anchor="end" fill="#567">{value:.4g}</text>')
    parts.append(f'<text x="{(width + left) / 2}" y="{height - 12}" text-anchor="middle" fill="#222">MB</text>')
    parts.append(
        f'<text x="16" y="{(height - bottom + top) / 2}" text-anchor="middle" fill="#222" '
        f'transform="rotate(-90 16 {(height - bottom + top) / 2})">{metric}{" (log)" if log else ""}</text>'
    )
    if fp32 is not None:
        parts.append(
            f'<line x1="{left}" y1="{sy(fp32):.1f}" x2="{width - right}" y2="{sy(fp32):.1f}" stroke="#222" '
            f'stroke-dasharray="5,4"/><text x="{width - right - 4}" y="{sy(fp32) - 5:.1f}" text-anchor="end" '
            f'fill="#222">fp32 {fp32:.4g}</text>'
        )

    def series_of(key: str) -> str:
        return "uniform" if key.startswith("W") else "budget kl" if " kl" in key else "budget"

    for series, colour in (("uniform", "#567"), ("budget", "#1559b0"), ("budget kl", "#b05915")):
        keys = sorted((k for k in points if series_of(k) == series), key=lambda k: points[k][0])
        if not keys:
            continue
        path = " ".join(f"{sx(points[k][0]):.1f},{sy(points[k][1]):.1f}" for k in keys)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for key in keys:
            x, y = sx(points[key][0]), sy(points[key][1])
            label = key if series == "uniform" else f"budget {key}"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>{label}</title></circle>')
            parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" fill="{colour}">{label}</text>')
    legend = '<text x="{0}" y="18" fill="{1}">{2}</text>'
    parts.append(
        legend.format(left + 4, "#567", "uniform widths")
        + legend.format(left + 130, "#1559b0", "budgets (output error)")
        + legend.format(left + 300, "#b05915", "budgets (end to end)")
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="system-ui, sans-serif" font-size="12">\n' + "\n".join(parts) + "\n</svg>\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.tools.dev.bench_budget", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--budgets", nargs="+", default=["2.5", "3", "3.5", "4"], help="bits per weight or MB")
    parser.add_argument("--uniform", type=int, nargs="+", default=[2, 3, 4], choices=SUPPORTED_BITS)
    parser.add_argument("--widths", type=int, nargs="+", default=list(SUPPORTED_BITS), choices=SUPPORTED_BITS)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--method", choices=("rtn", "gptq"), default="gptq")
    parser.add_argument("--axis", choices=("oc", "ic", "adadim"), default="adadim")
    parser.add_argument("--selector", choices=axis_selectors.SELECTORS, default="block")
    parser.add_argument("--choice-method", choices=("rtn", "gptq"), help="AdaDim: choose axes by this method's error")
    parser.add_argument("--clip-search", action="store_true")
    parser.add_argument("--fused", action="store_true", help="count bytes as the fused op stores them")
    parser.add_argument(
        "--scale-dtype", choices=SCALE_DTYPES, help="the scales' values (default: float16 with --fused, as Recipe's)"
    )
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-length", type=int, default=512)
    parser.add_argument(
        "--sensitivity",
        nargs="+",
        choices=("output", "kl"),
        default=["output"],
        help="the error tables to allocate budgets on: output = trace(dW^T H dW); kl = end to end (rows '3 kl')",
    )
    parser.add_argument("--sensitivity-samples", type=int, default=2, help="calibration samples for kl")
    parser.add_argument("--sensitivity-length", type=int, default=256, help="tokens of each kl sample")
    parser.add_argument("--statistics", type=pathlib.Path, help="calibration statistics cache (pickle)")
    parser.add_argument(
        "--in-context",
        nargs="+",
        default=[],
        metavar="BUDGET",
        help="with kl: also rows '3 kl in context' for these budgets: the kl mix measured again around itself "
        "(one more run per weight, width and sample) and allocated anew",
    )
    parser.add_argument(
        "--also-widths",
        type=int,
        nargs="+",
        choices=SUPPORTED_BITS,
        help="also rows '3 kl at 2,3,4,8': every budget allocated among these of the measured widths only",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-budget"))
    args = parser.parse_args(argv)
    setting = Setting.from_args(args, args.uniform)
    bench = Bench(setting)
    statistics_cache(bench, args.statistics)
    bench.run("fp32")
    measured = measure(bench, args)
    uniform = [f"W{bits}" for bits in args.uniform]
    budgets = [f"{budget} kl" if measure == "kl" else budget for budget in args.budgets for measure in args.sensitivity]
    budgets += [f"{budget} kl in context" for budget in args.in_context]
    if args.also_widths:
        budgets += [f"{budget} at {','.join(map(str, args.also_widths))}" for budget in budgets]
    order = [key for pair in itertools.zip_longest(budgets, uniform) for key in pair if key is not None]
    for key in order:  # budgets and uniform widths in turn, so that an interrupted run has both
        picks = measured.picks(key)
        stored = total_cost(measured.table.costs, picks)
        chosen = [measured.table.widths[pick] for pick in picks]

        def build(path, key=key, picks=picks, stored=stored, chosen=chosen):
            measured.write(picks, path)
            return {
                "megabytes": (stored + measured.other_bytes) / 1e6,
                "bits_per_weight": 8 * stored / measured.weights,
                "widths": {str(bits): chosen.count(bits) for bits in measured.table.widths},
                "output_error": sum(row[pick] for row, pick in zip(measured.table.errors, picks)),
                "sensitivity_error": None
                if measured.table.sensitivities is None
                else sum(row[pick] for row, pick in zip(measured.table.sensitivities, picks)),
                "budget": None if key.startswith("W") else str(parse_budget(key.partition(" ")[0])),
                "sensitivity": None if key.startswith("W") else key.partition(" ")[2] or "output",
            }

        bench.run(key, build)
    metric = "perplexity" if args.model == "smollm2" else "cosine"
    report = markdown(bench.rows, metric)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "frontier.svg").write_text(frontier_svg(bench.rows, metric))
    print(report)


if __name__ == "__main__":
    main()
