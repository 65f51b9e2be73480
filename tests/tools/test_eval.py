"""Perplexity and embedding evaluation: exact on hand-built models, and parity of the real exports."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit.tools import eval_embedding, eval_perplexity, models, text

VOCAB = 11


def bigram_onnx(path, table: np.ndarray):
    """An ONNX "causal LM" whose logits at a position are row ``table[token]``: ``Gather(table, input_ids)``."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)],
        "bigram",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def windows() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=(3, 17), dtype=np.int64)


def test_uniform_logits_give_perplexity_equal_to_vocab_size(tmp_path, windows):
    # Constant rows are uniform distributions whatever the constant; +-1000 overflows a naive softmax.
    table = np.repeat(np.linspace(-1000.0, 1000.0, VOCAB)[:, None], VOCAB, axis=1)
    path = bigram_onnx(tmp_path / "uniform.onnx", table)
    assert eval_perplexity.perplexity(path, windows) == pytest.approx(VOCAB, rel=1e-12)


def test_bigram_perplexity_scores_the_next_token(tmp_path, windows):
    probabilities = np.random.default_rng(1).dirichlet(np.ones(VOCAB), size=VOCAB)
    path = bigram_onnx(tmp_path / "bigram.onnx", np.log(probabilities))
    expected = np.exp(-np.mean(np.log(probabilities[windows[:, :-1], windows[:, 1:]])))
    assert eval_perplexity.perplexity(path, windows) == pytest.approx(expected, rel=1e-6)


def test_torch_perplexity_matches_onnx_on_the_same_model(tmp_path, windows):
    table = np.log(np.random.default_rng(2).dirichlet(np.ones(VOCAB), size=VOCAB)).astype(np.float32)

    class TorchBigram(torch.nn.Module):
        def forward(self, input_ids, use_cache):
            return types.SimpleNamespace(logits=torch.from_numpy(table)[input_ids])

    onnx_value = eval_perplexity.perplexity(bigram_onnx(tmp_path / "bigram.onnx", table), windows)
    assert eval_perplexity.torch_perplexity(TorchBigram(), windows) == pytest.approx(onnx_value, rel=1e-12)


def test_perplexity_rejects_bad_windows_and_models(tmp_path, windows):
    path = bigram_onnx(tmp_path / "bigram.onnx", np.zeros((VOCAB, VOCAB)))
    with pytest.raises(ValueError, match="int64"):
        eval_perplexity.perplexity(path, windows.astype(np.float32))
    with pytest.raises(ValueError, match="length >= 2"):
        eval_perplexity.perplexity(path, windows[:, :1])
    with pytest.raises(ValueError, match=r"bigram\.onnx.*expected inputs \['input_ids', 'attention_mask'\]"):
        eval_embedding.embed(path, tokenizer=None, sentences=["a sentence"])


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_onnx_perplexity_equals_torch(smollm2_onnx, smollm2_torch, eval_windows):
    onnx_value = eval_perplexity.perplexity(smollm2_onnx, eval_windows)
    torch_value = eval_perplexity.torch_perplexity(smollm2_torch, eval_windows)
    assert onnx_value == pytest.approx(torch_value, rel=1e-3)
    assert 1 < onnx_value < 200, "SmolLM2 should predict Shakespeare far better than chance (49152)"


@pytest.mark.model
def test_minilm_onnx_embeddings_equal_sentence_transformers(minilm_onnx, minilm_tokenizer, texts_available):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    chosen = text.sentences(text.play_text(text.EVALUATION_PLAY), 40)
    chosen += ["Short.", " ".join(["Iago"] * 400)]  # one token-poor and one truncated at 256 tokens
    reference = sentence_transformers.SentenceTransformer(str(models.minilm_folder()), device="cpu").encode(chosen)
    candidate = eval_embedding.embed(minilm_onnx, minilm_tokenizer, chosen)
    assert candidate.shape == reference.shape == (len(chosen), 384)
    cosine = (candidate * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(candidate, axis=1), 1.0, rtol=1e-5)


@pytest.mark.model
def test_embedding_cosine_of_a_model_with_itself_is_one(minilm_onnx, minilm_tokenizer, texts_available):
    chosen = text.sentences(text.play_text(text.EVALUATION_PLAY), 20)
    score = eval_embedding.embedding_cosine(minilm_onnx, minilm_onnx, minilm_tokenizer, chosen)
    assert score == pytest.approx({"mean": 1.0, "min": 1.0}, abs=1e-6)


def test_main_prints_the_change_against_a_reference(tmp_path, monkeypatch, capsys):
    """``lowbit eval MODEL --reference FP32``: both perplexities on the same windows, and the change."""
    uniform = bigram_onnx(tmp_path / "uniform.onnx", np.zeros((VOCAB, VOCAB)))
    probabilities = np.random.default_rng(1).dirichlet(np.ones(VOCAB) * 5, size=VOCAB)
    bigram = bigram_onnx(tmp_path / "bigram.onnx", np.log(probabilities))
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=64)
    monkeypatch.setattr(models, "smollm2_tokenizer", lambda: lambda text, **kwargs: {"input_ids": tokens.tolist()})
    monkeypatch.setattr(text, "evaluation_text", lambda play: "unused: the tokenizer above ignores the text")
    eval_perplexity.main([str(uniform), "--reference", str(bigram), "--windows", "4", "--length", "16"])
    lines = capsys.readouterr().out.splitlines()
    windows = tokens.reshape(4, 16)
    expected = np.exp(-np.mean(np.log(probabilities[windows[:, :-1], windows[:, 1:]])))
    assert lines[0].startswith(f"perplexity {VOCAB:.4f} (4 windows x 16 tokens")
    assert lines[1].startswith(f"perplexity {expected:.4f}") and "reference" in lines[1]
    assert lines[1].endswith(f"{(VOCAB - expected) / expected * 100:+.2f} % for {uniform}")


def test_main_checks_the_model_before_loading_a_tokenizer(tmp_path, monkeypatch):
    """A model that is not a causal LM is named as such, whether or not the tokenizer's packages exist."""
    import onnx_ir as ir

    from tests import factories

    path = tmp_path / "mlp.onnx"
    ir.save(factories.mlp(), path)

    def no_tokenizer():
        raise AssertionError("the tokenizer must not be loaded for a model that is not a causal LM")

    monkeypatch.setattr(models, "smollm2_tokenizer", no_tokenizer)
    with pytest.raises(ValueError, match="expected inputs \\['input_ids'\\] and an output 'logits'"):
        eval_perplexity.main([str(path)])
