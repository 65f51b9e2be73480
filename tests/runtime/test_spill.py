"""SpilledSamples: what is written reads back bit for bit, and the temporary files go as their samples are replaced."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.runtime.spill import SpilledSamples

DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int8, np.bool_, ml_dtypes.bfloat16]


@st.composite
def sample_arrays(draw) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.sampled_from(["hidden", "mask", "pos", "x.1", ""]), max_size=4, unique=True))
    arrays = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
        bits = draw(hnp.arrays(np.dtype(f"u{dtype.itemsize}"), shape))  # every bit pattern, NaNs included
        arrays[name] = bits.view(dtype)
    return arrays


def _same(read: dict[str, np.ndarray], written: dict[str, np.ndarray]) -> None:
    assert list(read) == list(written)
    for name, array in written.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape
        assert read[name].tobytes() == array.tobytes()


def _open_files(samples: SpilledSamples) -> int:
    files = {id(entry.file): entry.file for entry in samples._entries if entry.file is not None}
    return sum(not file.handle.closed for file in files.values())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), sample_arrays()), max_size=20))
def test_every_sample_reads_back_what_was_last_written_to_it(writes):
    expected: list[dict[str, np.ndarray]] = [{} for _ in range(4)]
    with SpilledSamples(4) as samples:
        for sample, arrays in writes:
            samples[sample] = arrays
            expected[sample] = {name: array.copy() for name, array in arrays.items()}
            for index in range(4):
                _same(samples[index], expected[index])
        assert samples.nbytes == sum(array.nbytes for arrays in expected for array in arrays.values())


def test_arrays_read_back_are_new_and_writes_copy():
    hidden = np.arange(12, dtype=np.float32).reshape(3, 4)
    with SpilledSamples(1) as samples:
        samples[0] = {"hidden": hidden}
        hidden[0, 0] = 99  # the store wrote the bytes, not a reference
        first, second = samples[0]["hidden"], samples[0]["hidden"]
        assert first[0, 0] == 0 and first is not second
        first[1, 1] = -1
        assert samples[0]["hidden"][1, 1] == 5


def test_non_contiguous_and_object_arrays():
    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    words = np.array(["a", None, 3], dtype=object)
    with SpilledSamples(2) as samples:
        samples[1] = {"strided": strided, "words": words}
        read = samples[1]
        np.testing.assert_array_equal(read["strided"], strided)
        assert read["words"] is words  # Python objects have no bytes to write: kept as they are
        assert samples.nbytes == strided.nbytes


def test_a_file_closes_once_every_sample_in_it_is_replaced():
    layer = [{"hidden": np.full((2, 3), value, np.float32)} for value in range(5)]
    with SpilledSamples(5) as samples:
        files_seen = []  # the files themselves, not their ids: a closed file's id may be taken again
        for generation in range(4):  # a sweep: every sample replaced once per layer, in order
            for sample, arrays in enumerate(layer):
                samples[sample] = {"hidden": arrays["hidden"] + generation}
                if not any(file is samples._writing for file in files_seen):
                    files_seen.append(samples._writing)
                assert _open_files(samples) <= 2  # this layer's file and the previous one's
            assert _open_files(samples) == 1
        assert len(files_seen) == 4
        assert all(file.handle.closed for file in files_seen[:-1])
    assert files_seen[-1].handle.closed
    assert samples[0] == {}


def test_writing_a_sample_again_starts_a_new_file_and_closes_the_emptied_one():
    with SpilledSamples(2) as samples:
        samples[0] = {"x": np.ones(3)}
        first = samples._writing
        samples[0] = {"x": np.zeros(3)}  # sample 0 was already written to the first file
        assert samples._writing is not first
        assert first.handle.closed  # nothing in it is read any more
        np.testing.assert_array_equal(samples[0]["x"], np.zeros(3))


def test_index_out_of_range():
    with SpilledSamples(2) as samples, pytest.raises(IndexError):
        samples[2] = {"x": np.ones(1)}


def test_an_unwritable_folder_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with SpilledSamples(1, directory=str(missing)) as samples, pytest.raises(OSError, match="TMPDIR"):
        samples[0] = {"x": np.ones(1)}


def test_a_failed_write_names_the_folder(monkeypatch, tmp_path):
    from lowbit.runtime import spill

    def full(handle, offset, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill, "_write_exactly", full)
    with SpilledSamples(1, directory=str(tmp_path)) as samples, pytest.raises(OSError, match=str(tmp_path)):
        samples[0] = {"x": np.ones(4)}
