"""The files a model reads, and the guard every writer uses so that no output lands on one of them.

``lowbit.load`` records the model file and its external data files in ``model.meta[SOURCE_KEY]``; a
model built in memory may still read external tensors. Everything lowbit writes (the model, its data
file, the report, the HTML view, the per-pass dumps) is checked with ``refuse_input_files`` first.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator

import onnx_ir as ir

SOURCE_KEY = "lowbit.source_files"


def tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol | None]]:
    """(name, tensor) of every initializer and tensor attribute (``TENSOR`` and ``TENSORS``), in the main
    graph and its subgraphs."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            yield value.name, value.const_value
        for node in graph:
            for attribute in node.attributes.values():
                if attribute.is_ref():
                    continue
                if attribute.type == ir.AttributeType.TENSOR:
                    yield f"{node.name}.{attribute.name}", attribute.value
                elif attribute.type == ir.AttributeType.TENSORS:
                    for index, tensor in enumerate(attribute.value or ()):
                        yield f"{node.name}.{attribute.name}[{index}]", tensor


def files_read(model: ir.Model) -> set[str]:
    """Resolved paths of the file the model was loaded from and of every external data file it reads."""
    paths = set(model.meta.get(SOURCE_KEY, set()))
    for _, tensor in tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            paths.add(str((pathlib.Path(tensor.base_dir or os.curdir) / tensor.location).resolve()))
    return paths


def model_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus every external data file it names, each counted once (the tensors are
    not read, only their locations)."""
    path = pathlib.Path(path)
    read = files_read(ir.load(path)) | {str(path.resolve())}
    return sum(pathlib.Path(file).stat().st_size for file in read)


def refuse_input_files(targets: Iterable[str | os.PathLike], protected: set[str], what: str = "output") -> None:
    """Raise if any of ``targets`` is one of the ``protected`` files (``files_read`` of the inputs)."""
    for target in targets:
        if str(pathlib.Path(target).resolve()) in protected:
            raise ValueError(f"refusing to overwrite {str(target)!r} with the {what}: the input model reads that file")


def check_writable_file(path: str | os.PathLike, what: str = "output", suffix: str | None = None) -> pathlib.Path:
    """Fail before any work if ``path`` cannot be a file we write: the right suffix, a name that fits the
    file system, a folder that exists (and is a folder), and not itself a folder."""
    path = pathlib.Path(path)
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{what} path {str(path)!r} must end in {suffix}")
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"{what} folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} path {str(path)!r}: {str(parent)!r} is a file, not a folder")
    limit = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    size = len(os.fsencode(path.name))
    if size > limit:
        raise ValueError(f"{what} file name {path.name[:40]!r}... is {size} bytes; this file system allows {limit}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} path {str(path)!r} is a folder")
    return path
