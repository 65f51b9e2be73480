"""The public API: load, export, optimize, save, and the Recipe that says how to quantize."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.ir import files as model_files
from lowbit.ir import proto_stream
from lowbit.passes import pipelines
from lowbit.passes.recipe import Recipe
from lowbit.passes.report import OptimizeReport
from lowbit.runtime import session as runtime_session
from lowbit.runtime.calibration import CalibrationStats
from lowbit.runtime.memory import release_free_memory

#: Above this many bytes of tensors, ``save`` writes them to an external data file (protobuf's 2 GB cap).


@dataclasses.dataclass
class OptimizeResult:
    model: ir.Model
    report: OptimizeReport


def _external_files(model: ir.Model, base_dir: pathlib.Path) -> set[str]:
    """Check every external-data reference stays inside ``base_dir`` and its file holds the data; return the files."""
    files: set[str] = set()
    root = base_dir.resolve()
    for name, tensor in model_files.tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = pathlib.Path(tensor.location)
        if location.is_absolute():
            raise ValueError(f"tensor {name!r} points to an absolute external-data path {tensor.location!r}")
        target = (root / location).resolve()  # resolves '..' and symlinks
        if not target.is_relative_to(root):
            raise ValueError(f"tensor {name!r} points outside the model's folder: {tensor.location!r} -> {target}")
        if not target.is_file():
            raise FileNotFoundError(f"external data file {str(target)!r} of tensor {name!r} is missing")
        if target.stat().st_nlink > 1:  # onnx_ir and the ONNX checker refuse to read such files
            raise ValueError(
                f"external data file {str(target)!r} of tensor {name!r} is a hard link; copy the file instead"
            )
        end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if target.stat().st_size < end:
            raise ValueError(
                f"external data file {str(target)!r} holds {target.stat().st_size} bytes; tensor {name!r} needs bytes up to {end}"
            )
        files.add(str(target))
    return files


#: The checker's shape inference cannot read the constants it needs (Reshape shapes, axes) from external data.
_EXTERNAL_CONSTANTS_COMPLAINT = "Cannot parse data from external tensors"


def _check(model: pathlib.Path | bytes, full_check: bool = True) -> str | None:
    try:
        onnx.checker.check_model(model if isinstance(model, bytes) else str(model), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return str(error).strip()
    return None


def _checker_complaint(path: pathlib.Path, proto: onnx.ModelProto, weights: list[proto_stream.Weight]) -> str | None:
    """What ``onnx.checker`` (with strict shape inference) finds wrong with the file, or None.

    Checked first without the weights that ``load`` reads from the file itself (``_checked_without_weights``),
    which needs no copy of them: a model that passes so passes whole. Otherwise (or where that check could
    differ) the file is checked whole, so that any complaint is the file's own.
    """
    stand_in = _checked_without_weights(proto, weights)
    if stand_in is not None and _check(stand_in) is None:
        return None
    return _file_checker_complaint(path)


def _checked_without_weights(proto: onnx.ModelProto, weights: list[proto_stream.Weight]) -> bytes | None:
    """``proto`` (whose ``weights`` are empty) serialized for the checker with those initializers made graph
    inputs of their type and shape; None where the checker could then say otherwise than on the file.

    What the checker checks of such a tensor (a plain raw-data tensor whose bytes fill its shape) holds, and
    shape inference reads no value of a tensor that large (``SMALL_EXTERNAL_TENSOR``), as with external data.
    Not so where the IR version is below 4 (initializers must be inputs there), a weight's name is also an
    input's or another initializer's, or the model has external data (the checker would look for it in the
    working directory).
    """
    if not weights or proto.ir_version < 4 or any(_external_proto_tensors(proto)):
        return None
    left_out = {weight.index for weight in weights}
    names = collections.Counter(
        [tensor.name for tensor in proto.graph.initializer] + [value.name for value in proto.graph.input]
    )
    tensors = [tensor for index, tensor in enumerate(proto.graph.initializer) if index in left_out]
    if any(names[tensor.name] > 1 for tensor in tensors):
        return None
    check = onnx.ModelProto()
    check.CopyFrom(proto)
    del check.graph.initializer[:]
    check.graph.initializer.extend(
        tensor for index, tensor in enumerate(proto.graph.initializer) if index not in left_out
    )
    check.graph.input.extend(
        onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims) for tensor in tensors
    )
    return check.SerializeToString()


def _external_proto_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The tensors of ``proto`` stored as external data: in graphs, subgraphs and functions, sparse ones too."""
    for graph in (proto.graph, *proto.functions):
        for tensor in runtime_session.proto_tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                yield tensor


def _file_checker_complaint(path: pathlib.Path) -> str | None:
    """What ``onnx.checker`` (with strict shape inference) finds wrong with the file, read by the checker.

    A file whose small constants (shapes, axes) are external data too (``onnx.save(...,
    save_as_external_data=True, size_threshold=0)``) is valid, but the checker's shape inference cannot read
    them: it is then checked without shape inference, and shape inference (as strict) runs on a copy
    with those constants read inline and the large tensors left on disk.
    """
    complaint = _check(path)
    if complaint is None or _EXTERNAL_CONSTANTS_COMPLAINT not in complaint:
        return complaint
    structural = _check(path, full_check=False)
    if structural is not None:
        return structural
    try:
        proto = onnx.load(path, load_external_data=False)
        for tensor in runtime_session.proto_tensors(proto.graph):
            if not onnx.external_data_helper.uses_external_data(tensor):
                continue
            if runtime_session.external_nbytes(tensor)[1] <= runtime_session.SMALL_EXTERNAL_TENSOR:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
    except Exception:
        return complaint
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as error:
        return str(error).strip()
    return None


def _check_opsets_and_names(model: ir.Model, path: pathlib.Path) -> None:
    """What the checker lets through but ONNX Runtime refuses: unknown default opsets, repeated node names."""
    newest = onnx.defs.onnx_opset_version()
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is not None and version > newest:
        raise ValueError(f"{str(path)!r} declares opset {version}; the newest this onnx knows is {newest}")
    for graph in model.graphs():
        names = collections.Counter(node.name for node in graph if node.name)
        repeated = sorted(name for name, count in names.items() if count > 1)
        if repeated:
            raise ValueError(
                f"{str(path)!r}: node names {repeated[:5]} are used more than once (ONNX Runtime refuses that)"
            )


def load(path: str | os.PathLike, *, checker: bool = True) -> ir.Model:
    """Load an ONNX file as an ``onnx_ir.Model``, checked: it must pass ``onnx.checker`` (strict shape
    inference), and its external data must lie inside the model's folder and hold the tensors' bytes.

    ``checker=False`` skips ``onnx.checker`` only (the other checks stay): for graphs that ONNX Runtime runs
    but the checker refuses, such as the genai builder's, which puts its contrib op
    ``SimplifiedLayerNormalization`` in the ONNX domain.

    The file is parsed without the main graph's large weights (``_parse``); each of those is read from the file
    whenever a pass asks for its values (``_read_weights``), so that the model holds none of them until a pass
    does, and a pass that replaces a weight (quantization, one layer after another) never held the others. The
    file is kept open for that (a file moved or deleted afterwards is still read; one changed in place is
    refused, naming it). The other tensors hold their bytes themselves (``_own_tensor_bytes``), not the parsed
    proto, which is dropped."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
    proto, weights = _parse(path)
    complaint = _checker_complaint(path, proto, weights) if checker else None
    if not proto.opset_import or not proto.graph.output:
        raise ValueError(f"{str(path)!r} is not a usable ONNX model: it has no opset import or no graph outputs")
    sparse = [tensor.values.name or tensor.indices.name for tensor in proto.graph.sparse_initializer]
    if sparse:
        raise ValueError(
            f"{str(path)!r} has sparse initializers ({', '.join(sparse[:5])}), which lowbit does not read: store them "
            "dense (onnx.numpy_helper.to_array of the dense tensor) or as Constant nodes with a sparse_value"
        )
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # onnx_ir's message names the graph only; the checker's says what is wrong
        raise ValueError(f"{str(path)!r} is not a valid ONNX model: {complaint or error}") from error
    ir.external_data.set_base_dir(model.graph, path.parent)
    sources = _external_files(model, path.parent) | {str(path.resolve())}  # before the checker: clearer messages
    if complaint:
        raise ValueError(f"{str(path)!r} is not a valid ONNX model: {complaint}")
    _check_opsets_and_names(model, path)
    _read_weights(model, proto, weights, path)
    _own_tensor_bytes(model)
    del proto  # nothing reads it any more
    release_free_memory()  # the parsed proto's pages, resident in the heap until handed back
    model.meta[model_files.SOURCE_KEY] = sources
    return model


def _parse(path: pathlib.Path) -> tuple[onnx.ModelProto, list[proto_stream.Weight]]:
    """The file's ModelProto with the ``raw_data`` of the main graph's large plain initializers empty, and where
    their bytes lie in the file (``proto_stream.parse_without_weights``)."""
    itemsizes = {dtype.value: int(dtype.itemsize) for dtype in runtime_session.NUMPY_BYTES_TYPES}
    return proto_stream.parse_without_weights(path, runtime_session.SMALL_EXTERNAL_TENSOR, itemsizes)


def _read_weights(
    model: ir.Model, proto: onnx.ModelProto, weights: list[proto_stream.Weight], path: pathlib.Path
) -> None:
    """Give each main-graph initializer that ``_parse`` left empty a tensor read from the file whenever its values
    are asked for (``ir.LazyTensor``, not cached: its readers at one time share one array, ``_WeightReader``), as
    ``_own_tensor_bytes`` would make it from parsed bytes. Read, not mapped: a mapped file's pages count as the
    process's memory. Of initializers with one name, the model holds the last (``onnx_ir``), read only if empty."""
    if not weights:
        return
    reader = _WeightReader(path)
    names = [tensor.name for tensor in proto.graph.initializer]
    last = {name: index for index, name in enumerate(names)}
    for weight in weights:
        name = names[weight.index]
        if last[name] != weight.index:
            continue
        tensor = model.graph.initializers[name].const_value
        dtype, dims, doc_string = tensor.dtype, tuple(tensor.raw.dims), tensor.doc_string or None
        read = functools.partial(reader.tensor, weight, name, dtype, dims, doc_string)
        model.graph.initializers[name].const_value = ir.LazyTensor(
            read, dtype, ir.Shape(dims), name=name, doc_string=doc_string
        )


class _WeightReader:
    """The file ``lowbit.load`` read a model from, held open (a file moved or deleted afterwards is still read) for
    its weights' lazy tensors, which share it; closed when the last of them is gone. A tensor's bytes are read once
    while anything holds them: its readers at one time (a layer's session, its plan, a sensitivity session of the
    rest of the model) share one array, as they shared the model's own when it held them. A file changed in place
    since it was loaded (another size or modification time) is refused, naming it and the tensor."""

    def __init__(self, path: pathlib.Path):
        self._path = path
        self._file = open(path, "rb", buffering=0)  # closed with the reader
        weakref.finalize(self, self._file.close)
        self._lock = threading.Lock()  # one position in the file
        self._identity = self._stat()
        self._alive: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()  # by offset

    def _stat(self) -> tuple[int, int]:
        status = os.fstat(self._file.fileno())
        return status.st_size, status.st_mtime_ns

    def tensor(
        self, weight: proto_stream.Weight, name: str, dtype: ir.DataType, dims: tuple[int, ...], doc_string: str | None
    ) -> ir.Tensor:
        """Tensor ``name`` (``weight``: where its bytes lie), as an ``ir.Tensor`` over a read-only array: the one its
        other readers hold, else read now."""
        with self._lock:
            data = self._alive.get(weight.offset)
            if data is None:
                data = self._alive[weight.offset] = self._read(weight, name)
        return _plain_tensor(data, dtype, dims, name, doc_string)

    def _read(self, weight: proto_stream.Weight, name: str) -> np.ndarray:
        """The bytes of ``weight`` read now (under the reader's lock: one position in the file)."""
        data = np.empty(weight.length, np.uint8)
        view, done = memoryview(data), 0
        if self._stat() != self._identity:
            raise ValueError(
                f"{str(self._path)!r} changed after lowbit.load read it (tensor {name!r} is read from it when "
                "needed): load it again"
            )
        self._file.seek(weight.offset)
        while done < weight.length:  # a raw read may return fewer bytes than asked
            count = self._file.readinto(view[done:])
            if not count:
                raise ValueError(f"{str(self._path)!r} was cut short after lowbit.load read it (tensor {name!r})")
            done += count
        return data


#: The fields of a TensorProto whose tensor ``_own_tensor_bytes`` turns into a NumPy array: what ``ir.Tensor``
#: writes back, so that the saved file is the same.
_PLAIN_TENSOR_FIELDS = frozenset({"dims", "data_type", "name", "raw_data", "doc_string"})


def _own_tensor_bytes(model: ir.Model) -> None:
    """Give every tensor that reads the parsed proto (onnx_ir's ``TensorProtoTensor``) bytes of its own.

    Under protobuf's upb backend, reading ``raw_data`` copies it: each ``numpy()`` of such a tensor (calibration,
    planning, every session made from the model) made another copy of each weight, and one tensor kept the
    whole parsed proto alive. A plain tensor (raw bytes of a type NumPy holds exactly) becomes an ``ir.Tensor``
    over one copy of its bytes, which serializes to the same TensorProto; any other gets a proto of its own.
    """

    def owned(tensor):
        if not isinstance(tensor, ir.serde.TensorProtoTensor):
            return tensor
        proto = tensor.raw
        fields = {field.name for field, _ in proto.ListFields()}
        if (
            "raw_data" in fields
            and fields <= _PLAIN_TENSOR_FIELDS
            and tensor.dtype in runtime_session.NUMPY_BYTES_TYPES
        ):
            data = np.frombuffer(proto.raw_data, np.uint8)
            return _plain_tensor(data, tensor.dtype, tuple(proto.dims), tensor.name, tensor.doc_string or None)
        copy = onnx.TensorProto()
        copy.CopyFrom(proto)
        return ir.serde.TensorProtoTensor(copy)

    for graph in model.graphs():
        for value in graph.initializers.values():
            value.const_value = owned(value.const_value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        _own_attribute_tensors(node, owned)
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            _own_attribute_tensors(node, owned)


def _plain_tensor(
    data: np.ndarray, dtype: ir.DataType, dims: tuple[int, ...], name: str, doc_string: str | None
) -> ir.Tensor:
    """An ``ir.Tensor`` over ``data`` (the raw bytes of a plain tensor, uint8, made read-only) with the tensor's type,
    shape, name and doc string: it serializes to the same TensorProto."""
    data.flags.writeable = False  # as parsed bytes are
    array = data.view(dtype.numpy().newbyteorder("<")).reshape(dims)
    return ir.Tensor(array, dtype=dtype, name=name, doc_string=doc_string)


def _own_attribute_tensors(node: ir.Node, owned) -> None:
    for name, attribute in list(node.attributes.items()):
        if attribute.is_ref() or attribute.type not in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
            continue
        if attribute.type == ir.AttributeType.TENSOR:
            value = owned(attribute.value)
        else:
            value = [owned(tensor) for tensor in attribute.value]
        node.attributes[name] = ir.Attr(name, attribute.type, value, doc_string=attribute.doc_string)


def export(module, example_args: tuple, **kwargs) -> ir.Model:
    """Export a ``torch.nn.Module`` with the torch.onnx dynamo exporter (see ``lowbit.ir.export``)."""
    from lowbit.ir.export import export as export_module

    return export_module(module, example_args, **kwargs)


def optimize(
    model: ir.Model,
    recipe: Recipe | None = None,
    calibration: Iterable[Mapping[str, np.ndarray]] | CalibrationStats | None = None,
) -> OptimizeResult:
    """Run the portable pipeline for ``recipe`` on ``model``.

    ``calibration``: feed dicts for the float model (e.g. token windows), or statistics already
    collected with ``lowbit.runtime.calibration.collect`` on the same graph. Needed by
    ``method="gptq"`` and ``axis="adadim"``; with RTN it adds each weight's output error to the report.
    The passes work **in place**: ``result.model`` is ``model``, transformed (load the file again to
    keep a float copy); an ``onnx.ModelProto`` is converted first and left as it is. ``result.report``
    lists per-pass and per-weight statistics.
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)  # unambiguous: the result is this new model
    if not isinstance(model, ir.Model):
        raise TypeError(
            f"optimize() takes an onnx_ir.Model (see lowbit.load) or an onnx.ModelProto, got {type(model).__name__}"
        )
    recipe = Recipe() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise TypeError(f"optimize() takes a lowbit.Recipe (e.g. lowbit.Recipe(bits=4)), got {type(recipe).__name__}")
    _check_calibration(calibration)
    if recipe.needs_calibration and calibration is None:
        raise ValueError(
            f"{', '.join(recipe.calibration_reasons)} needs calibration data: "
            "optimize(model, recipe, calibration=[{input_name: array}, ...])"
        )
    report = OptimizeReport(recipe=dataclasses.asdict(recipe))
    passes = pipelines.portable_pipeline(recipe, calibration=calibration)
    model = pipelines.run_pipeline(model, passes, report)
    return OptimizeResult(model, report)


def _detach_external_data(model: ir.Model) -> list:
    """Replace every tensor of ``model`` that reads an external data file (initializers and tensor
    attributes, subgraphs included) by a lazy tensor that reads the same bytes when serialized, so that
    ``ir.save`` writes them inline or into the output's own data file instead of referencing the input's
    file. Nothing is read here; returns the undo steps (``_restore``)."""
    undo = []

    def lazy(tensor: ir.ExternalTensor) -> ir.LazyTensor:
        return ir.LazyTensor(
            lambda: tensor,
            tensor.dtype,
            tensor.shape,
            name=tensor.name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
        )

    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                undo.append((value, "const_value", value.const_value))
                value.const_value = lazy(value.const_value)
        for node in graph:
            for name, attribute in list(node.attributes.items()):
                if attribute.is_ref():
                    continue
                if attribute.type == ir.AttributeType.TENSOR and isinstance(attribute.value, ir.ExternalTensor):
                    replacement = ir.Attr(name, attribute.type, lazy(attribute.value), doc_string=attribute.doc_string)
                elif attribute.type == ir.AttributeType.TENSORS and any(
                    isinstance(t, ir.ExternalTensor) for t in attribute.value
                ):
                    tensors = [lazy(t) if isinstance(t, ir.ExternalTensor) else t for t in attribute.value]
                    replacement = ir.Attr(name, attribute.type, tensors, doc_string=attribute.doc_string)
                else:
                    continue
                undo.append((node.attributes, name, attribute))
                node.attributes[name] = replacement
    return undo


def _restore(undo: list) -> None:
    for owner, key, original in reversed(undo):
        if key == "const_value":
            owner.const_value = original
        else:
            owner[key] = original


def _check_calibration(calibration) -> None:
    """``calibration`` is None, collected statistics, or an iterable of feed dicts ``{input name: array}``."""
    if calibration is None or isinstance(calibration, CalibrationStats):
        return
    if (
        isinstance(calibration, Mapping)
        or isinstance(calibration, (str, bytes, np.ndarray))
        or not isinstance(calibration, Iterable)
    ):
        raise TypeError(
            "calibration must be a list of feed dicts [{input_name: array}, ...] (one per batch) or statistics from "
            f"lowbit.runtime.calibration.collect, got {type(calibration).__name__}"
            + ("; wrap a single feed dict in a list" if isinstance(calibration, Mapping) else "")
        )


def save(model: ir.Model | onnx.ModelProto, path: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` atomically to ``path``; tensors go to ``<name>.data`` beside it past ~1.8 GB.

    The output stands alone: tensors that the model still reads from its input's external data file (a
    bias or norm weight left in float) are written inline, or into ``<name>.data`` past the threshold,
    never referenced. An inline file is written as ``ir.save`` writes it, without a serialized copy of the
    weights (``proto_stream.write_model``). Refuses to write over the file the model was loaded from or any external data it
    reads. The files are written in a private folder beside the output and moved into place once
    complete, so an error, Ctrl-C or SIGTERM leaves the previous output and no partial file. ``model`` is
    unchanged (an ``onnx.ModelProto`` is accepted too).
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    elif not isinstance(model, ir.Model):
        raise TypeError(
            f"save() takes an onnx_ir.Model (from lowbit.load / optimize) or an onnx.ModelProto, got {type(model).__name__}"
        )
    path = model_files.check_writable_file(path, "output", suffix=".onnx")
    external = f"{path.name}.data" if model_files.tensor_bytes(model) > model_files.EXTERNAL_DATA_THRESHOLD else None
    targets = [path] + ([path.parent / external] if external else [])
    model_files.refuse_input_files(targets, model_files.files_read(model), "model")
    undo = _detach_external_data(model)
    staging = None
    try:
        with _cleanup_on_sigterm():
            staging = pathlib.Path(tempfile.mkdtemp(prefix=".lowbit-save-", dir=path.parent))  # unique per call
            if external:
                ir.save(model, staging / path.name, external_data=external)
                os.replace(staging / external, path.parent / external)
            else:
                proto_stream.write_model(model, staging / path.name)  # what ir.save writes, without copies
            os.replace(staging / path.name, path)
    except OSError as error:  # name the output, not the staging file (errno keeps the subclass)
        raise OSError(error.errno, f"cannot write {str(path)!r}: {error.strerror}") from error
    finally:
        _restore(undo)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return path


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while writing, so the ``finally`` that removes partial files runs (as it
    does for Ctrl-C). Only where Python can: the main thread, with no handler of the caller's installed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
