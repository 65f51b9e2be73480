"""Perplexity of a causal LM on token windows, through ONNX Runtime or through torch.

``perplexity`` runs an ONNX model (input ``input_ids``, output ``logits``) with MatMulNBits accuracy
level 0, so activations stay fp32 and the figure measures weight quantization alone.
``torch_perplexity`` runs the same windows through the torch model, to check an export.
``folder_perplexity`` runs an onnxruntime-genai folder's decoder (the KV-cache graph) on each window with an
empty past, which gives the logits of the same graph without a cache; its op library, where the folder's
``genai_config.json`` names one, is the folder's own (as og loads it).

    python -m lowbit.tools.eval_perplexity model.onnx --play othello --windows 40 --length 512
    python -m lowbit.tools.eval_perplexity GENAI_FOLDER --reference FP32_FOLDER
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from lowbit.runtime.session import open_session
from lowbit.tools import models, text


def next_token_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``-log p(tokens[t + 1] | tokens[:t + 1])`` for every position t of one window.

    ``logits`` is ``[length, vocab]``; the log-softmax is taken in float64 with the max subtracted.
    """
    logits = logits[:-1].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_normaliser = np.log(np.exp(shifted).sum(axis=-1))
    return log_normaliser - shifted[np.arange(len(shifted)), tokens[1:]]


def _windows_perplexity(logits_of: Callable[[np.ndarray], np.ndarray], windows: np.ndarray, desc: str) -> float:
    """exp(mean next-token NLL over all windows), each window run alone (batch 1)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.dtype != np.int64:
        raise ValueError(f"windows must be int64 [count, length >= 2], got {windows.dtype} {list(windows.shape)}")
    total = 0.0
    for window in tqdm(windows, desc=desc, unit="window"):
        total += float(next_token_nll(logits_of(window[None]), window).sum())
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def perplexity(session_or_path: ort.InferenceSession | str | os.PathLike, windows: np.ndarray) -> float:
    """Perplexity of an ONNX causal LM (``input_ids -> logits``) on token windows ``[count, length]``."""
    model = open_session(session_or_path, ["input_ids"], "logits")
    return _windows_perplexity(_session_logits(model), windows, "perplexity (ONNX)")


def _session_logits(model: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    return lambda ids: model.run(["logits"], {"input_ids": ids})[0][0]


def folder_session(folder: str | os.PathLike) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """(session on the genai folder's decoder, its empty-past feeds) with fp32 activations wherever the file
    leaves the choice to the session, and the op library the folder's config names."""
    from lowbit.runtime.session import session_options
    from lowbit.tools import genai

    src = genai.read_folder(folder)
    options = session_options(matmulnbits_accuracy_level=0, use_lowbit_ops=False)
    library = src.decoder.get("session_options", {}).get("custom_ops_library")
    if library:
        options.register_custom_ops_library(str((src.folder / library).resolve()))
    sess = ort.InferenceSession(str(src.model_path), options, providers=["CPUExecutionProvider"])
    past = genai.empty_past(genai.load_decoder(src.model_path), src.config)
    known = {"input_ids", "attention_mask", "position_ids", *past}
    unknown = [value.name for value in sess.get_inputs() if value.name not in known]
    if unknown or "logits" not in [value.name for value in sess.get_outputs()]:
        raise ValueError(
            f"the decoder of {str(folder)!r} has inputs {unknown} that a perplexity run cannot feed, or no 'logits'"
        )
    return sess, past


def folder_logits(folder: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """The logits ``[length, vocab]`` of a genai folder's decoder for ids ``[1, length]``, with an empty past."""
    sess, past = folder_session(folder)
    names = {value.name for value in sess.get_inputs()}

    def logits_of(ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, **past}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones_like(ids)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        return sess.run(["logits"], feeds)[0][0]

    return logits_of


def model_logits(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """``folder_logits`` for a folder (a genai folder), else the logits of an ONNX file (``input_ids -> logits``)."""
    if os.path.isdir(path):
        return folder_logits(path)
    return _session_logits(open_session(path, ["input_ids"], "logits"))


def folder_perplexity(folder: str | os.PathLike, windows: np.ndarray) -> float:
    """Perplexity of a genai folder's decoder on token windows, each run with an empty past (batch 1)."""
    return _windows_perplexity(folder_logits(folder), windows, "perplexity (genai folder, empty past)")


def torch_perplexity(model: torch.nn.Module, windows: np.ndarray) -> float:
    """Perplexity of a Hugging Face causal LM in torch on the same windows as ``perplexity``."""

    @torch.no_grad()
    def logits_of(ids: np.ndarray) -> np.ndarray:
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits[0].numpy()

    return _windows_perplexity(logits_of, windows, "perplexity (torch)")


def main(argv: Sequence[str] | None = None) -> None:
    from lowbit.tools import genai

    parser = argparse.ArgumentParser(prog="python -m lowbit.tools.eval_perplexity", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", help="ONNX causal LM with input input_ids and output logits, or an onnxruntime-genai folder"
    )
    parser.add_argument("--play", default=text.EVALUATION_PLAY, help="Shakespeare play (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=40, help="number of windows (default: %(default)s)")
    parser.add_argument("--length", type=int, default=512, help="tokens per window (default: %(default)s)")
    parser.add_argument(
        "--tokenizer",
        help="Hugging Face model folder with the tokenizer (default: a genai folder's own, else SmolLM2's)",
    )
    parser.add_argument("--reference", help="also measure this model (e.g. the fp32 export) on the same windows")
    args = parser.parse_args(argv)
    # Both models are checked to be causal LMs before the tokenizer and the text are loaded.
    model = model_logits(args.model)
    reference_model = model_logits(args.reference) if args.reference else None
    if args.tokenizer:
        tokenizer = models.hf_tokenizer(args.tokenizer)
    elif genai.is_genai_folder(args.model):
        tokenizer = genai.folder_tokenizer(args.model)
    else:
        tokenizer = models.smollm2_tokenizer()
    windows = text.token_windows(tokenizer, text.evaluation_text(args.play), args.length, args.windows)
    where = f"{args.windows} windows x {args.length} tokens of {args.play}"
    value = _windows_perplexity(model, windows, "perplexity")
    print(f"perplexity {value:.4f} ({where}; {args.model})", flush=True)
    if reference_model is not None:
        reference = _windows_perplexity(reference_model, windows, "perplexity (reference)")
        change = (value - reference) / reference * 100
        print(f"perplexity {reference:.4f} ({where}; reference {args.reference}): {change:+.2f} % for {args.model}")


if __name__ == "__main__":
    main()
