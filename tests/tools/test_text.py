"""The Shakespeare corpus: plays, token windows, sentences, and the calibration/evaluation split."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.tools import text

pytestmark = pytest.mark.usefixtures("texts_available")


class CharTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per character."""

    def __call__(self, source: str, add_special_tokens: bool, verbose: bool) -> dict:
        return {"input_ids": [ord(char) for char in source]}


def test_calibration_and_evaluation_plays_are_available_and_disjoint():
    plays = text.available_plays()
    assert {*text.CALIBRATION_PLAYS, text.EVALUATION_PLAY} <= set(plays)
    assert text.EVALUATION_PLAY not in text.CALIBRATION_PLAYS


def test_play_text_reads_the_play():
    othello = text.play_text("othello")
    assert othello.startswith("OTHELLO, THE MOOR OF VENICE")
    assert "I kiss'd thee ere I kill'd thee" in othello


def test_unknown_play_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown play 'othelo'; available: .*hamlet.*othello"):
        text.play_text("othelo")


def test_evaluation_text_warns_on_a_calibration_play():
    with pytest.warns(UserWarning, match="hamlet is a calibration play"):
        text.evaluation_text("hamlet")


def test_token_windows_are_consecutive_non_overlapping_slices():
    source = text.play_text("macbeth")
    windows = text.token_windows(CharTokenizer(), source, length=100, count=7)
    assert windows.shape == (7, 100) and windows.dtype == np.int64
    assert "".join(map(chr, windows.ravel())) == source[:700]


def test_token_windows_refuse_a_text_too_short():
    with pytest.raises(ValueError, match="has 26 tokens, too few for 3 windows of 10 \\(at most 2 fit\\)"):
        text.token_windows(CharTokenizer(), "abcdefghijklmnopqrstuvwxyz", length=10, count=3)
    with pytest.raises(ValueError, match="length >= 2"):
        text.token_windows(CharTokenizer(), "abc", length=1, count=1)


def test_sentences_are_distinct_spoken_lines():
    chosen = text.sentences(text.play_text("othello"), 300, min_words=4, max_words=30)
    assert len(chosen) == len(set(chosen)) == 300
    assert all(4 <= len(sentence.split()) <= 30 for sentence in chosen)
    assert not any("[" in sentence or "\n" in sentence or sentence.isupper() for sentence in chosen)
    assert chosen[0].startswith("Tush, never tell me;")  # the cast list, headings and speaker names are gone
    assert "Thou told'st me thou didst hold him in thy hate." in chosen


def test_sentences_refuse_to_invent_more_than_the_text_has():
    with pytest.raises(ValueError, match="only .* sentences of 6..60 words, asked for 100000"):
        text.sentences(text.play_text("macbeth"), 100000)


@pytest.mark.model
def test_smollm2_windows_decode_to_the_start_of_the_text(smollm2_tokenizer):
    source = text.play_text(text.EVALUATION_PLAY)
    windows = text.token_windows(smollm2_tokenizer, source, length=64, count=5)
    assert source.startswith(smollm2_tokenizer.decode(windows.ravel()))


def test_named_feeds_come_from_a_child_process_equal_to_the_tokenizer_here(smollm2_tokenizer):
    """The command line tokenizes in a child process (transformers and torch stay out of the optimizing one): the
    windows are those of the tokenizer loaded here, and a child's error comes back as it was raised."""
    source = text.play_text(text.EVALUATION_PLAY)
    here = text.calibration_feeds(smollm2_tokenizer, ["input_ids", "attention_mask"], 32, 3, source)
    child = text.named_calibration_feeds("smollm2", ["input_ids", "attention_mask"], 32, 3, source)
    assert [sorted(feed) for feed in child] == [sorted(feed) for feed in here]
    for mine, theirs in zip(child, here, strict=True):
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])
    with pytest.raises(FileNotFoundError, match="neither a shipped model"):
        text.named_calibration_feeds("/no/such/tokenizer", ["input_ids"], 32, 1)


def test_file_text_reads_plain_text_and_jsonl(tmp_path):
    plain = tmp_path / "corpus.txt"
    plain.write_text("first line\nsecond line\n", encoding="utf-8")
    assert text.file_text(plain) == "first line\nsecond line\n"
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "one"}\n\n"two"\n{"text": "three", "id": 3}\n', encoding="utf-8")
    assert text.file_text(jsonl) == "one\ntwo\nthree"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "one"}\nnot json\n', "line 2 is not JSON"),
        ('{"body": "x"}\n', 'line 1: expected a JSON string or an object with a "text"'),
    ],
)
def test_file_text_names_the_bad_jsonl_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        text.file_text(path)


def test_file_text_refuses_missing_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no calibration text file"):
        text.file_text(tmp_path / "absent.txt")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        text.file_text(binary)


def test_calibration_feeds_take_the_users_text():
    class Characters:
        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": [ord(c) for c in text]}

    feeds = text.calibration_feeds(Characters(), ["input_ids", "attention_mask"], 4, 2, "abcdefgh")
    assert [feed["input_ids"].tolist() for feed in feeds] == [[[97, 98, 99, 100]], [[101, 102, 103, 104]]]
    assert all(feed["attention_mask"].tolist() == [[1, 1, 1, 1]] for feed in feeds)
