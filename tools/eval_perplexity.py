"""Perplexity of a causal LM on token windows, through ONNX Runtime or through torch.

``perplexity`` runs an ONNX model (input ``input_ids``, output ``logits``) with MatMulNBits accuracy
level 0, so activations stay fp32 and the figure measures weight quantization alone.
``torch_perplexity`` runs the same windows through the torch model, to check an export.

    python -m lowbit.tools.eval_perplexity model.onnx --play othello --windows 40 --length 512
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
    return _windows_perplexity(
        lambda ids: model.run(["logits"], {"input_ids": ids})[0][0], windows, "perplexity (ONNX)"
    )


def torch_perplexity(model: torch.nn.Module, windows: np.ndarray) -> float:
    """Perplexity of a Hugging Face causal LM in torch on the same windows as ``perplexity``."""

    @torch.no_grad()
    def logits_of(ids: np.ndarray) -> np.ndarray:
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits[0].numpy()

    return _windows_perplexity(logits_of, windows, "perplexity (torch)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowbit.tools.eval_perplexity", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX causal LM with input input_ids and output logits")
    parser.add_argument("--play", default=text.EVALUATION_PLAY, help="Shakespeare play (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=40, help="number of windows (default: %(default)s)")
    parser.add_argument("--length", type=int, default=512, help="tokens per window (default: %(default)s)")
    parser.add_argument("--tokenizer", help="Hugging Face model folder with the tokenizer (default: SmolLM2's)")
    parser.add_argument("--reference", help="also measure this model (e.g. the fp32 export) on the same windows")
    args = parser.parse_args(argv)
    # Both models are checked to be causal LMs before the tokenizer and the text are loaded.
    model = open_session(args.model, ["input_ids"], "logits")
    reference_model = open_session(args.reference, ["input_ids"], "logits") if args.reference else None
    tokenizer = models.hf_tokenizer(args.tokenizer) if args.tokenizer else models.smollm2_tokenizer()
    windows = text.token_windows(tokenizer, text.evaluation_text(args.play), args.length, args.windows)
    where = f"{args.windows} windows x {args.length} tokens of {args.play}"
    value = perplexity(model, windows)
    print(f"perplexity {value:.4f} ({where}; {args.model})", flush=True)
    if reference_model is not None:
        reference = perplexity(reference_model, windows)
        change = (value - reference) / reference * 100
        print(f"perplexity {reference:.4f} ({where}; reference {args.reference}): {change:+.2f} % for {args.model}")


if __name__ == "__main__":
    main()
