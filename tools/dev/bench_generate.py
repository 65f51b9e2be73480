"""Generation benchmark of onnxruntime-genai folders (issue 18): the genai builder's own folders against
lowbit's, on one model.

    python -m lowbit.tools.dev.bench_generate --model smollm2 --workdir bench-generate

Rows: builder fp32 (lowbit's ``export --genai``), builder int4 default (RTN, head and tied embedding int4,
int8 activations), builder int4 with the head and embedding kept fp32 (``nodes_to_exclude``), and lowbit's
recipes (W4 and W3 GPTQ AdaDim; head and embedding quantized or not, at the body's width or, for W3, at 4
bits (``head_bits``); portable and fused, the fused folder
made from the portable one by the lossless fusion passes; and the same fused with ``int8_activations``).
Columns: MB of the decoder files (model + external data, 1e6 bytes), perplexity
through the KV graph with an empty past (``lowbit eval FOLDER``), prompt ms and decode tokens/s of og
(greedy, batch 1, exactly ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt), peak RSS of the
process that measured the row. Each row is measured in its own subprocess and printed as it comes;
folders already in the workdir are reused (a lowbit folder only if its recipe file matches). The table
(``results.md``, ``results.json``) and a plot of perplexity against MB (``perplexity_vs_mb.svg``) are
rewritten in the workdir after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

#: The builder's node names of the LM head and the embedding (its ``nodes_to_exclude`` option).
BUILDER_HEAD_AND_EMBEDDING = "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"
#: The lowbit recipes' shared settings (the widths and the head/embedding switch vary per row).
LOWBIT_BASE = {"group_size": 128, "axis": "adadim", "method": "gptq", "choice_method": "rtn"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: ``kind`` is ``builder`` (``precision``, ``options``), ``lowbit`` (``recipe``
    keyword arguments) or ``fused`` (the fused form of the row ``source``, with the fusion options ``recipe``)."""

    name: str
    folder: str
    kind: str
    precision: str = "fp32"
    options: tuple[str, ...] = ()
    recipe: tuple[tuple[str, object], ...] = ()
    source: str | None = None


def default_rows(bits: Sequence[int] = (4, 3), head_bits: Sequence[int] = (4,)) -> list[Row]:
    """The rows for lowbit widths ``bits``; a body narrower than 4 bits also gets rows with its head and table
    at each width of ``head_bits`` wider than the body."""
    rows = [
        Row("builder fp32", "builder-fp32", "builder"),
        Row("builder int4 default", "builder-int4", "builder", "int4"),
        Row(
            "builder int4, fp32 head/embedding",
            "builder-int4-fp32-head",
            "builder",
            "int4",
            (BUILDER_HEAD_AND_EMBEDDING,),
        ),
    ]
    for width in bits:
        wider = [table for table in head_bits if table > width] if width < 4 else []
        for table_bits in (width, *wider, None):  # None: head and embedding in float
            head = table_bits is not None
            what = f"lowbit W{width} g128 GPTQ AdaDim" + (", head+embedding" if head else "")
            slug = f"lowbit-w{width}" + ("-head-emb" if head else "")
            recipe = {"bits": width, **LOWBIT_BASE, "include_lm_head": head, "include_embeddings": head}
            if head and table_bits != width:
                what, slug = f"{what} {table_bits}-bit", f"{slug}{table_bits}"
                recipe = {**recipe, "head_bits": table_bits}
            rows.append(Row(f"{what}, portable", f"{slug}-portable", "lowbit", recipe=tuple(recipe.items())))
            rows.append(Row(f"{what}, fused", f"{slug}-fused", "fused", source=f"{slug}-portable"))
    head = f"lowbit-w{bits[0]}-head-emb"
    rows.append(
        Row(
            f"lowbit W{bits[0]} g128 GPTQ AdaDim, head+embedding, fused, int8 activations",
            f"{head}-fused-int8",
            "fused",
            recipe=(("int8_activations", True),),
            source=f"{head}-portable",
        )
    )
    return rows


# ---------------------------------------------------------------------------------------------------------
# Making the folders


def _recipe_record(row: Row, args) -> dict:
    import lowbit

    recipe = lowbit.Recipe(**dict(row.recipe), clip_search=args.clip_search)
    return {
        "recipe": dataclasses.asdict(recipe),
        "calibration_windows": args.calibration_windows,
        "calibration_length": args.calibration_length,
        "calibration_text": args.calibration_text,
    }


def _with_recipe_defaults(record: dict) -> dict:
    """``record`` with the Recipe fields added since it was written set to their defaults (the same recipe:
    a new option's default leaves what optimize does unchanged)."""
    import lowbit

    defaults = dataclasses.asdict(lowbit.Recipe())
    if "recipe" in record:
        record = {**record, "recipe": {**defaults, **record["recipe"]}}
    if "fused_from" in record:
        record = {**record, "fused_from": _with_recipe_defaults(record["fused_from"])}
    return record


def _hf_folder(args, workdir: pathlib.Path) -> pathlib.Path:
    from lowbit.tools import genai

    if args.model != "smollm2":
        return pathlib.Path(args.model)
    folder = workdir / "hf"
    if not (folder / "config.json").is_file():
        genai.write_smollm2_hf_folder(folder)
    return folder


def make_folder(row: Row, rows: dict[str, Row], args, workdir: pathlib.Path) -> pathlib.Path:
    """The row's folder in ``workdir``, made unless there (a lowbit one also remade when its recipe changed)."""
    from lowbit.tools import genai

    out = workdir / row.folder
    record_path = workdir / f"{row.folder}.recipe.json"
    if row.kind == "fused":
        source = make_folder(rows_by_folder(rows)[row.source], rows, args, workdir)
        record = {
            "fused_from": _recipe_record(rows_by_folder(rows)[row.source], args),
            **dict(row.recipe),
        }
    elif row.kind == "lowbit":
        record = _recipe_record(row, args)
    else:
        record = {"builder": row.precision, "options": list(row.options)}
    if genai.is_genai_folder(out) and record_path.is_file():
        made = json.loads(record_path.read_text())
        made.pop("seconds", None)  # how long it took to make: not part of what it is
        if _with_recipe_defaults(made) == record:
            return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    if row.kind == "builder":
        genai.build_genai(_hf_folder(args, workdir), out, precision=row.precision, extra_options=row.options)
    elif row.kind == "fused":
        genai.fuse_folder(source, out, **dict(row.recipe))
    else:
        import lowbit

        fp32 = make_folder(rows["builder fp32"], rows, args, workdir)
        genai.optimize_folder(fp32, out, lowbit.Recipe(**record["recipe"]), calibration=calibration(fp32, args))
    record["seconds"] = round(time.perf_counter() - start, 1)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return out


@functools.cache
def _statistics(folder: pathlib.Path, windows: int, length: int, text_file: str | None):
    from lowbit.runtime.calibration import collect
    from lowbit.tools import genai, text

    src = genai.read_folder(folder)
    model = genai.load_decoder(src.model_path)
    genai.tie_as_table(model)  # the tied head's input is measured too (the graph's activations are unchanged)
    corpus = text.file_text(text_file) if text_file else None
    feeds = genai.calibration_feeds(model, src.config, genai.folder_tokenizer(src.folder), length, windows, corpus)
    return collect(model, feeds, total=len(feeds))


def calibration(fp32: pathlib.Path, args):
    """The calibration statistics of the fp32 folder, collected once per run for every lowbit row (they
    all calibrate the same model on the same windows; the AdaDim selectors keep its first samples)."""
    return _statistics(fp32, args.calibration_windows, args.calibration_length, args.calibration_text)


def rows_by_folder(rows: dict[str, Row]) -> dict[str, Row]:
    return {row.folder: row for row in rows.values()}


# ---------------------------------------------------------------------------------------------------------
# Measuring a folder (in a subprocess of its own)


def measure(folder: str, windows: int, length: int, prompt_tokens: int, new_tokens: int, play: str) -> dict:
    """MB, perplexity, prompt ms, decode tokens/s and this process's peak RSS for one genai folder."""
    import onnxruntime_genai as og

    from lowbit.ir.files import model_bytes
    from lowbit.runtime.memory import peak_rss_mb
    from lowbit.tools import eval_perplexity, genai, text

    src = genai.read_folder(folder)
    tokenizer = genai.folder_tokenizer(src.folder)
    tokens = text.token_windows(tokenizer, text.evaluation_text(play), length, windows)
    value = eval_perplexity.folder_perplexity(folder, tokens)
    prompt = text.token_windows(tokenizer, text.evaluation_text(play), prompt_tokens, 1)[0]
    result = genai.generate_ids(og.Model(str(src.folder)), prompt, new_tokens, exact=True)
    if len(result.tokens) != new_tokens:
        raise RuntimeError(f"og generated {len(result.tokens)} tokens, not {new_tokens}, from {folder}")
    return {
        "mb": model_bytes(src.model_path) / 1e6,
        "perplexity": value,
        "prompt_ms": result.prompt_seconds * 1e3,
        "decode_tok_s": result.tokens_per_second,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure_in_subprocess(folder: pathlib.Path, args) -> dict:
    command = [sys.executable, "-m", "lowbit.tools.dev.bench_generate", "--measure", str(folder)]
    command += ["--windows", str(args.windows), "--length", str(args.length), "--play", args.play]
    command += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {folder} failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Output

COLUMNS = ("MB", "perplexity", "prompt ms", "decode tok/s", "peak RSS MB")


def table_line(name: str, result: dict) -> str:
    cells = (
        f"{result['mb']:.1f}",
        f"{result['perplexity']:.2f}",
        f"{result['prompt_ms']:.0f}",
        f"{result['decode_tok_s']:.1f}",
        f"{result['peak_rss_mb']:.0f}",
    )
    return f"| {name} | " + " | ".join(cells) + " |"


def table_header() -> str:
    return "| row | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS)


def svg_plot(results: dict[str, dict]) -> str:
    """Perplexity against MB, one labelled point per row (builder rows grey, lowbit's blue; hollow:
    portable), axes from the data. Plain SVG: no plotting library needed."""
    legend = [
        f"{index + 1}: {name} ({result['mb']:.1f} MB, {result['perplexity']:.2f})"
        for index, (name, result) in enumerate(results.items())
    ]
    plot_width, height, left, top, bottom = 460, 440, 60, 30, 50
    right = 20 + 6 * max(map(len, legend))  # room for the legend at about 6 px per character
    width = left + plot_width + right
    xs = [result["mb"] for result in results.values()]
    ys = [result["perplexity"] for result in results.values()]
    x_low, x_high = 0.0, max(xs) * 1.05
    y_low, y_high = min(ys) * 0.95, max(ys) * 1.05

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * (width - left - right),
            top + (y_high - y) / (y_high - y_low) * (height - top - bottom),
        )

    parts = [
        f'<text x="{left}" y="18" font-size="13">perplexity against MB (lower left is better)</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
    ]
    for i in range(5):
        x_value, y_value = x_low + (x_high - x_low) * i / 4, y_low + (y_high - y_low) * i / 4
        x, _ = at(x_value, y_low)
        _, y = at(x_low, y_value)
        parts.append(
            f'<text x="{x:.1f}" y="{height - bottom + 16}" font-size="10" text-anchor="middle">{x_value:.0f}</text>'
        )
        parts.append(f'<text x="{left - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{y_value:.1f}</text>')
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" font-size="11" text-anchor="middle">MB</text>'
    )
    for index, (name, result) in enumerate(results.items()):
        x, y = at(result["mb"], result["perplexity"])
        color = "#888888" if name.startswith("builder") else "#4878a8"
        fill = "none" if "portable" in name else color
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" stroke="{color}" stroke-width="1.5"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y - 4:.1f}" font-size="10">{index + 1}</text>')
        parts.append(
            f'<text x="{width - right + 10}" y="{top + 14 * index + 10}" font-size="10">{_escape(legend[index])}</text>'
        )
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        f"\n{body}\n</svg>\n"
    )


def _escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_outputs(workdir: pathlib.Path, results: dict[str, dict], header: str) -> None:
    lines = [header, "", table_header(), *(table_line(name, result) for name, result in results.items())]
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (workdir / "perplexity_vs_mb.svg").write_text(svg_plot(results))


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.tools.dev.bench_generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 or a local Hugging Face causal-LM folder")
    parser.add_argument("--workdir", default="bench-generate", help="folders and results (reused across runs)")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--play", default="othello", help="held-out Shakespeare play (perplexity, prompt)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length of the decode timing")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens of the decode timing")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="widths of the lowbit rows")
    parser.add_argument(
        "--head-bits", type=int, nargs="+", default=[4], help="widths of the head and table for bodies below 4 bits"
    )
    parser.add_argument("--clip-search", action="store_true", help="lowbit rows with Recipe(clip_search=True)")
    parser.add_argument("--calibration-windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--calibration-text", help="calibration text file (default: the calibration plays)")
    parser.add_argument("--rows", nargs="+", help="only these rows (folder names), in this order")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the per-row subprocess
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure:
        result = measure(args.measure, args.windows, args.length, args.prompt_tokens, args.new_tokens, args.play)
        print(json.dumps(result))
        return
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = {row.name: row for row in default_rows(args.bits, args.head_bits)}
    by_folder = rows_by_folder(rows)
    unknown = sorted(set(args.rows or ()) - set(by_folder))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {sorted(by_folder)}")
    chosen = [by_folder[name] for name in args.rows] if args.rows else list(rows.values())
    header = (
        f"{args.model}; perplexity {args.windows} x {args.length} tokens of {args.play} (KV graph, empty past); "
        f"og greedy {args.new_tokens} tokens after {args.prompt_tokens}, batch 1"
    )
    print(header, flush=True)
    print(table_header(), flush=True)
    results = {}
    for row in chosen:
        folder = make_folder(row, rows, args, workdir)
        results[row.name] = measure_in_subprocess(folder, args)
        print(table_line(row.name, results[row.name]), flush=True)
        write_outputs(workdir, results, header)
    if any(math.isnan(result["decode_tok_s"]) for result in results.values()):
        print("note: a row generated too few tokens to time its decoding", file=sys.stderr)


if __name__ == "__main__":
    main()
