"""An ONNX file's protobuf wire form around the main graph's weights, so that neither ``lowbit.load`` nor
``lowbit.save`` holds a second copy of them.

A model file is a ModelProto: its field 7 is the graph, a GraphProto whose field 5 lists the initializers, each
a TensorProto whose field 9 (``raw_data``) holds the tensor's bytes. Parsing the file with protobuf copies every
weight into the message (and reading ``raw_data`` copies it again); serializing a model with ``onnx_ir`` copies
every weight into a message and then into bytes. Here the wire form is walked instead, reading and writing only
the fields around the weights:

- ``read_without_weights`` gives the file's bytes with the ``raw_data`` of the main graph's large plain tensors
  emptied (the enclosing lengths fixed), small enough to parse, and where each emptied tensor's bytes lie in the
  file, for the caller to read into arrays of its own.
- ``write_model`` writes a model byte for byte as ``ir.save`` writes it inline: the model is serialized with
  the main graph's raw-data initializers empty, and each tensor's bytes are written in their place, from its
  own array where it holds one.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import BinaryIO, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DOC_STRING = 1, 2, 8, 9, 12
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)


class Weight(NamedTuple):
    """A main-graph initializer whose ``raw_data`` ``read_without_weights`` emptied: its position among the
    graph's initializers, and the offset and length of its bytes in the file."""

    index: int
    offset: int
    length: int


class _Tensor(NamedTuple):
    """An initializer field of the graph: offsets of its length varint (after the key), its body and its end; of its
    ``raw_data`` length varint and bytes (when it has exactly one such field); whether it holds nothing but
    dims, data_type, name, doc_string and raw_data (what ``ir.Tensor`` writes back the same); its data type
    and element count (None for a negative dimension)."""

    length_at: int
    body: int
    end: int
    raw_length_at: int | None
    raw_data: int
    raw_bytes: int
    plain: bool
    data_type: int
    elements: int | None


class _Graph(NamedTuple):
    length_at: int
    body: int
    end: int
    tensors: list[_Tensor]


class _Data(NamedTuple):
    """Where ``write_model`` writes the bytes of the ``index``-th tensor it left empty."""

    index: int
    length: int


class _WireError(Exception):
    def __init__(self, reason: str, offset: int):
        super().__init__(f"{reason} (byte {offset})")


class _Reader:
    """Reads protobuf fields from a binary file by offset, never further than a message's end."""

    def __init__(self, file: BinaryIO):
        self.file, self.position = file, 0

    def varint(self, end: int) -> int:
        start, value, shift = self.position, 0, 0
        self.file.seek(start)
        while True:
            byte = self.file.read(1)
            if not byte or self.position >= end:
                raise _WireError("a varint runs past the end of its message", start)
            self.position += 1
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise _WireError("a varint is longer than 10 bytes", start)

    def key(self, end: int) -> tuple[int, int]:
        start = self.position
        key = self.varint(end)
        if key >> 3 == 0 or key & 7 > _FIXED32:
            raise _WireError(f"no protobuf field starts with {key:#x}", start)
        return key >> 3, key & 7

    def skip(self, count: int, end: int) -> None:
        if count > end - self.position:
            raise _WireError("a field runs past the end of its message", self.position)
        self.position += count

    def skip_value(self, number: int, wire: int, end: int) -> None:
        if wire == _VARINT:
            self.varint(end)
        elif wire == _FIXED64:
            self.skip(8, end)
        elif wire == _LENGTH:
            self.skip(self.varint(end), end)
        elif wire == _FIXED32:
            self.skip(4, end)
        elif wire == _START_GROUP:  # (deprecated) groups nest: skipped up to the matching end
            groups = [number]
            while groups:
                start = self.position
                inner, inner_wire = self.key(end)
                if inner_wire == _START_GROUP:
                    groups.append(inner)
                elif inner_wire == _END_GROUP:
                    if groups.pop() != inner:
                        raise _WireError(f"group {inner} ends inside another", start)
                else:
                    self.skip_value(inner, inner_wire, end)
        else:
            raise _WireError(f"group {number} ends without having started", self.position)

    def message(self, end: int) -> tuple[int, int, int]:
        """(length varint offset, body offset, end offset) of the length-delimited field whose key was just read;
        the reader is left at the body."""
        length_at = self.position
        length = self.varint(end)
        body = self.position
        self.skip(length, end)
        self.position = body
        return length_at, body, body + length


def _layout(reader: _Reader, end: int) -> list[_Graph]:
    """The graph fields of the ModelProto that fills the file up to ``end``, with their initializer fields."""
    graphs = []
    while reader.position < end:
        number, wire = reader.key(end)
        if number == _MODEL_GRAPH and wire == _LENGTH:
            length_at, body, graph_end = reader.message(end)
            graphs.append(_Graph(length_at, body, graph_end, list(_initializers(reader, graph_end))))
        else:
            reader.skip_value(number, wire, end)
    return graphs


def _initializers(reader: _Reader, end: int) -> Iterator[_Tensor]:
    while reader.position < end:
        number, wire = reader.key(end)
        if number == _GRAPH_INITIALIZER and wire == _LENGTH:
            yield _tensor(reader, *reader.message(end))
        else:
            reader.skip_value(number, wire, end)


def _tensor(reader: _Reader, length_at: int, body: int, end: int) -> _Tensor:
    dims, data_type, raws, plain = [], 0, [], True
    while reader.position < end:
        number, wire = reader.key(end)
        if number == _TENSOR_DIMS and wire == _VARINT:
            dims.append(reader.varint(end))
        elif number == _TENSOR_DIMS and wire == _LENGTH:  # packed
            _, _, packed_end = reader.message(end)
            while reader.position < packed_end:
                dims.append(reader.varint(packed_end))
        elif number == _TENSOR_DATA_TYPE and wire == _VARINT:
            data_type = reader.varint(end)
        elif number == _TENSOR_RAW_DATA and wire == _LENGTH:
            raw_length_at, raw_data, raw_end = reader.message(end)
            raws.append((raw_length_at, raw_data, raw_end - raw_data))
            reader.position = raw_end
        else:
            plain = plain and number in (_TENSOR_NAME, _TENSOR_DOC_STRING) and wire == _LENGTH
            reader.skip_value(number, wire, end)
    raw_length_at, raw_data, raw_bytes = raws[0] if len(raws) == 1 else (None, 0, 0)
    elements = math.prod(dims) if all(dim < 2**63 for dim in dims) else None  # int64: above is negative
    return _Tensor(
        length_at, body, end, raw_length_at, raw_data, raw_bytes, plain and len(raws) == 1, data_type, elements
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _size(pieces: list) -> int:
    return sum(piece.length if isinstance(piece, _Data) else len(piece) for piece in pieces)


def _rewritten(graphs: list[_Graph], size: int, lengths: Mapping[int, int]) -> list[range | bytes | _Data]:
    """The pieces of a ModelProto of ``size`` bytes whose initializers number ``index`` in ``lengths`` (counted
    across the graph fields in order) get ``raw_data`` of ``lengths[index]`` bytes: ranges of the source, new
    length varints, and ``_Data`` for the new bytes (none where the length is 0)."""
    pieces: list[range | bytes | _Data] = []
    position, index = 0, 0
    for graph in graphs:
        body: list[range | bytes | _Data] = []
        at = graph.body
        for tensor in graph.tensors:
            if index in lengths:
                length = lengths[index]
                tensor_body = [
                    range(tensor.body, tensor.raw_length_at),
                    _varint(length),
                    *([_Data(index, length)] if length else []),
                    range(tensor.raw_data + tensor.raw_bytes, tensor.end),
                ]
                body += [range(at, tensor.length_at), _varint(_size(tensor_body)), *tensor_body]
                at = tensor.end
            index += 1
        body.append(range(at, graph.end))
        pieces += [range(position, graph.length_at), _varint(_size(body)), *body]
        position = graph.end
    pieces.append(range(position, size))
    return [piece for piece in pieces if len(piece) or isinstance(piece, _Data)]


def read_without_weights(
    path: str | os.PathLike, min_bytes: int, itemsizes: Mapping[int, int] | None
) -> tuple[bytes, list[Weight]]:
    """The ModelProto bytes of the file at ``path`` with the ``raw_data`` of every main-graph initializer that
    ``ir.Tensor`` holds exactly emptied, and where each emptied tensor's bytes lie in the file.

    Emptied are the plain tensors (nothing but dims, data_type, name, doc_string and one ``raw_data``) of more
    than ``min_bytes``, of a data type in ``itemsizes`` (ONNX type number: bytes per element) whose bytes fill
    their shape exactly; with ``itemsizes`` None, of any data type and length (for a reader that wants the graph
    and the tensors' names, types, shapes and external locations, not their values). Every other field, subgraphs
    and tensor attributes included, is kept as it is. The file is read in small pieces, the weights not at all.
    Raises ValueError, naming the file, where the wire form is broken (what protobuf would refuse to parse in the
    parts walked here)."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        try:
            graphs = _layout(_Reader(file), size)
        except _WireError as error:
            raise ValueError(f"{str(path)!r} is not a readable ONNX model: {error}") from None
        weights = []
        tensors = (tensor for graph in graphs for tensor in graph.tensors)
        for index, tensor in enumerate(tensors):
            itemsize = None if itemsizes is None else itemsizes.get(tensor.data_type)
            exact = itemsize is not None and tensor.raw_bytes == (tensor.elements or 0) * itemsize
            if tensor.plain and tensor.raw_bytes > min_bytes and (itemsizes is None or exact):
                weights.append(Weight(index, tensor.raw_data, tensor.raw_bytes))
        pieces = _rewritten(graphs, size, {weight.index: 0 for weight in weights})
        data = bytearray(_size(pieces))
        view, at = memoryview(data), 0
        for piece in pieces:
            if isinstance(piece, bytes):
                view[at : at + len(piece)] = piece
            else:
                file.seek(piece.start)
                if file.readinto(view[at : at + len(piece)]) != len(piece):
                    raise ValueError(f"{str(path)!r} changed while it was read")
            at += len(piece)
    return bytes(data), weights


def parse_without_weights(
    path: str | os.PathLike, min_bytes: int, itemsizes: Mapping[int, int] | None
) -> tuple[onnx.ModelProto, list[Weight]]:
    """``read_without_weights`` parsed: the file's ModelProto with those weights empty, and where their bytes lie.
    A file that ``onnx.load`` reads as text (by its suffix: ``.json``, ``.textproto``, ...) is parsed whole, as
    it does. Raises ValueError, naming the file, where it cannot be parsed."""
    text = onnx.serialization.registry.get_format_from_file_extension(pathlib.Path(path).suffix)
    data, weights = (None, []) if text not in (None, "protobuf") else read_without_weights(path, min_bytes, itemsizes)
    try:
        proto = onnx.load(path, load_external_data=False) if data is None else onnx.load_model_from_string(data)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning subclasses, ...
        raise ValueError(f"{str(path)!r} is not a readable ONNX model: {error}") from error
    return proto, weights


#: Tensors that ``onnx_ir`` serializes from something other than their bytes (a proto, strings, a file reference).
_SERIALIZED_WHOLE = (ir.serde.TensorProtoTensor, ir.StringTensor, ir.ExternalTensor)
#: Held while a model's initializers are swapped for ``_header`` stand-ins, so that concurrent saves of one
#: model never read each other's stand-ins.
_STAND_IN_LOCK = threading.Lock()


def _empty() -> ir.Tensor:
    return ir.Tensor(np.empty(0, np.uint8))


def _header(tensor: ir.TensorProtocol) -> ir.LazyTensor:
    """A stand-in that ``onnx_ir`` serializes as it does ``tensor``, with empty ``raw_data``."""
    return ir.LazyTensor(
        _empty,
        tensor.dtype,
        tensor.shape,
        name=tensor.name,
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props),
    )


def _holds_its_bytes(tensor: ir.TensorProtocol) -> bool:
    """Whether ``tensor.tobytes()`` is the bytes of the array it holds (as written, no packing, little-endian)."""
    array = tensor.raw if type(tensor) is ir.Tensor else None
    return (
        isinstance(array, np.ndarray)
        and array.itemsize == tensor.dtype.itemsize
        and array.dtype.byteorder != ">"
        and sys.byteorder == "little"
    )


def _data(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """``tensor.tobytes()``, without a copy where the tensor holds its bytes in an array."""
    if _holds_its_bytes(tensor):
        return memoryview(np.ascontiguousarray(tensor.raw).reshape(-1).view(np.uint8))
    return tensor.tobytes()


def write_model(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` as ``ir.save(model, path)`` writes it (inline tensors), byte for byte, with no
    serialized copy of its main-graph weights: at most one tensor's bytes are copied at a time, and none of a
    tensor that holds them in an array.

    The model is serialized with every main-graph initializer that ``onnx_ir`` writes as ``raw_data`` swapped
    for a stand-in with empty data (the model is left as it was); each tensor's length goes into the enclosing
    length prefixes up front, and its bytes are written in place of the empty data."""
    values = [value for value in model.graph.initializers.values() if value.const_value is not None]
    with _STAND_IN_LOCK:
        tensors = [value.const_value for value in values]
        swapped = {}
        for index, (value, tensor) in enumerate(zip(values, tensors)):
            tensor.name = value.name  # as onnx_ir's serializer does
            if not isinstance(tensor, _SERIALIZED_WHOLE) and tensor.dtype != ir.DataType.STRING:
                swapped[index] = tensor
                value.const_value = _header(tensor)
        try:
            skeleton = ir.serde.serialize_model(model).SerializeToString()
        finally:
            for value, tensor in zip(values, tensors):
                value.const_value = tensor
    lengths = {
        index: tensor.nbytes if type(tensor) is ir.Tensor else len(tensor.tobytes())
        for index, tensor in swapped.items()
    }
    with io.BytesIO(skeleton) as source:
        graphs = _layout(_Reader(source), len(skeleton))
    pieces = _rewritten(graphs, len(skeleton), lengths)
    view = memoryview(skeleton)
    with open(path, "wb") as file:
        for piece in pieces:
            if isinstance(piece, range):
                file.write(view[piece.start : piece.stop])
            elif isinstance(piece, bytes):
                file.write(piece)
            else:
                data = _data(swapped[piece.index])
                if len(data) != piece.length:
                    raise RuntimeError(
                        f"tensor {swapped[piece.index].name!r} gave {len(data)} bytes, {piece.length} before"
                    )
                file.write(data)
                del data
