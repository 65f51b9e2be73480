"""Per-sample arrays kept in temporary files instead of memory: the layer sweep's stream between two layers, the
budget sensitivity's float probabilities.

A layer sweep keeps, for every calibration sample, the values that enter the next decoder layer (samples x
tokens x hidden float32): on a small model at many samples that is a good part of what the whole run holds.
The sweep reads each sample once per layer and replaces it once, in order, so the values can wait on disk:
``SpilledSamples`` writes each sample's arrays to an unlinked temporary file (``tempfile.TemporaryFile`` in
``TMPDIR``: nothing is left behind, even when the process dies) and reads them back, bit for bit, when asked.
Only the sample being read or written is in memory. The operating system's page cache usually keeps the file
in RAM, outside this process, and hands it to whoever needs the memory more; on a ``tmpfs`` it stays in RAM.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np


def free_bytes(directory: str | None = None) -> int:
    """The bytes free on the file system of ``directory`` (default: the temporary files' folder)."""
    return shutil.disk_usage(directory or tempfile.gettempdir()).free


@dataclasses.dataclass(eq=False)
class _File:
    """One temporary file: the samples written to it, and how many of them no later write replaced."""

    handle: io.FileIO
    size: int = 0
    live: int = 0
    written: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One sample: its array names in order, each stored as (name, dtype, shape, offset) in ``file`` or kept in
    memory (``kept``: arrays of Python objects, which have no bytes to write)."""

    file: _File | None
    names: tuple[str, ...] = ()
    stored: tuple[tuple[str, np.dtype, tuple[int, ...], int], ...] = ()
    kept: tuple[tuple[str, np.ndarray], ...] = ()
    nbytes: int = 0


class SpilledSamples:
    """A fixed number of samples, each a dict of arrays (empty at first), stored in temporary files.

    ``samples[i]`` reads sample ``i`` back as new arrays; ``samples[i] = arrays`` writes them. Writes go to one
    file until a sample is written to it a second time, then to a new one (a sweep replacing every sample once per
    layer writes one file per layer); a file is closed, and its disk space freed, once every sample it held has been
    replaced. Not for use from several threads at once (reads and writes seek one shared handle).
    """

    def __init__(self, count: int, directory: str | None = None, what: str = "samples"):
        """``directory``: where the temporary files go (default ``tempfile``'s: ``TMPDIR``, else the system's);
        ``what``: what the samples are, as the errors name them."""
        self._entries = [_Entry(None)] * count
        self._directory = directory
        self._what = what
        self._writing: _File | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, sample: int) -> dict[str, np.ndarray]:
        entry = self._entries[sample]
        arrays = dict(entry.kept)
        for name, dtype, shape, offset in entry.stored:
            array = np.empty(shape, dtype)
            _read_exactly(entry.file.handle, offset, array.reshape(-1).view(np.uint8))
            arrays[name] = array
        return {name: arrays[name] for name in entry.names}

    def __setitem__(self, sample: int, arrays: Mapping[str, np.ndarray]) -> None:
        if sample < 0 or sample >= len(self._entries):
            raise IndexError(f"sample {sample} of {len(self._entries)}")
        file = self._writing
        if file is None or sample in file.written:
            file = self._start_file()
        stored, kept, nbytes = [], [], 0
        for name, value in arrays.items():
            array = np.asarray(value, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
            if array.dtype.hasobject:
                kept.append((name, array))
                continue
            try:
                _write_exactly(file.handle, file.size, array.reshape(-1).view(np.uint8))
            except OSError as error:  # e.g. the disk is full
                raise OSError(
                    f"could not write {array.nbytes} bytes of {self._what} to a temporary file in "
                    f"{self._folder()!r} ({error}); set TMPDIR to a folder with room for them"
                ) from error
            stored.append((name, array.dtype, array.shape, file.size))
            file.size += array.nbytes
            nbytes += array.nbytes
        old = self._entries[sample]
        self._entries[sample] = _Entry(file, tuple(arrays), tuple(stored), tuple(kept), nbytes)
        file.live += 1
        file.written.add(sample)
        self._release(old.file)

    @property
    def nbytes(self) -> int:
        """The bytes of every sample's stored arrays."""
        return sum(entry.nbytes for entry in self._entries)

    def close(self) -> None:
        """Close every file (each was unlinked when made: its space is freed); the samples read empty after."""
        files = {id(entry.file): entry.file for entry in self._entries if entry.file is not None}
        if self._writing is not None:
            files[id(self._writing)] = self._writing
        for file in files.values():
            file.handle.close()
        self._entries = [_Entry(None)] * len(self._entries)
        self._writing = None

    def __enter__(self) -> SpilledSamples:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start_file(self) -> _File:
        previous = self._writing
        try:
            handle = tempfile.TemporaryFile(dir=self._directory, buffering=0)
        except OSError as error:
            raise OSError(
                f"{self._what} are kept in temporary files in {self._folder()!r}, and none can be created there "
                f"({error}); set TMPDIR to a writable folder"
            ) from error
        self._writing = _File(handle)
        if previous is not None and previous.live == 0:
            previous.handle.close()
        return self._writing

    def _folder(self) -> str:
        return self._directory or tempfile.gettempdir()

    def _release(self, file: _File | None) -> None:
        if file is None:
            return
        file.live -= 1
        if file.live == 0 and file is not self._writing:
            file.handle.close()


def _write_exactly(handle: io.FileIO, offset: int, data: np.ndarray) -> None:
    handle.seek(offset)
    view = memoryview(data)
    while view.nbytes:
        written = handle.write(view)
        view = view[written:]


def _read_exactly(handle: io.FileIO, offset: int, data: np.ndarray) -> None:
    handle.seek(offset)
    view = memoryview(data)
    while view.nbytes:
        read = handle.readinto(view)
        if not read:
            raise OSError(f"a temporary file of the layer sweep ended {view.nbytes} bytes early")
        view = view[read:]
