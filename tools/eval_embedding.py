"""Sentence-embedding agreement between a reference and a candidate (e.g. quantized) ONNX model.

Both models map ``input_ids, attention_mask -> sentence_embedding`` (see ``lowbit.tools.models``); the
score is the cosine similarity of the two embeddings of each sentence, reported as mean and min.

    python -m lowbit.tools.eval_embedding minilm.onnx minilm.w4.onnx --play othello --sentences 256
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from lowbit.runtime.session import open_session
from lowbit.tools import models, text

_INPUTS = ("input_ids", "attention_mask")
_OUTPUT = "sentence_embedding"


def embed(
    session_or_path: ort.InferenceSession | str | os.PathLike, tokenizer, sentences: Sequence[str], batch_size: int = 16
) -> np.ndarray:
    """Embeddings ``[len(sentences), dim]`` of an ONNX sentence-embedding model, in padded batches."""
    if not sentences:
        raise ValueError("no sentences to embed")
    model = open_session(session_or_path, _INPUTS, _OUTPUT)
    batches = []
    for start in tqdm(range(0, len(sentences), batch_size), desc="embedding", unit="batch"):
        encoded = tokenizer(
            list(sentences[start : start + batch_size]), padding=True, truncation=True, return_tensors="np"
        )
        feed = {name: encoded[name].astype(np.int64) for name in _INPUTS}
        batches.append(model.run([_OUTPUT], feed)[0])
    return np.concatenate(batches)


def embedding_cosine(
    reference: ort.InferenceSession | str | os.PathLike,
    candidate: ort.InferenceSession | str | os.PathLike,
    tokenizer,
    sentences: Sequence[str],
) -> dict[str, float]:
    """Mean and min over sentences of the cosine similarity between the two models' embeddings."""
    a = embed(reference, tokenizer, sentences).astype(np.float64)
    b = embed(candidate, tokenizer, sentences).astype(np.float64)
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(cosine.mean()), "min": float(cosine.min())}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowbit.tools.eval_embedding", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="reference (float) ONNX sentence-embedding model")
    parser.add_argument("candidate", help="candidate (e.g. quantized) ONNX model with the same inputs and output")
    parser.add_argument("--play", default=text.EVALUATION_PLAY, help="Shakespeare play (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=256, help="number of sentences (default: %(default)s)")
    parser.add_argument("--tokenizer", help="Hugging Face model folder with the tokenizer (default: MiniLM's)")
    args = parser.parse_args(argv)
    tokenizer = models.hf_tokenizer(args.tokenizer) if args.tokenizer else models.minilm_tokenizer()
    chosen = text.sentences(text.evaluation_text(args.play), args.sentences)
    score = embedding_cosine(args.reference, args.candidate, tokenizer, chosen)
    print(f"cosine mean {score['mean']:.6f} min {score['min']:.6f} ({len(chosen)} sentences of {args.play})")


if __name__ == "__main__":
    main()
