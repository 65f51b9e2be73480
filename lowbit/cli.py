"""The ``lowbit`` command line: a thin layer over the public API and the tools.

    lowbit export smollm2 -o smollm2.onnx
    lowbit optimize smollm2.onnx -o smollm2.w4.onnx --bits 4 --group-size 128 --axis ic
    lowbit eval smollm2.w4.onnx
    lowbit view smollm2.w4.onnx --compare smollm2.onnx --report report.json -o view.html
    lowbit demo
    lowbit export smollm2 --genai -o smollm2-genai && lowbit generate smollm2-genai --prompt "Hello"

Errors print one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

# Only light modules at the top: --help must not wait for torch, ONNX or ONNX Runtime.
from lowbit.passes.quant.scheme import GROUP_AXES, SUPPORTED_BITS
from lowbit.passes.recipe import Recipe

SHIPPED_MODELS = ("smollm2", "minilm")
#: Bad input or environment (a missing, unreadable or unwritable file, a missing optional package): one
#: line, no traceback.
USER_ERRORS = (ValueError, TypeError, OSError, NotImplementedError, ImportError)
CALIBRATION_FLAGS = "--calibration-tokenizer smollm2|minilm|HF_FOLDER [--calibration-text FILE]"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except for on/off switches (off unless given)."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreTrueAction) or action.default in (None, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Recipe`` field, from its metadata (help, choices, type, default)."""
    recipe = parser.add_argument_group("recipe (lowbit.Recipe fields)")
    for field in dataclasses.fields(Recipe):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"].replace("%", "%%")  # argparse expands % in help
        if field.metadata["kind"] is bool:
            recipe.add_argument(flag, action="store_true", help=help_text)
        else:
            recipe.add_argument(
                flag,
                type=field.metadata["kind"],
                default=field.default,
                choices=field.metadata["choices"],
                help=help_text,
            )
    calibration = parser.add_argument_group("calibration (for gptq, adadim, sensitivity outliers, reorder, sequential)")
    calibration.add_argument(
        "--calibration-tokenizer",
        help="tokenize the calibration text with this: smollm2, minilm or a Hugging Face folder",
    )
    calibration.add_argument(
        "--calibration-text",
        help='calibrate on this file (plain UTF-8 text, or JSONL lines with a "text" field) instead of the '
        "built-in Shakespeare calibration plays",
    )
    calibration.add_argument("--calibration-windows", type=int, default=32, help="number of calibration windows")
    calibration.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration window")


def _recipe(args: argparse.Namespace) -> Recipe:
    return Recipe(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Recipe)})


def _flag(reason: str) -> str:
    """``method='gptq'`` -> ``--method gptq``: a recipe option as the command line spells it."""
    name, _, value = reason.partition("=")
    return f"--{name.replace('_', '-')} {value.strip(chr(39))}"


def _command_optimize(args: argparse.Namespace) -> None:
    source, target = pathlib.Path(args.model), pathlib.Path(args.output)
    recipe = _recipe(args)
    if source.is_dir():  # an onnxruntime-genai folder in, one out
        from lowbit.tools import genai

        return genai.command_optimize(args, recipe)
    if recipe.needs_calibration and not args.calibration_tokenizer:
        needs = ", ".join(_flag(reason) for reason in recipe.calibration_reasons)
        raise ValueError(f"{needs} needs calibration data: add {CALIBRATION_FLAGS}")
    if args.calibration_text and not args.calibration_tokenizer:
        raise ValueError("--calibration-text needs --calibration-tokenizer to turn the text into tokens")
    from lowbit.ir import files

    files.check_writable_file(target, "output", suffix=".onnx")  # every output path checked before any work
    if args.report:
        files.check_writable_file(args.report, "--report")
        if pathlib.Path(args.report).resolve() == target.resolve():
            raise ValueError(f"--report {args.report!r} is the output model's path")
    import lowbit

    model = lowbit.load(source)
    inputs = files.files_read(model)
    files.refuse_input_files([target, target.with_name(target.name + ".data")], inputs, "output model")
    if args.report:
        files.refuse_input_files([args.report], inputs, "--report JSON")
    calibration = None
    if args.calibration_tokenizer:
        from lowbit.tools import text

        corpus = text.file_text(args.calibration_text) if args.calibration_text else None
        inputs = [value.name for value in model.graph.inputs]
        calibration = text.named_calibration_feeds(
            args.calibration_tokenizer, inputs, args.calibration_length, args.calibration_windows, corpus
        )
    result = lowbit.optimize(model, recipe, calibration=calibration)
    lowbit.save(result.model, target)
    print(result.report.summary())
    for notice in result.report.notices(recipe.fused):
        print(notice, file=sys.stderr)
    form = result.report.form(recipe.fused, "run with lowbit.runtime.session", "stock ONNX Runtime")
    print(f"wrote {target} ({_model_mib(target):.1f} MiB, {form}; input {_model_mib(source):.1f} MiB)")
    if args.report:
        pathlib.Path(args.report).write_text(result.report.to_json())
        print(f"wrote {args.report}")


def _model_mib(path: pathlib.Path) -> float:
    """The size of a model with the external data files next to it that it names."""
    from lowbit.ir import files

    return files.model_bytes(path) / 2**20


def _command_export(args: argparse.Namespace) -> None:
    from lowbit.tools import models

    output = pathlib.Path(args.output)
    if args.genai:
        if args.model == "minilm":
            raise ValueError(
                "--genai makes generation folders of causal LMs: smollm2 or a Hugging Face causal-LM folder"
            )
        from lowbit.tools import genai

        path = genai.export_genai(args.model, output, overwrite=args.overwrite)
        print(f"wrote {path}/ ({genai.folder_mib(path):.1f} MiB, onnxruntime-genai folder, fp32)")
        return
    if args.model == "smollm2":
        path = models.export_smollm2(output, overwrite=args.overwrite, cache=True)
    elif args.model == "minilm":
        path = models.export_minilm(output, overwrite=args.overwrite, cache=True)
    else:
        folder = pathlib.Path(args.model)
        if not folder.is_dir():
            raise FileNotFoundError(f"{args.model!r} is neither a shipped model {SHIPPED_MODELS} nor a folder")
        path = models.export_hf_causal_lm(folder, output, overwrite=args.overwrite)
    print(f"wrote {path} ({_model_mib(path):.1f} MiB)")


def _command_eval(args: argparse.Namespace) -> None:
    from lowbit.tools import eval_perplexity

    argv = [args.model, "--play", args.play, "--windows", str(args.windows), "--length", str(args.length)]
    eval_perplexity.main(argv + (["--reference", args.reference] if args.reference else []))


def _command_generate(args: argparse.Namespace) -> None:
    from lowbit.tools import genai

    genai.command_generate(args)


def _command_view(args: argparse.Namespace) -> None:
    import onnx_ir as ir

    from lowbit.ir import files
    from lowbit.tools.viewer import write_view

    files.check_writable_file(args.output, "-o")
    inputs = {str(pathlib.Path(path).resolve()) for path in (args.model, args.compare, args.report) if path}
    for path in (args.model, args.compare):
        if path and pathlib.Path(path).is_file():
            inputs |= files.files_read(ir.load(path))
    files.refuse_input_files([args.output], inputs, "HTML view")
    path = write_view(args.model, args.output, compare=args.compare, report=args.report)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): open it in a browser, it needs no network")


def _command_demo(args: argparse.Namespace) -> None:
    from lowbit.tools import demo

    demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    optimize = commands.add_parser(
        "optimize", formatter_class=_HelpFormatter, help="quantize the weights of an ONNX model"
    )
    optimize.add_argument("model", help="input .onnx, or an onnxruntime-genai folder (genai_config.json)")
    optimize.add_argument(
        "-o", "--output", required=True, help="output .onnx, or folder for a genai folder (never the input)"
    )
    optimize.add_argument("--report", help="write the per-pass / per-weight report as JSON here")
    _add_recipe_arguments(optimize)
    optimize.set_defaults(handler=_command_optimize)

    export = commands.add_parser(
        "export", formatter_class=_HelpFormatter, help="export a shipped model or a local Hugging Face causal LM"
    )
    export.add_argument("model", help=f"one of {SHIPPED_MODELS}, or a Hugging Face model folder")
    export.add_argument("-o", "--output", required=True, help="the .onnx to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    export.add_argument(
        "--genai",
        action="store_true",
        help="write an onnxruntime-genai folder (KV cache; the genai model builder, fp32) at -o",
    )
    export.set_defaults(handler=_command_export)

    generate = commands.add_parser(
        "generate", formatter_class=_HelpFormatter, help="stream text from an onnxruntime-genai folder"
    )
    generate.add_argument("model", help="an onnxruntime-genai folder (lowbit export --genai, lowbit optimize)")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    generate.add_argument(
        "--greedy", action="store_true", help="greedy decoding (the default without sampling options)"
    )
    generate.add_argument("--temperature", type=float, help="sample at this temperature")
    generate.add_argument("--top-p", type=float, help="sample from the smallest token set of this probability")
    generate.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    generate.set_defaults(handler=_command_generate)

    evaluate = commands.add_parser(
        "eval",
        formatter_class=_HelpFormatter,
        help="perplexity of an ONNX causal LM or a genai folder on a held-out play",
    )
    evaluate.add_argument(
        "model", help="ONNX causal LM (input_ids -> logits), or an onnxruntime-genai folder (run with an empty past)"
    )
    evaluate.add_argument(
        "--reference", help="also measure this model or folder (e.g. the fp32 export) and print the change"
    )
    evaluate.add_argument("--play", default="othello", help="held-out Shakespeare play")
    evaluate.add_argument("--windows", type=int, default=40, help="number of windows")
    evaluate.add_argument("--length", type=int, default=512, help="tokens per window")
    evaluate.set_defaults(handler=_command_eval)

    view = commands.add_parser(
        "view",
        formatter_class=_HelpFormatter,
        help="write a self-contained HTML view of a model: graph, overlays, diff, per-layer table",
    )
    view.add_argument("model", help="the .onnx to show")
    view.add_argument(
        "--compare", help="a second .onnx (e.g. the model before optimize), shown side by side with changes marked"
    )
    view.add_argument("--report", help="the JSON report of 'lowbit optimize --report': errors and bytes per layer")
    view.add_argument("-o", "--output", required=True, help="the .html to write")
    view.set_defaults(handler=_command_view)

    demo = commands.add_parser(
        "demo",
        formatter_class=_HelpFormatter,
        help="export SmolLM2, quantize it, compare size/perplexity/speed with fp32",
    )
    demo.add_argument("--workdir", default="lowbit-demo", help="where the ONNX files go (reused between runs)")
    demo.add_argument("--model", default="smollm2", choices=SHIPPED_MODELS, help="the shipped model to run")
    demo.add_argument(
        "--bits", type=int, nargs="+", default=[4, 3], choices=SUPPORTED_BITS, help="bit widths of the RTN rows"
    )
    demo.add_argument(
        "--axes", nargs="+", default=["oc"], choices=GROUP_AXES, help="group axes of the RTN rows (ic: AdaDim's per-IC)"
    )
    demo.add_argument("--group-size", type=int, default=128, help="group length of every row")
    demo.add_argument(
        "--gptq-bits",
        type=int,
        nargs="*",
        default=[3],
        choices=SUPPORTED_BITS,
        help="bit widths of the AdaDim + GPTQ rows (calibrated); none: skip them",
    )
    demo.add_argument(
        "--choice-method",
        choices=("rtn", "gptq"),
        default="rtn",
        help="how the GPTQ rows' AdaDim chooses each axis (rtn: by RTN error, then GPTQ on that axis only)",
    )
    demo.add_argument(
        "--whole-file",
        action="store_true",
        help="also a row with the embedding table and LM head quantized (the whole file's compression)",
    )
    demo.add_argument(
        "--outliers",
        action="store_true",
        help="also a row per --gptq-bits with 0.5%% sensitivity-ranked outliers kept exact",
    )
    demo.add_argument("--calibration-windows", type=int, default=16, help="calibration windows of the GPTQ rows")
    demo.add_argument(
        "--form",
        default="fused",
        choices=("fused", "qdq"),
        help="fused kernels (default) or the portable QDQ form for stock ONNX Runtime",
    )
    demo.add_argument("--windows", type=int, default=4, help="evaluation windows (perplexity; lowbit eval uses 40)")
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
