"""onnxruntime-genai folders (issue 18): the builder as a library, quantized folders that og runs, generate.

The tiny model is a random Hugging Face Llama (2 layers, hidden 64, GQA 4/2 heads, its own byte-level
BPE tokenizer), built into a genai folder offline by the genai model builder. Expectations come from
elsewhere: torch's greedy tokens for the fp32 folder, and for a quantized folder the greedy tokens of
its own graph run without the cache (full sequence, empty past) in ONNX Runtime.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import onnx_ir
import pytest

import lowbit
from lowbit.passes import axis_selectors
from lowbit.tools import genai

PROMPT = "To be, or not to be"
TEXT = " ".join(
    [
        "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,",
        "Or to take arms against a sea of troubles",
    ]
    * 40
)
LAYERS, KV_HEADS, HEAD_SIZE = 2, 2, 16


@pytest.fixture(scope="module")
def og():
    return pytest.importorskip(
        "onnxruntime_genai", reason="needs the 'onnxruntime_genai' package: pip install 'onnxruntime-genai>=0.18,<0.19'"
    )


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TEXT.split(", "), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(folder, torch model, tokenizer) of a tiny random Llama saved as a Hugging Face folder."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,  # wide enough for varied greedy tokens
    )
    model = transformers.LlamaForCausalLM(config).eval()
    tokenizer = _tokenizer()
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def tiny_genai(tiny_hf, og):
    """The fp32 genai folder of the tiny model (lowbit's export, i.e. the builder as a library)."""
    return genai.export_genai(tiny_hf[0], tiny_hf[0].parent / "genai")


def _snapshot(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


def _empty_past(batch: int = 1) -> dict[str, np.ndarray]:
    return {
        f"past_key_values.{layer}.{kind}": np.zeros((batch, KV_HEADS, 0, HEAD_SIZE), np.float32)
        for layer in range(LAYERS)
        for kind in ("key", "value")
    }


def _no_cache_greedy(model_path: pathlib.Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of the graph run without its cache: the whole sequence every step, empty past."""
    from lowbit.runtime.session import session

    sess = session(model_path)
    ids = list(prompt)
    for _ in range(steps):
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            **_empty_past(),
        }
        logits = sess.run(["logits"], feeds)[0]
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt) :]


# ---------------------------------------------------------------------------------------------------------
# Fast: names, shapes, bad input


@pytest.mark.parametrize(
    ("path", "layer", "parent"),
    [
        ("/model/layers.3/attn/qkv_proj/MatMul", "model.layers.3", "model.layers.3.attn"),
        ("/model/layers.12/mlp/down_proj/MatMul", "model.layers.12", "model.layers.12.mlp"),
        ("/lm_head/MatMul", None, None),
        ("model.layers.3.self_attn.q_proj", "model.layers.3", "model.layers.3.self_attn"),  # torch's scopes: as before
        ("lm_head", None, None),
    ],
)
def test_builder_node_names_name_layers_and_modules(path, layer, parent):
    assert axis_selectors.decoder_layer(path) == layer
    assert axis_selectors.parent_module(path) == parent


def test_a_graph_without_module_paths_warns_that_the_selector_fell_back():
    from tests import factories

    batches = [factories.feeds_for(factories.mlp(), seed) for seed in range(3)]
    recipe = lowbit.Recipe(bits=3, group_size=8, axis="adadim", method="rtn", selector="block")
    with pytest.warns(UserWarning, match="found no module for any of 2 weight"):
        result = lowbit.optimize(factories.mlp(), recipe, calibration=batches)
    details = {record.name: record.details for record in result.report.passes}["QuantizeWeightsPass"]
    assert details["selection"]["modules"] == 0 and details["selection"]["unmatched"] == 2


def _fake_folder(folder: pathlib.Path, filename: str = "model.onnx", make_model: bool = True) -> pathlib.Path:
    folder.mkdir()
    config = {"model": {"decoder": {"filename": filename, "inputs": {}, "outputs": {}}, "type": "llama"}}
    (folder / genai.CONFIG_NAME).write_text(json.dumps(config))
    if make_model:
        (folder / filename).write_bytes(b"not read before the checks")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_bad_folders_get_a_clear_error_and_nothing_is_written(tmp_path, capsys):
    from lowbit.cli import main

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.onnx").write_bytes(b"x")
    missing = _fake_folder(tmp_path / "missing", "decoder.onnx", make_model=False)
    good = _fake_folder(tmp_path / "good")
    cases = [
        (plain, tmp_path / "out1", "has no genai_config.json"),
        (missing, tmp_path / "out2", "names the decoder file 'decoder.onnx', which is missing"),
        (good, good, "is, contains or lies inside the input folder"),
        (good, good / "sub", "is, contains or lies inside the input folder"),
        (good, tmp_path, "is, contains or lies inside the input folder"),
        (good, tmp_path / "out.onnx", "-o names the output folder, not a .onnx file"),
    ]
    before = {folder: _snapshot(folder) for folder in (plain, missing, good)}
    listing = sorted(path.name for path in tmp_path.iterdir())
    for source, target, message in cases:
        assert main(["optimize", str(source), "-o", str(target), "--bits", "4"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lowbit: error:") and message in err and err.count("\n") == 1, err
    assert {folder: _snapshot(folder) for folder in before} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == listing


def test_an_output_folder_with_other_files_is_refused(tmp_path):
    good = _fake_folder(tmp_path / "good")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        genai.check_output_folder(good, other)
    assert (other / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------
# The tiny builder model


@pytest.mark.slow
def test_empty_past_comes_from_the_graph_and_the_config(tiny_genai):
    folder = genai.read_folder(tiny_genai)
    model = genai.load_decoder(folder.model_path)
    past = genai.empty_past(model, folder.config)
    assert {name: value.shape for name, value in past.items()} == {
        name: value.shape for name, value in _empty_past().items()
    }
    with pytest.raises(ValueError, match="head_size"):  # the builder leaves the head size symbolic
        genai.empty_past(model)
    feeds = genai.calibration_feeds(model, folder.config, _tokenizer(), 16, 3, TEXT)
    assert len(feeds) == 3
    assert sorted(feeds[0]) == sorted(value.name for value in model.graph.inputs)
    assert feeds[0]["attention_mask"].shape == feeds[0]["input_ids"].shape == (1, 16)


@pytest.mark.slow
def test_kv_graph_prefill_then_steps_equals_one_forward(tiny_genai, tiny_hf):
    """The builder's graph with its cache: n prompt tokens then k single steps give the logits of one pass
    over n + k tokens with an empty past."""
    from lowbit.runtime.session import session

    sess = session(tiny_genai / "model.onnx")
    ids = np.array([tiny_hf[2](TEXT)["input_ids"][:12]], np.int64)
    full = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **_empty_past()})[0]
    n = 8
    names = [f"present.{layer}.{kind}" for layer in range(LAYERS) for kind in ("key", "value")]
    outputs = sess.run(
        ["logits", *names], {"input_ids": ids[:, :n], "attention_mask": np.ones((1, n), np.int64), **_empty_past()}
    )
    steps = [outputs[0]]
    for position in range(n, ids.shape[1]):
        past = {name.replace("present", "past_key_values"): value for name, value in zip(names, outputs[1:])}
        feeds = {
            "input_ids": ids[:, position : position + 1],
            "attention_mask": np.ones((1, position + 1), np.int64),
            **past,
        }
        outputs = sess.run(["logits", *names], feeds)
        steps.append(outputs[0])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fp32_folder_generates_torch_greedy_tokens(tiny_genai, tiny_hf, og):
    torch = pytest.importorskip("torch")
    _, model, tokenizer = tiny_hf
    prompt = tokenizer(PROMPT)["input_ids"]
    model_og = og.Model(str(tiny_genai))
    assert list(og.Tokenizer(model_og).encode(PROMPT)) == prompt  # the folder's tokenizer is the model's
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    got = genai.greedy_tokens(tiny_genai, prompt, 24)
    assert len(set(expected)) > 5  # varied tokens, not one repeated
    assert got == expected


RECIPES = {
    "gptq-adadim-block": (
        {"bits": 4, "group_size": 32, "axis": "adadim", "method": "gptq", "selector": "block"},
        2 * LAYERS,
    ),
    "gptq-adadim-layer-sequential": (
        {
            "bits": 3,
            "group_size": 32,
            "axis": "adadim",
            "method": "gptq",
            "selector": "layer",
            "calibration_mode": "sequential",
            "include_lm_head": True,
        },
        LAYERS,
    ),
    "rtn-ic-fused": ({"bits": 4, "group_size": 32, "axis": "ic", "fused": True}, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_optimized_folder_runs_in_og(name, tiny_genai, tiny_hf, tmp_path, og):
    kwargs, modules = RECIPES[name]
    if kwargs.get("fused"):
        from lowbit.kernels import _lib

        if not _lib.is_built():
            pytest.skip(f"lowbit op library not built; run `{_lib.BUILD_COMMAND}`")
    before = _snapshot(tiny_genai)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AdaDim selector found no module")
        result = genai.optimize_folder(
            tiny_genai,
            out,
            lowbit.Recipe(**kwargs),
            calibration_text=TEXT,
            calibration_length=32,
            calibration_windows=4,
        )
    assert _snapshot(tiny_genai) == before
    # qkv, o, gate, up, down; the LM head too where asked (untied from the table, which stays float)
    assert len(result.report.weights) == 5 * LAYERS + bool(kwargs.get("include_lm_head"))
    details = {record.name: record.details for record in result.report.passes}["QuantizeWeightsPass"]
    if modules is not None:  # the selectors found the builder's modules, none fell back to the matrix choice
        assert details["selection"]["modules"] == modules
        assert details["selection"]["unmatched"] == bool(kwargs.get("include_lm_head"))  # only the head: in no module
        assert details["selection"]["final_error"] <= details["selection"]["start_error"]
    if kwargs.get("calibration_mode") == "sequential":
        assert details["calibration"]["layers"] == LAYERS
    config = json.loads((out / genai.CONFIG_NAME).read_text())
    assert (out / config["model"]["decoder"]["filename"]).is_file()
    assert (out / "tokenizer.json").read_bytes() == (tiny_genai / "tokenizer.json").read_bytes()
    assert not (out / "model.onnx.data").exists()  # small: inline, and never the input's data file
    ops = {node.op_type for node in genai.load_decoder(out / "model.onnx").graph}
    library = config["model"]["decoder"].get("session_options", {}).get("custom_ops_library")
    if kwargs.get("fused"):
        assert "QuantMatMul" in ops and (out / library).is_file()
    else:
        assert "DequantizeLinear" in ops and library is None
    prompt = tiny_hf[2](PROMPT)["input_ids"]
    got = genai.greedy_tokens(out, prompt, 12)
    assert got == _no_cache_greedy(out / "model.onnx", prompt, 12)


def test_tie_as_table_gives_the_torch_form_with_consistent_shapes(tiny_genai):
    """The builder's ``Gather(Transpose(W))`` becomes ``Gather(T)`` and the head ``MatMul(x, Transpose(T))``,
    ``T = W^T`` the only copy; the Transpose's declared shape is the head weight's."""
    model = genai.load_decoder(tiny_genai / "model.onnx")
    weight = model.graph.initializers["lm_head.MatMul.weight"].const_value.numpy()
    assert genai.tie_as_table(model) == ["/model/embed_tokens/Gather"]
    gather = next(node for node in model.graph if node.name == "/model/embed_tokens/Gather")
    table = gather.inputs[0]
    np.testing.assert_array_equal(table.const_value.numpy(), weight.T)
    assert "lm_head.MatMul.weight" not in model.graph.initializers
    head = next(node for node in model.graph if node.outputs[0].name == "logits")
    transpose = head.inputs[1].producer()
    assert transpose.op_type == "Transpose" and transpose.inputs[0] is table
    assert list(transpose.outputs[0].shape) == list(weight.shape)


HEAD_AND_TABLE = {"bits": 3, "group_size": 32, "axis": "adadim", "method": "gptq", "include_lm_head": True}


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["portable", "fused"])
def test_quantized_head_and_embedding_of_a_tied_builder_graph(fused, tiny_genai, tiny_hf, tmp_path, og):
    """The builder ties the head and the embedding (``Gather(Transpose(lm_head weight))``): they stay one table,
    GPTQ'd for both (the head's Hessian and the rows) and stored once; no float copy is left."""
    if fused:
        from lowbit.kernels import _lib

        if not _lib.is_built():
            pytest.skip(f"lowbit op library not built; run `{_lib.BUILD_COMMAND}`")
    builder = genai.load_decoder(tiny_genai / "model.onnx")
    assert [node.op_type for node in builder.graph if "embed_tokens" in node.name] == ["Transpose", "Gather"]
    recipe = lowbit.Recipe(**HEAD_AND_TABLE, include_embeddings=True, fused=fused)
    with pytest.raises(NotImplementedError, match="embedding '/model/embed_tokens/Gather' gathers from the float"):
        genai.check_no_float_table(builder, recipe)  # a form lowbit does not rewrite: refused, never left in float
    out = tmp_path / "out"
    result = genai.optimize_folder(
        tiny_genai, out, recipe, calibration_text=TEXT, calibration_length=32, calibration_windows=4
    )
    assert len(result.report.weights) == 5 * LAYERS + 1 and not result.report.skipped
    (table,) = [record for record in result.report.weights if record.kind != "matmul"]
    assert table.kind == "embedding" and table.shape == [320, 64] and table.bits == 3
    assert table.method == "gptq" and table.output_error is not None  # the head's Hessian weighs the codes
    model = genai.load_decoder(out / "model.onnx")
    tables = [
        value for value in model.graph.initializers.values() if value.const_value.size in (320 * 64, 320 * 64 // 8 * 3)
    ]
    assert [value.dtype for value in tables] == [onnx_ir.DataType.UINT8 if fused else onnx_ir.DataType.UINT4]
    embedding = next(node for node in model.graph if "input_ids" in [value.name for value in node.inputs])
    head = next(node for node in model.graph if node.outputs[0].name == "logits")
    if fused:  # one packed copy, read by the head's QuantMatMul and by the embedding's QuantGather
        assert (embedding.domain, embedding.op_type, head.op_type) == ("lowbit", "QuantGather", "QuantMatMul")
        assert embedding.inputs[0] is head.inputs[1] and embedding.attributes.get_int("bits") == 3
    else:  # stock ONNX: the table dequantized once, gathered, and transposed for the head
        dequantize = embedding.inputs[0].producer()
        assert dequantize.op_type == "DequantizeLinear"
        assert head.inputs[1].producer().op_type == "Transpose"
        assert head.inputs[1].producer().inputs[0] is dequantize.outputs[0]
    prompt = tiny_hf[2](PROMPT)["input_ids"]
    assert genai.greedy_tokens(out, prompt, 12) == _no_cache_greedy(out / "model.onnx", prompt, 12)


@pytest.mark.slow
def test_a_quantized_head_alone_reports_the_untied_table_in_float(tiny_genai, tmp_path, og):
    recipe = lowbit.Recipe(**HEAD_AND_TABLE)
    result = genai.optimize_folder(
        tiny_genai, tmp_path / "out", recipe, calibration_text=TEXT, calibration_length=32, calibration_windows=4
    )
    assert [record.kind for record in result.report.weights].count("lm_head") == 1
    assert [
        (skip.kind, "embedding table left in float by default" in skip.reason) for skip in result.report.skipped
    ] == [("embedding", True)]


@pytest.mark.slow
def test_fusing_a_portable_folder_equals_quantizing_with_fused(tiny_genai, tiny_hf, tmp_path):
    from lowbit.kernels import _lib
    from lowbit.tools import eval_perplexity

    if not _lib.is_built():
        pytest.skip(f"lowbit op library not built; run `{_lib.BUILD_COMMAND}`")
    # float16 scales (the fused form's default) in the portable folder too: the same weights in both
    recipe = {**HEAD_AND_TABLE, "include_embeddings": True, "scale_dtype": "float16"}
    calibration = {"calibration_text": TEXT, "calibration_length": 32, "calibration_windows": 4}
    genai.optimize_folder(tiny_genai, tmp_path / "portable", lowbit.Recipe(**recipe), **calibration)
    genai.optimize_folder(tiny_genai, tmp_path / "fused", lowbit.Recipe(**recipe, fused=True), **calibration)
    genai.fuse_folder(tmp_path / "portable", tmp_path / "fused_later")
    ids = np.array([tiny_hf[2](TEXT)["input_ids"][:40]], np.int64)
    fused, later = (eval_perplexity.folder_logits(tmp_path / name)(ids) for name in ("fused", "fused_later"))
    np.testing.assert_array_equal(later, fused)
    config = json.loads((tmp_path / "fused_later" / genai.CONFIG_NAME).read_text())
    assert config == json.loads((tmp_path / "fused" / genai.CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match="has no quantized weight to fuse"):
        genai.fuse_folder(tiny_genai, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_folder_perplexity_through_the_kv_graph_equals_the_no_cache_graphs(tiny_genai, tiny_hf, tmp_path):
    """Perplexity of the genai folder (its KV graph, each window with an empty past) against lowbit's own
    export of the same model without a cache (``input_ids -> logits``)."""
    from lowbit.tools import eval_perplexity, models, text

    no_cache = models.export_hf_causal_lm(tiny_hf[0], tmp_path / "no_cache.onnx")
    windows = text.token_windows(tiny_hf[2], text.evaluation_text("othello"), 64, 3)
    expected = eval_perplexity.perplexity(no_cache, windows)
    got = eval_perplexity.folder_perplexity(tiny_genai, windows)
    assert got == pytest.approx(expected, rel=1e-4)
    assert got != pytest.approx(eval_perplexity.folder_perplexity(tiny_genai, windows[:, ::-1].copy()), rel=1e-2)


@pytest.mark.slow
def test_command_line_eval_of_folders(tiny_genai, tmp_path, capsys):
    from lowbit.cli import main

    w4 = tmp_path / "w4"
    genai.optimize_folder(tiny_genai, w4, lowbit.Recipe(bits=4, group_size=32, include_lm_head=True))
    argv = ["eval", str(w4), "--reference", str(tiny_genai), "--windows", "2", "--length", "64"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("perplexity ") and lines[0].endswith(f"2 windows x 64 tokens of othello; {w4})")
    assert f"reference {tiny_genai}): " in lines[1] and lines[1].endswith(f" % for {w4}")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["eval", str(plain)]) == 2
    assert "has no genai_config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_export_optimize_generate(tiny_hf, tmp_path, og, capsys):
    from lowbit.cli import main

    fp32, w4 = tmp_path / "fp32", tmp_path / "w4"
    assert main(["export", str(tiny_hf[0]), "--genai", "-o", str(fp32)]) == 0
    assert "onnxruntime-genai folder" in capsys.readouterr().out
    assert main(["export", str(tiny_hf[0]), "--genai", "-o", str(fp32)]) == 2  # exists: refused
    assert "exists" in capsys.readouterr().err
    corpus = tmp_path / "calibration.txt"
    corpus.write_text(TEXT)
    argv = [
        "optimize",
        str(fp32),
        "-o",
        str(w4),
        "--bits",
        "4",
        "--group-size",
        "32",
        "--method",
        "gptq",
        "--calibration-text",
        str(corpus),
        "--calibration-windows",
        "4",
        "--calibration-length",
        "32",
    ]
    assert main(argv) == 0  # calibration tokenized by the folder's own tokenizer
    assert f"wrote {w4}/" in capsys.readouterr().out
    assert main(["generate", str(w4), "--prompt", PROMPT, "--max-tokens", "8"]) == 0
    captured = capsys.readouterr()
    tokens = genai.greedy_tokens(w4, tiny_hf[2](PROMPT)["input_ids"], 8)
    # The random model emits byte tokens that form no UTF-8 character: og's stream drops those bytes.
    assert captured.out == PROMPT + tiny_hf[2].decode(tokens).replace("\ufffd", "") + "\n"
    assert "tokens/s" in captured.err
    assert (
        main(["generate", str(w4), "--prompt", PROMPT, "--max-tokens", "4", "--temperature", "0.8", "--top-p", "0.9"])
        == 0
    )
    assert capsys.readouterr().out.startswith(PROMPT)
    assert main(["generate", str(w4), "--prompt", PROMPT, "--greedy", "--temperature", "0.8"]) == 2


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_genai_folder_generates_torch_greedy_tokens(smollm2_available, tmp_path, og):
    """SmolLM2 (a GGUF file) -> Hugging Face folder -> builder: og's 64 greedy tokens are torch's."""
    torch = pytest.importorskip("torch")
    from lowbit.tools import models

    folder = genai.export_genai("smollm2", tmp_path / "smollm2")
    assert sorted(path.name for path in folder.iterdir()) == [
        "chat_template.jinja",
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    model, tokenizer = models.load_smollm2()
    for text in (PROMPT, "The capital of France is"):  # the README's example prompt; one that ends in EOS
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            tokens = model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
        assert genai.greedy_tokens(folder, prompt, 64) == tokens[0, len(prompt) :].tolist()


# ---------------------------------------------------------------------------------------------------------
# The generation benchmark (tools/dev/bench_generate.py)


def test_bench_generate_reuses_a_folder_recorded_before_a_recipe_field_existed():
    """A recipe record written before a Recipe field was added (so without it) is the same recipe when the field
    has its default: the folder is reused, not remade; a record that differs is not."""
    import dataclasses

    from lowbit.tools.dev import bench_generate

    recipe = dataclasses.asdict(lowbit.Recipe(bits=3, method="gptq"))
    old = {key: value for key, value in recipe.items() if key != "head_bits"}
    assert bench_generate._with_recipe_defaults({"recipe": old}) == {"recipe": recipe}
    fused = {"fused_from": {"recipe": old}, "int8_activations": True}
    assert bench_generate._with_recipe_defaults(fused) == {"fused_from": {"recipe": recipe}, "int8_activations": True}
    assert bench_generate._with_recipe_defaults({"recipe": {**old, "bits": 4}}) != {"recipe": recipe}


def test_bench_generate_plot_has_one_point_per_row():
    import xml.etree.ElementTree as ET

    from lowbit.tools.dev import bench_generate

    results = {
        name: {"mb": mb, "perplexity": ppl, "prompt_ms": 1.0, "decode_tok_s": 2.0, "peak_rss_mb": 3.0}
        for name, mb, ppl in [("builder fp32", 540.3, 45.2), ("lowbit W3 <x>, portable", 70.0, 58.0), ("b", 86.5, 60)]
    }
    root = ET.fromstring(bench_generate.svg_plot(results))
    circles = root.findall("{http://www.w3.org/2000/svg}circle")
    assert [circle.get("fill") for circle in circles] == ["#888888", "none", "#4878a8"]
    xs, ys = [float(c.get("cx")) for c in circles], [float(c.get("cy")) for c in circles]
    assert xs[1] < xs[2] < xs[0] and ys[0] > ys[1] > ys[2]  # more MB to the right, lower perplexity further down
    assert bench_generate.table_line("r", results["b"]) == "| r | 86.5 | 60.00 | 1 | 2.0 | 3 |"


@pytest.mark.slow
def test_bench_generate_on_the_tiny_model(tiny_hf, tmp_path, capsys, og):
    from lowbit.tools.dev import bench_generate

    corpus = tmp_path / "calibration.txt"
    corpus.write_text(TEXT)
    workdir = tmp_path / "bench"
    rows = ["builder-fp32", "builder-int4", "builder-int4-fp32-head", "lowbit-w4-head-emb-portable"]
    argv = [
        *("--model", str(tiny_hf[0]), "--workdir", str(workdir), "--bits", "4", "--windows", "2", "--length", "32"),
        *("--prompt-tokens", "8", "--new-tokens", "6", "--calibration-windows", "4", "--calibration-length", "32"),
        *("--calibration-text", str(corpus), "--rows", *rows, "lowbit-w4-head-emb-fused"),
    ]
    bench_generate.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 + 5 and all(line.startswith("| ") for line in out[3:])  # header, table head, a line per row
    results = json.loads((workdir / "results.json").read_text())
    assert list(results) == [
        row.name for row in bench_generate.default_rows([4]) if row.folder in (*rows, "lowbit-w4-head-emb-fused")
    ]
    fp32, int4, int4_fp32_head, portable, fused = results.values()
    assert int4["mb"] < int4_fp32_head["mb"] < fp32["mb"] and portable["mb"] < fp32["mb"]
    assert fused["perplexity"] == pytest.approx(portable["perplexity"], rel=1e-4)  # the fusion is lossless
    assert all(result["decode_tok_s"] > 0 and result["peak_rss_mb"] > 0 for result in results.values())
    assert (workdir / "perplexity_vs_mb.svg").read_text().count("<circle") == 5
    stamps = {path.name: path.stat().st_mtime_ns for path in workdir.glob("*/model.onnx")}
    bench_generate.main([*argv[:-5], "lowbit-w4-head-emb-fused"])  # reuses the folders it made
    assert {path.name: path.stat().st_mtime_ns for path in workdir.glob("*/model.onnx")} == stamps
