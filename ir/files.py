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

from lowbit.ir import proto_stream

SOURCE_KEY = "lowbit.source_files"
#: ``lowbit.save`` writes the tensors into ``<name>.data`` beside the model past this many bytes of them.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: ``ir.save`` keeps tensors below this many bytes inline even when it writes an external data file.
INLINE_TENSOR_BYTES = 256
#: The longest file name (bytes) a file system takes, so the longest external data location ``save`` writes.
LONGEST_FILE_NAME = 255
#: Node metadata in which torch.onnx records the export itself (source stack traces with the exporting machine's
#: paths, the FX node, class names): about 1.5 kB a node, read by no pass or tool. CleanupPass drops it; the
#: module path (``pkg.torch.onnx.name_scopes``), which the passes and the viewer read, stays.
EXPORT_PROVENANCE_KEYS = frozenset(
    {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "namespace"}
)


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


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of every tensor's data (initializers and tensor attributes, subgraphs included)."""
    return sum(tensor.nbytes for _, tensor in tensors(model) if tensor is not None)


def file_bytes(model: ir.Model, external_data: str | None = None) -> int:
    """Bytes that ``ir.save(model, path, external_data=external_data)`` writes: the model file (the graph's
    nodes, names, shapes and metadata, and the inline tensors) plus the data file, found without copying a
    tensor: the initializers are serialized as data-less headers and their data's bytes added. Exact for
    an inline file; with ``external_data`` an upper bound (every offset counted with the most digits)."""
    initializers = [value for value in model.graph.initializers.values() if value.const_value is not None]
    originals = [value.const_value for value in initializers]
    for value, tensor in zip(initializers, originals):
        value.const_value = ir.ExternalTensor(
            "",
            None,
            None,
            tensor.dtype,
            shape=tensor.shape,
            name=value.name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
        )
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in zip(initializers, originals):
            value.const_value = tensor
    # a header holds one external_data entry {"location": ""} and data_location = EXTERNAL (2 bytes)
    placeholder = _field_bytes(_field_bytes(len("location")) + _field_bytes(0)) + 2
    largest_offset = str(tensor_bytes(model))
    graph, data_file = proto.graph.ByteSize(), 0
    for header, tensor in zip(proto.graph.initializer, originals):
        size = header.ByteSize() - placeholder
        if external_data is not None and tensor.nbytes >= INLINE_TENSOR_BYTES:
            entries = (("location", external_data), ("offset", largest_offset), ("length", str(tensor.nbytes)))
            size += 2 + sum(_field_bytes(_field_bytes(len(k)) + _field_bytes(len(v.encode()))) for k, v in entries)
            data_file += tensor.nbytes
        else:
            size += _field_bytes(tensor.nbytes)  # raw_data
        graph += _field_bytes(size) - _field_bytes(header.ByteSize())
    return proto.ByteSize() - _field_bytes(proto.graph.ByteSize()) + _field_bytes(graph) + data_file


def export_provenance_bytes(model: ir.Model) -> int:
    """Bytes the ``EXPORT_PROVENANCE_KEYS`` entries of every node (subgraphs included) take in the saved file."""
    return sum(
        _field_bytes(_field_bytes(len(key.encode())) + _field_bytes(len(value.encode())))
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for key, value in node.metadata_props.items()
        if key in EXPORT_PROVENANCE_KEYS
    )


def _field_bytes(size: int) -> int:
    """Bytes of a length-delimited protobuf field (field number below 16) whose content is ``size`` bytes."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def files_read(model: ir.Model) -> set[str]:
    """Resolved paths of the file the model was loaded from and of every external data file it reads."""
    paths = set(model.meta.get(SOURCE_KEY, set()))
    for _, tensor in tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            paths.add(str((pathlib.Path(tensor.base_dir or os.curdir) / tensor.location).resolve()))
    return paths


def model_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus every external data file it names, each counted once (the file is parsed
    without the bytes of any plain tensor, ``proto_stream.parse_without_weights``: only the locations are read,
    so that sizing a written model holds no copy of its packed weights)."""
    path = pathlib.Path(path)
    proto, _ = proto_stream.parse_without_weights(path, 0, None)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    read = files_read(model) | {str(path.resolve())}
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
