"""onnxruntime-genai folders: make them (the genai model builder, run as a library), quantize them, run them.

A genai folder holds ``genai_config.json``, the decoder graph (``model.onnx`` + external data) with the
inputs ``input_ids``, ``attention_mask``, ``past_key_values.N.key/value`` ([batch, kv_heads, past,
head_dim]) and the outputs ``logits``, ``present.N.key/value``, and the tokenizer files; ``og.Model(folder)``
runs it with a KV cache.

* ``export_genai("smollm2" | HF_FOLDER, OUT)``: the fp32 folder made by
  ``onnxruntime_genai.models.builder`` (``-e cpu -p fp32``). SmolLM2 ships as a GGUF file: it is first
  written as a Hugging Face folder (in a temporary folder, removed afterwards).
* ``optimize_folder(IN, OUT, recipe, ...)``: ``lowbit.optimize`` on the folder's decoder graph, written as a
  new folder with its ``genai_config.json`` kept consistent with the graph (file name; for the fused form
  lowbit's op library registered through the decoder's session options, ``custom_ops_library``) and copies
  of the other files (tokenizer, chat template). Calibration feeds the KV inputs as empty tensors (past
  length 0) and an all-ones attention mask. With ``include_lm_head`` and ``include_embeddings`` the builder's
  tied table stays one table (``tie_as_table``): GPTQ'd for the head and the rows together, one copy in the
  file (the fused form's ``lowbit::QuantGather`` reads the head's packed codes). With one of them only, the
  table is untied first (``untie_embeddings``): the quantized one gets its own copy, the other stays float.
* ``fuse_folder(PORTABLE, OUT)``: the fused form of a portable lowbit folder (the lossless fusion passes), so
  one quantization gives both forms.
* ``generate(FOLDER, prompt)``: stream tokens through og, with tokens/s (``generate_ids``: the timed loop).

Workarounds (onnxruntime-genai 0.18):
* transformers 5.x refuses ``save_pretrained`` of a model loaded from GGUF ("quantized with gguf and is
  not serializable") although its weights are dense fp32 after loading: the GGUF quantizer is detached
  from the model (and its config) before saving.
* The builder's ``--help`` crashes and its ``int4_*`` option aliases are ignored; we call
  ``parse_extra_options`` + ``create_model`` with no extra options, and redirect its chatter to stderr.
* The builder declares the KV inputs' last dimension symbolic (``kv_cache_dim``): the empty past's head
  size comes from ``genai_config.json`` (``head_size``) where the graph leaves it open.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

CONFIG_NAME = "genai_config.json"
#: The genai config's default names of the KV inputs (``%d``: the layer).
PAST_KEY_NAMES, PAST_VALUE_NAMES = "past_key_values.%d.key", "past_key_values.%d.value"
_OG_HINT = "pip install 'onnxruntime-genai>=0.18,<0.19'"
#: Model components other than the decoder that a genai config may name (multimodal pipelines).
_OTHER_COMPONENTS = ("vision", "speech", "embedding", "encoder")


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError as error:
        raise ModuleNotFoundError(f"onnxruntime-genai is not installed; install it with: {_OG_HINT}") from error
    return og


# --------------------------------------------------------------------------------------------------
# Reading a folder


def is_genai_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``genai_config.json``."""
    path = pathlib.Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


@dataclasses.dataclass
class GenaiFolder:
    """A checked genai folder: its config and the decoder graph's path."""

    folder: pathlib.Path
    config: dict

    @property
    def decoder(self) -> dict:
        return self.config["model"]["decoder"]

    @property
    def model_path(self) -> pathlib.Path:
        return self.folder / self.decoder["filename"]


def read_folder(folder: str | os.PathLike) -> GenaiFolder:
    """Check that ``folder`` is a decoder-only genai folder whose config names files that exist."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {str(folder)!r}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not an onnxruntime-genai folder: it has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not JSON: {error}") from error
    section = config.get("model") if isinstance(config, dict) else None
    decoder = section.get("decoder") if isinstance(section, dict) else None
    if not isinstance(decoder, dict) or not isinstance(
        decoder.get("filename"), str
    ):  # a bad file's content: ValueError
        raise ValueError(f"{str(path)!r} names no decoder model (model.decoder.filename)")
    others = [name for name in _OTHER_COMPONENTS if isinstance(config["model"].get(name), dict)]
    if others:
        raise NotImplementedError(
            f"{str(path)!r} describes a pipeline with {others} besides the decoder; lowbit takes decoder-only folders"
        )
    model = folder / decoder["filename"]
    if not model.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} names the decoder file {decoder['filename']!r}, which is missing from {str(folder)!r}"
        )
    library = decoder.get("session_options", {}).get("custom_ops_library")
    if library and not (folder / library).is_file():
        raise FileNotFoundError(f"{str(path)!r} names the custom op library {library!r}, which is missing")
    return GenaiFolder(folder, config)


# --------------------------------------------------------------------------------------------------
# Calibration feeds


def _past_patterns(config: Mapping | None) -> list[re.Pattern]:
    inputs = (config or {}).get("model", {}).get("decoder", {}).get("inputs", {})
    patterns = [inputs.get("past_key_names", PAST_KEY_NAMES), inputs.get("past_value_names", PAST_VALUE_NAMES)]
    return [re.compile(re.escape(pattern).replace("%d", r"\d+") + "$") for pattern in patterns]


def empty_past(model, config: Mapping | None = None) -> dict[str, np.ndarray]:
    """Empty KV-cache feeds (past length 0, batch 1) for every ``past_key_values`` input of ``model``.

    Shapes come from the graph's input types ([batch, kv_heads, past, head_dim]); a dimension the graph
    leaves symbolic (the builder's ``kv_cache_dim``) comes from ``config`` (the genai config:
    ``num_key_value_heads``, ``head_size``)."""
    import onnx_ir as ir

    decoder = (config or {}).get("model", {}).get("decoder", {})
    from_config = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    patterns = _past_patterns(config)
    feeds = {}
    for value in model.graph.inputs:
        if not any(pattern.match(value.name) for pattern in patterns):
            continue
        shape = value.shape
        if shape is None or len(shape) != 4 or value.dtype is None:
            raise ValueError(
                f"KV input {value.name!r} has shape {shape} and type {value.dtype}; expected a rank-4 tensor"
            )
        dims = []
        for axis, dim in enumerate(shape):
            if axis == 0:
                dims.append(1)  # batch
            elif axis == 2:
                dims.append(0)  # past length
            elif isinstance(dim, int):
                dims.append(dim)
            elif isinstance(from_config[axis], int):
                dims.append(from_config[axis])
            else:
                what = "num_key_value_heads" if axis == 1 else "head_size"
                raise ValueError(
                    f"KV input {value.name!r}: dimension {axis} is {dim} in the graph and the genai config gives no {what}"
                )
        feeds[value.name] = np.zeros(dims, dtype=ir.DataType(value.dtype).numpy())
    return feeds


def calibration_feeds(model, config: Mapping | None, tokenizer, length: int, count: int, text: str | None = None):
    """Text calibration feeds for a genai decoder graph: ``input_ids``, an all-ones ``attention_mask`` and
    empty past KV tensors."""
    from lowbit.tools import text as text_module

    names = [value.name for value in model.graph.inputs if not value.is_initializer()]
    return text_module.calibration_feeds(tokenizer, names, length, count, text, past=empty_past(model, config))


# --------------------------------------------------------------------------------------------------
# Making a folder: the builder


def _check_new_folder(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"output {str(out)!r} is a file, not a folder")
        if any(out.iterdir()) and not (overwrite and is_genai_folder(out)):
            hint = "; pass overwrite to replace a genai folder" if is_genai_folder(out) else ""
            raise FileExistsError(f"output folder {str(out)!r} exists and is not empty{hint}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder's parent {str(out.parent)!r} does not exist")


def _install(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Move a finished ``staging`` folder to ``out``, replacing what was there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _staging(out: pathlib.Path):
    """A private folder beside ``out``, removed unless it was installed."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.lowbit-", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_genai(
    hf_folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    precision: str = "fp32",
    overwrite: bool = False,
    extra_options: Sequence[str] = (),
) -> pathlib.Path:
    """Run the onnxruntime-genai model builder (``-e cpu -p precision``) on a local Hugging Face folder;
    ``extra_options``: the builder's ``key=value`` options (e.g. ``nodes_to_exclude=/lm_head/MatMul``)."""
    og_builder = _builder()
    hf_folder, out = pathlib.Path(hf_folder), pathlib.Path(out)
    if not (hf_folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(hf_folder)!r} is not a Hugging Face model folder (no config.json)")
    _check_new_folder(out, overwrite)
    with _staging(out) as staging, tempfile.TemporaryDirectory(prefix="lowbit-builder-cache-") as cache:
        target = staging / "folder"
        print(
            f"[lowbit] onnxruntime-genai builder: {hf_folder} -> {out} ({precision}, cpu) ...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the builder prints progress on stdout
            options = og_builder.parse_extra_options(
                "", str(hf_folder), str(target), precision, "cpu", cache, list(extra_options)
            )
            og_builder.create_model("", str(hf_folder), str(target), precision, "cpu", cache, **options)
        print(f"[lowbit] builder: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        read_folder(target)
        _install(target, out)
    return out


def _builder():
    _og()
    from onnxruntime_genai.models import builder

    return builder


def write_smollm2_hf_folder(folder: str | os.PathLike) -> pathlib.Path:
    """SmolLM2-135M-Instruct (from its GGUF file, de-quantized to fp32) written as a Hugging Face folder."""
    from lowbit.tools import models

    folder = pathlib.Path(folder)
    model, tokenizer = models.load_smollm2()
    # Workaround (transformers 5.x): a GGUF-loaded model carries a GGUF quantizer that refuses to save,
    # although the loaded weights are dense fp32. Detach it, so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def export_genai(model: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """The fp32 genai folder of ``"smollm2"`` or of a local Hugging Face causal-LM folder."""
    out = pathlib.Path(out)
    _check_new_folder(out, overwrite)
    if str(model) == "smollm2":
        with tempfile.TemporaryDirectory(prefix="lowbit-smollm2-hf-") as hf_folder:
            write_smollm2_hf_folder(hf_folder)
            return build_genai(hf_folder, out, overwrite=overwrite)
    if not pathlib.Path(model).is_dir():
        raise FileNotFoundError(f"{str(model)!r} is neither 'smollm2' nor a folder")
    return build_genai(model, out, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# Quantizing a folder


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(source: str | os.PathLike, out: str | os.PathLike) -> tuple[GenaiFolder, pathlib.Path]:
    """The checked input folder and the output folder, refused before any work when they overlap or the output
    holds something other than a genai folder."""
    src = read_folder(source)
    out = pathlib.Path(out)
    a, b = src.folder.resolve(), out.resolve()
    if _inside(a, b) or _inside(b, a):
        raise ValueError(
            f"output folder {str(out)!r} is, contains or lies inside the input folder {str(source)!r}; choose another"
        )
    _check_new_folder(out, overwrite=True)
    return src, out


def optimize_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    recipe,
    *,
    calibration=None,
    tokenizer=None,
    calibration_text: str | None = None,
    calibration_length: int = 256,
    calibration_windows: int = 32,
):
    """Quantize the decoder of the genai folder ``source`` with ``recipe`` into the new genai folder ``out``.

    ``calibration``: feed dicts (or statistics) for ``lowbit.optimize``; else, when the recipe needs them,
    text windows tokenized by ``tokenizer`` (default: the folder's own tokenizer). Returns the
    ``OptimizeResult``; ``out`` is written whole or not at all."""
    import lowbit
    from lowbit.ir import files

    src, out = check_output_folder(source, out)
    model = load_decoder(src.model_path)
    if recipe.include_lm_head and recipe.include_embeddings:
        tie_as_table(model)
    elif recipe.include_lm_head or recipe.include_embeddings:
        untie_embeddings(model)
    if calibration is None and recipe.needs_calibration:
        if tokenizer is None:
            tokenizer = folder_tokenizer(src.folder)
        calibration = calibration_feeds(
            model, src.config, tokenizer, calibration_length, calibration_windows, calibration_text
        )
    read = files.files_read(model)
    result = lowbit.optimize(model, recipe, calibration=calibration)
    check_no_float_table(result.model, recipe)
    _write_folder(src, out, result.model, recipe.fused, read)
    return result


def fuse_folder(source: str | os.PathLike, out: str | os.PathLike, *, int8_activations: bool = False):
    """The fused form of a portable lowbit genai folder, written as the new folder ``out``: the passes that
    ``Recipe(fused=True, int8_activations=...)`` adds after quantization (FuseQDQPass, CleanupPass), lossless
    with respect to the portable graph without int8 activations, so one quantization serves every form.
    Returns the fused ``onnx_ir.Model``."""
    from lowbit.ir import files
    from lowbit.passes.cleanup import CleanupPass
    from lowbit.passes.fuse_qdq import FuseQDQPass

    src, out = check_output_folder(source, out)
    model = load_decoder(src.model_path)
    read = files.files_read(model)
    if not FuseQDQPass(int8_activations=int8_activations)(model).modified:
        raise ValueError(f"{str(source)!r} has no quantized weight to fuse (not a portable lowbit folder)")
    CleanupPass()(model)
    _write_folder(src, out, model, True, read)
    return model


def _write_folder(src: GenaiFolder, out: pathlib.Path, model, fused: bool, read: set[str]) -> None:
    """Write ``model`` as the genai folder ``out`` (whole or not at all): its config checked against the
    graph, the input folder's other files (never the files ``read`` from it), and the op library if fused."""
    import lowbit

    with _staging(out) as staging:
        target = staging / "folder"
        target.mkdir()
        lowbit.save(model, target / src.model_path.name)
        config = copy.deepcopy(src.config)
        check_consistent(model, config)
        for path in sorted(src.folder.iterdir()):
            if path.is_file() and path.name != CONFIG_NAME and str(path.resolve()) not in read:
                shutil.copy2(path, target / path.name)
        if fused:
            # Workaround (og 0.18): og loads a custom_ops_library only from inside the model's folder ("path is
            # not within an allowed directory" otherwise), so the op library travels with the folder.
            from lowbit.kernels import _lib

            library = _lib.library_path()
            shutil.copy2(library, target / library.name)
            options = config["model"]["decoder"].setdefault("session_options", {})
            options["custom_ops_library"] = library.name
        (target / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        _install(target, out)


def _transposed_constant(value) -> tuple[object, object] | None:
    """(Transpose node, its constant 2-D float input) when ``value`` is ``Transpose(perm=[1, 0])`` of one."""
    from lowbit.ir import analysis

    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    if list(producer.attributes.get_ints("perm", [1, 0])) != [1, 0]:
        return None
    source = producer.inputs[0]
    return (producer, source) if analysis.is_constant_weight(source) else None


def _tied_gathers(model, suffix: str):
    """``(gather, transpose, weight, table)`` for every ``Gather(Transpose(W), ids)`` of ``model``: ``table`` a
    new initializer ``W^T`` named after ``W`` with ``suffix``, not yet read by anything."""
    import onnx_ir as ir

    from lowbit.ir import builders

    graph = model.graph
    taken = builders.graph_names(graph)
    for node in list(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis", 0):
            continue
        found = _transposed_constant(node.inputs[0])
        if found is None:
            continue
        transpose, weight = found
        array = np.ascontiguousarray(weight.const_value.numpy().T)
        table = ir.Value(
            name=builders.fresh_name(f"{weight.name}.{suffix}", taken),
            shape=ir.Shape(array.shape),
            type=ir.TensorType(weight.dtype),
            const_value=ir.tensor(array),
        )
        graph.register_initializer(table)
        yield node, transpose, weight, table


def untie_embeddings(model) -> list[str]:
    """Give every ``Gather(Transpose(W), ids)`` its own constant table ``W^T``; returns the Gather names.

    For a recipe that quantizes only one of the head and the embedding (``tie_as_table`` keeps a pair that
    both quantize together): the quantized one gets its own copy, the other reads the float table."""
    untied = []
    for gather, transpose, _, table in _tied_gathers(model, "embedding_table"):
        gather.replace_input_with(0, table)
        if not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            model.graph.remove(transpose, safe=True)
        untied.append(gather.name)
    return untied


def tie_as_table(model) -> list[str]:
    """Turn the builder's tied form into torch's: the table ``T = W^T`` becomes the constant, every
    ``Gather(Transpose(W), ids)`` gathers from ``T`` and the LM head reads ``Transpose(T)``. Returns the Gather
    names.

    The builder ties a model's embedding to its LM head the other way round from torch's export: the head
    ``MatMul`` reads ``W [hidden, vocab]`` and the embedding gathers rows of ``Transpose(W)``. In torch's form
    lowbit quantizes the tied pair as one table (``quantize_plan.TiedTablePlan``) that the head and the
    embedding share, in the portable and in the fused file."""
    import onnx_ir as ir

    graph = model.graph
    tied = []
    for gather, transpose, weight, table in _tied_gathers(model, "table"):
        for use in list(transpose.outputs[0].uses()):  # the readers of W^T read the table itself
            use.node.replace_input_with(use.idx, table)
        readers = [use for use in weight.uses() if use.node is not transpose]
        transpose.replace_input_with(0, table)  # now Transpose(T) = W
        transpose.outputs[0].shape = ir.Shape(weight.const_value.shape)
        for use in readers:
            use.node.replace_input_with(use.idx, transpose.outputs[0])
        if not readers:
            graph.remove(transpose, safe=True)
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)
        tied.append(gather.name)
    return tied


def check_no_float_table(model, recipe) -> None:
    """Raise when the recipe asks for a quantized LM head or embedding and one still reads a float table
    (a form that lowbit's passes do not recognise): no weight is left in float without a word."""
    from lowbit.ir import analysis

    def float_weight(value):
        if analysis.is_constant_weight(value):
            return value
        found = _transposed_constant(value)
        return found[1] if found else None

    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if recipe.include_embeddings and node.op_type == "Gather" and float_weight(node.inputs[0]) is not None:
            what = f"embedding {node.name!r} gathers from the float table {float_weight(node.inputs[0]).name!r}"
        elif (
            recipe.include_lm_head
            and node.op_type in ("MatMul", "Gemm")
            and any(output.is_graph_output() for output in node.outputs)
            and float_weight(node.inputs[1]) is not None
        ):
            what = f"LM head {node.name!r} reads the float weight {float_weight(node.inputs[1]).name!r}"
        else:
            continue
        raise NotImplementedError(f"{what}, which the recipe asked to quantize and lowbit could not")


def load_decoder(path: str | os.PathLike):
    """The decoder graph of a genai folder as an ``onnx_ir.Model`` (external data left on disk).

    Workaround: the builder writes ``SimplifiedLayerNormalization`` (an ONNX Runtime op) in the ONNX domain,
    which ``onnx.checker`` refuses ("No Op registered"), so ``lowbit.load`` (which runs the checker) refuses
    every builder graph. This loads it with lowbit.load's other checks (external data inside the folder and
    complete, opsets, unique node names: ``lowbit.load(checker=False)``); ONNX Runtime validates the graph
    when calibration or og runs it."""
    import lowbit

    return lowbit.load(path, checker=False)


def folder_tokenizer(folder: pathlib.Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def check_consistent(model, config: Mapping) -> None:
    """Raise when the genai config names decoder inputs or outputs the graph lacks."""
    decoder = config["model"]["decoder"]
    layers = decoder.get("num_hidden_layers")
    inputs = {value.name for value in model.graph.inputs}
    outputs = {value.name for value in model.graph.outputs}
    for kind, names, have in (
        ("inputs", decoder.get("inputs", {}), inputs),
        ("outputs", decoder.get("outputs", {}), outputs),
    ):
        for key, name in names.items():
            expanded = [name % layer for layer in range(layers)] if "%d" in name and isinstance(layers, int) else [name]
            if key in (
                "input_ids",
                "logits",
                "past_key_names",
                "past_value_names",
                "present_key_names",
                "present_value_names",
            ):
                missing = [item for item in expanded if item not in have]
                if missing:
                    raise ValueError(f"the genai config's decoder {kind} name {missing[:3]}, which the graph lacks")


# --------------------------------------------------------------------------------------------------
# Running a folder


def greedy_tokens(folder: str | os.PathLike, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
    """The greedy continuation of ``prompt_ids`` by og (stops early at an end-of-sequence token)."""
    og = _og()
    return generate_ids(og.Model(str(folder)), prompt_ids, new_tokens).tokens


@dataclasses.dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    text: str
    prompt_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        later = len(self.tokens) - 1
        return later / self.decode_seconds if later > 0 and self.decode_seconds > 0 else float("nan")


def generate_ids(
    model, prompt_ids: Sequence[int], new_tokens: int, *, search: Mapping | None = None, on_token=None, exact=False
) -> Generation:
    """Generate up to ``new_tokens`` after ``prompt_ids`` with the og ``model`` (greedy unless ``search``
    says otherwise), timed: the prompt (until the first new token) and the decoding after it. ``exact``:
    exactly ``new_tokens`` (an end-of-sequence token does not stop it: for timing). ``on_token(token)`` is
    called as each token comes; the result's ``text`` is empty (the caller decodes)."""
    og = _og()
    ids = list(map(int, prompt_ids))
    total = len(ids) + new_tokens
    options = {"max_length": total, "do_sample": False, **(search or {})}
    if exact:
        options["min_length"] = total
    params = og.GeneratorParams(model)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    tokens = []
    start = time.perf_counter()
    generator.append_tokens(ids)
    first = None
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if first is None:
            first = time.perf_counter()
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    end = time.perf_counter()
    first = first or end
    return Generation(len(ids), tokens, "", first - start, end - first)


def generate(
    folder: str | os.PathLike,
    prompt: str,
    *,
    max_tokens: int = 128,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    stream=None,
) -> Generation:
    """Generate from ``prompt`` with og, writing each piece of text to ``stream`` (a file) as it comes."""
    og = _og()
    src = read_folder(folder)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    model = og.Model(str(src.folder))
    tokenizer = og.Tokenizer(model)
    search = {"do_sample": not greedy}
    if not greedy:
        search.update(temperature=float(temperature), top_p=float(top_p))
        if top_k is not None:
            search["top_k"] = int(top_k)
    decoder = tokenizer.create_stream()
    pieces = []

    def on_token(token: int) -> None:
        pieces.append(decoder.decode(token))
        if stream is not None:
            stream.write(pieces[-1])
            stream.flush()

    result = generate_ids(model, tokenizer.encode(prompt), max_tokens, search=search, on_token=on_token)
    result.text = "".join(pieces)
    return result


# --------------------------------------------------------------------------------------------------
# The command line (lowbit optimize FOLDER, lowbit generate)


def folder_mib(folder: str | os.PathLike) -> float:
    """Bytes of the files in a folder (not its subfolders), in MiB."""
    return sum(path.stat().st_size for path in pathlib.Path(folder).iterdir() if path.is_file()) / 2**20


def command_optimize(args, recipe) -> None:
    """``lowbit optimize IN_FOLDER -o OUT_FOLDER [recipe flags]``: every check before any work."""
    from lowbit.ir import files

    src, out = check_output_folder(args.model, args.output)
    if out.suffix == ".onnx" and not out.is_dir():
        raise ValueError(
            f"the input {str(args.model)!r} is an onnxruntime-genai folder, so -o names the output folder, not a .onnx file"
        )
    if args.calibration_text and not args.calibration_tokenizer and not recipe.needs_calibration:
        raise ValueError("--calibration-text is given but the recipe needs no calibration")
    if args.report:
        report = files.check_writable_file(args.report, "--report").resolve()
        if _inside(report, src.folder.resolve()) or _inside(report, out.resolve()):
            raise ValueError(f"--report {args.report!r} lies inside the input or the output folder")
    tokenizer = corpus = None
    if recipe.needs_calibration:
        from lowbit.tools import models, text

        tokenizer = (
            models.named_tokenizer(args.calibration_tokenizer)
            if args.calibration_tokenizer
            else folder_tokenizer(src.folder)
        )
        corpus = text.file_text(args.calibration_text) if args.calibration_text else None
    result = optimize_folder(
        src.folder,
        out,
        recipe,
        tokenizer=tokenizer,
        calibration_text=corpus,
        calibration_length=args.calibration_length,
        calibration_windows=args.calibration_windows,
    )
    print(result.report.summary())
    for notice in result.report.notices(recipe.fused):
        print(notice, file=sys.stderr)
    form = result.report.form(
        recipe.fused, "og loads the op library named in genai_config.json", "stock onnxruntime-genai"
    )
    print(
        f"wrote {out}/ ({folder_mib(out):.1f} MiB, onnxruntime-genai folder, {form}; input {folder_mib(src.folder):.1f} MiB)"
    )
    if args.report:
        pathlib.Path(args.report).write_text(result.report.to_json())
        print(f"wrote {args.report}")


def command_generate(args) -> None:
    """``lowbit generate FOLDER --prompt TEXT``: the text streams to stdout, the speed to stderr."""
    if not args.greedy and args.temperature is None and args.top_p is None and args.top_k is None:
        args.greedy = True  # greedy unless a sampling option is given
    if args.greedy and (args.temperature is not None or args.top_p is not None or args.top_k is not None):
        raise ValueError("--greedy cannot be combined with --temperature / --top-p / --top-k")
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    sys.stdout.write(args.prompt)
    result = generate(
        args.model,
        args.prompt,
        max_tokens=args.max_tokens,
        greedy=args.greedy,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
        top_k=args.top_k,
        stream=sys.stdout,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(
        f"{len(result.tokens)} tokens; prompt {result.prompt_tokens} tokens in {result.prompt_seconds * 1000:.0f} ms; "
        f"decode {result.tokens_per_second:.1f} tokens/s",
        file=sys.stderr,
    )
