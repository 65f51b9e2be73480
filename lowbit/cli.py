"""The ``lowbit`` command line: a thin layer over the public API and the tools.

    lowbit export smollm2 -o smollm2.onnx
    lowbit optimize smollm2.onnx -o smollm2.w4.onnx --bits 4 --group-size 128 --axis ic
    lowbit eval smollm2.w4.onnx
    lowbit view smollm2.w4.onnx --compare smollm2.onnx --report report.json -o view.html
    lowbit demo

Errors print one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from lowbit.ir.scheme import GROUP_AXES, METHODS, SUPPORTED_BITS
from lowbit.passes.axis_selectors import SELECTORS
from lowbit.passes.sequential import CALIBRATION_MODES
from lowbit.passes.quant import reorder
from lowbit.passes.quant.outliers import CRITERIA

SHIPPED_MODELS = ("smollm2", "minilm")
#: Bad input or environment (a missing, unreadable or unwritable file): one line, no traceback.
USER_ERRORS = (ValueError, TypeError, OSError, NotImplementedError)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    parser.add_argument("--group-size", type=int, default=128, help="group length; -1 = one group over the axis")
    parser.add_argument("--axis", default="oc", choices=(*GROUP_AXES, "adadim"), help="oc: classic; ic: AdaDim per-IC")
    parser.add_argument("--method", default="rtn", choices=METHODS)
    parser.add_argument("--symmetric", action="store_true", help="symmetric codes (default: asymmetric)")
    parser.add_argument("--include-lm-head", action="store_true", help="also quantize the LM head")
    parser.add_argument("--include-embeddings", action="store_true", help="also quantize embedding tables")
    parser.add_argument(
        "--fused", action="store_true",
        help="write fused lowbit::QuantMatMul ops (run them with lowbit.runtime.session) instead of QDQ",
    )
    parser.add_argument(
        "--outlier-fraction", type=float, default=0.0,
        help="keep this fraction of each weight's entries exact in a sparse float32 branch (e.g. 0.005)",
    )
    parser.add_argument(
        "--outlier-criterion", default="magnitude", choices=CRITERIA,
        help="rank outliers by |w| or by H_kk * w^2 (sensitivity: needs --calibration-tokenizer)",
    )
    parser.add_argument("--split", action="store_true", help="split weights into three value clusters quantized apart")
    parser.add_argument("--fold-norms", action="store_true", help="fold norm scales into the weights that read the norm")
    parser.add_argument(
        "--reorder", choices=reorder.CRITERIA,
        help="sort input channels by this calibration statistic where the permutation folds into the producing "
        "weights (needs --calibration-tokenizer)",
    )
    parser.add_argument(
        "--clip-search", action="store_true",
        help="shrink each group's range where that lowers its (diag(H)-weighted) squared error (RTN and GPTQ)",
    )
    parser.add_argument("--selector", default="block", choices=SELECTORS, help="AdaDim axis selector (with --axis adadim)")
    parser.add_argument(
        "--choice-method", choices=METHODS,
        help="with --axis adadim: compare candidates made by this method (rtn: choose by RTN error, then run "
        "--method on the chosen axis only); default: --method",
    )
    parser.add_argument(
        "--calibration-tokenizer",
        help="calibrate on Shakespeare (the calibration plays) tokenized with this: smollm2, minilm or a "
        "Hugging Face folder; needed by --method gptq and --axis adadim",
    )
    parser.add_argument("--calibration-windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration window")
    parser.add_argument(
        "--calibration-mode", default="parallel", choices=CALIBRATION_MODES,
        help="sequential: quantize decoder layers one after another, each calibrated on the model whose earlier "
        "layers are already quantized (needs --calibration-tokenizer)",
    )


def _recipe(args: argparse.Namespace):
    from lowbit.api import Recipe

    return Recipe(
        bits=args.bits,
        group_size=args.group_size,
        axis=args.axis,
        method=args.method,
        symmetric=args.symmetric,
        selector=args.selector,
        include_lm_head=args.include_lm_head,
        include_embeddings=args.include_embeddings,
        fused=args.fused,
        outlier_fraction=args.outlier_fraction,
        outlier_criterion=args.outlier_criterion,
        split=args.split,
        fold_norms=args.fold_norms,
        reorder=args.reorder,
        calibration_mode=args.calibration_mode,
        choice_method=args.choice_method,
        clip_search=args.clip_search,
    )


def _command_optimize(args: argparse.Namespace) -> None:
    import lowbit

    source, target = pathlib.Path(args.model), pathlib.Path(args.output)
    recipe = _recipe(args)
    if args.report and pathlib.Path(args.report).resolve() in (source.resolve(), target.resolve()):
        raise ValueError(f"--report {args.report!r} would overwrite a model file")
    model = lowbit.load(source)
    calibration = None
    if args.calibration_tokenizer:
        from lowbit.tools import text

        tokenizer = _tokenizer(args.calibration_tokenizer)
        inputs = [value.name for value in model.graph.inputs]
        calibration = text.calibration_feeds(tokenizer, inputs, args.calibration_length, args.calibration_windows)
    result = lowbit.optimize(model, recipe, calibration=calibration)
    lowbit.save(result.model, target)
    print(result.report.summary())
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB; input {source.stat().st_size / 2**20:.1f} MiB)")
    if args.report:
        pathlib.Path(args.report).write_text(result.report.to_json())
        print(f"wrote {args.report}")


def _tokenizer(name: str):
    from lowbit.tools import models

    if name == "smollm2":
        return models.smollm2_tokenizer()
    if name == "minilm":
        return models.minilm_tokenizer()
    if not pathlib.Path(name).is_dir():
        raise FileNotFoundError(f"tokenizer {name!r} is neither a shipped model {SHIPPED_MODELS} nor a folder")
    return models.hf_tokenizer(name)


def _command_export(args: argparse.Namespace) -> None:
    from lowbit.tools import models

    output = pathlib.Path(args.output)
    if args.model == "smollm2":
        path = models.export_smollm2(output, overwrite=args.overwrite)
    elif args.model == "minilm":
        path = models.export_minilm(output, overwrite=args.overwrite)
    else:
        folder = pathlib.Path(args.model)
        if not folder.is_dir():
            raise FileNotFoundError(f"{args.model!r} is neither a shipped model {SHIPPED_MODELS} nor a folder")
        path = models.export_hf_causal_lm(folder, output, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _command_eval(args: argparse.Namespace) -> None:
    from lowbit.tools import eval_perplexity

    eval_perplexity.main([args.model, "--play", args.play, "--windows", str(args.windows), "--length", str(args.length)])


def _command_view(args: argparse.Namespace) -> None:
    from lowbit.tools.viewer import write_view

    path = write_view(args.model, args.output, compare=args.compare, report=args.report)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): open it in a browser, it needs no network")


def _command_demo(args: argparse.Namespace) -> None:
    from lowbit.tools import demo

    demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    optimize = commands.add_parser("optimize", help="quantize the weights of an ONNX model")
    optimize.add_argument("model", help="input .onnx")
    optimize.add_argument("-o", "--output", required=True, help="output .onnx (never the input)")
    optimize.add_argument("--report", help="write the per-pass / per-weight report as JSON here")
    _add_recipe_arguments(optimize)
    optimize.set_defaults(handler=_command_optimize)

    export = commands.add_parser("export", help="export a shipped model or a local Hugging Face causal LM")
    export.add_argument("model", help=f"one of {SHIPPED_MODELS}, or a Hugging Face model folder")
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(handler=_command_export)

    evaluate = commands.add_parser("eval", help="perplexity of an ONNX causal LM on a held-out play")
    evaluate.add_argument("model")
    evaluate.add_argument("--play", default="othello")
    evaluate.add_argument("--windows", type=int, default=40)
    evaluate.add_argument("--length", type=int, default=512)
    evaluate.set_defaults(handler=_command_eval)

    view = commands.add_parser("view", help="write a self-contained HTML view of a model: graph, overlays, diff, per-layer table")
    view.add_argument("model", help="the .onnx to show")
    view.add_argument("--compare", help="a second .onnx (e.g. the model before optimize), shown side by side with changes marked")
    view.add_argument("--report", help="the JSON report of 'lowbit optimize --report': errors and bytes per layer")
    view.add_argument("-o", "--output", required=True, help="the .html to write")
    view.set_defaults(handler=_command_view)

    demo = commands.add_parser("demo", help="export SmolLM2, quantize it, compare size/perplexity/speed with fp32")
    demo.add_argument("--workdir", default="lowbit-demo", help="where the ONNX files go (reused between runs)")
    demo.add_argument("--model", default="smollm2", choices=SHIPPED_MODELS)
    demo.add_argument("--bits", type=int, nargs="+", default=[4, 3], choices=SUPPORTED_BITS)
    demo.add_argument("--axes", nargs="+", default=["oc", "ic"], choices=GROUP_AXES)
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--gptq-bits", type=int, nargs="*", default=[3], choices=SUPPORTED_BITS,
                      help="bit widths of the AdaDim + GPTQ rows (calibrated); none: skip them")
    demo.add_argument("--calibration-windows", type=int, default=32, help="calibration windows of the GPTQ rows")
    demo.add_argument("--form", default="fused", choices=("fused", "qdq"),
                      help="fused kernels (default) or the portable QDQ form for stock ONNX Runtime")
    demo.add_argument("--windows", type=int, default=10, help="evaluation windows (perplexity)")
    demo.add_argument("--length", type=int, default=512, help="tokens per evaluation window")
    demo.set_defaults(handler=_command_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line
        print(f"lowbit: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
