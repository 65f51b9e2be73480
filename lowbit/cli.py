"""The ``lowbit`` command line: a thin layer over the public API and the tools.

    lowbit export smollm2 -o smollm2.onnx
    lowbit optimize smollm2.onnx -o smollm2.w4.onnx --bits 4 --group-size 128 --axis ic
    lowbit eval smollm2.w4.onnx
    lowbit demo

Errors print one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from lowbit.ir.scheme import GROUP_AXES, METHODS, SUPPORTED_BITS

SHIPPED_MODELS = ("smollm2", "minilm")
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError, PermissionError)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    parser.add_argument("--group-size", type=int, default=128, help="group length; -1 = one group over the axis")
    parser.add_argument("--axis", default="oc", choices=(*GROUP_AXES, "adadim"), help="oc: classic; ic: AdaDim per-IC")
    parser.add_argument("--method", default="rtn", choices=METHODS)
    parser.add_argument("--symmetric", action="store_true", help="symmetric codes (default: asymmetric)")
    parser.add_argument("--include-lm-head", action="store_true", help="also quantize the LM head")
    parser.add_argument("--include-embeddings", action="store_true", help="also quantize embedding tables")


def _recipe(args: argparse.Namespace):
    from lowbit.api import Recipe

    return Recipe(
        bits=args.bits,
        group_size=args.group_size,
        axis=args.axis,
        method=args.method,
        symmetric=args.symmetric,
        include_lm_head=args.include_lm_head,
        include_embeddings=args.include_embeddings,
    )


def _command_optimize(args: argparse.Namespace) -> None:
    import lowbit

    source, target = pathlib.Path(args.model), pathlib.Path(args.output)
    recipe = _recipe(args)
    if args.report and pathlib.Path(args.report).resolve() in (source.resolve(), target.resolve()):
        raise ValueError(f"--report {args.report!r} would overwrite a model file")
    model = lowbit.load(source)
    result = lowbit.optimize(model, recipe)
    lowbit.save(result.model, target)
    print(result.report.summary())
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB; input {source.stat().st_size / 2**20:.1f} MiB)")
    if args.report:
        pathlib.Path(args.report).write_text(result.report.to_json())
        print(f"wrote {args.report}")


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

    demo = commands.add_parser("demo", help="export SmolLM2, quantize it, compare size/perplexity/speed with fp32")
    demo.add_argument("--workdir", default="lowbit-demo", help="where the ONNX files go (reused between runs)")
    demo.add_argument("--model", default="smollm2", choices=SHIPPED_MODELS)
    demo.add_argument("--bits", type=int, nargs="+", default=[4, 3], choices=SUPPORTED_BITS)
    demo.add_argument("--axes", nargs="+", default=["oc", "ic"], choices=GROUP_AXES)
    demo.add_argument("--group-size", type=int, default=128)
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
        print(f"lowbit: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
