"""ONNX Runtime sessions for lowbit models.

ONNX Runtime fuses per-OC ``DequantizeLinear(axis=0) + MatMul`` into ``com.microsoft::MatMulNBits``. That
kernel's default accuracy level (4) quantizes the *activations* to int8 on the fly, which adds its own
error on top of the weight quantization. ``matmulnbits_accuracy_level=0`` keeps activations in fp32:
use it to measure weight quantization alone (every accuracy figure lowbit reports does), and leave it
``None`` (ONNX Runtime's default) to measure deployment speed.

Sessions on in-memory models (``session_from_model``, ``session_from_proto``: calibration, the AdaDim
selectors, the sequential sweep) hand ONNX Runtime the model's external data files mapped into memory
under the names the model gives them, so that a relative location is read from the model's folder, not
from the process's working directory, and nothing is copied into the serialized model.

Models with fused ``lowbit::`` ops need lowbit's custom-op library (``kernels/build.py``).
``use_lowbit_ops=None`` registers it when it is built, ``True`` requires it, ``False`` never registers it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from lowbit.ir import files
from lowbit.kernels import _lib
from lowbit.runtime.memory import release_free_memory

#: ONNX Runtime's own exception types (Fail, InvalidArgument, ...): they share no base but Exception.
ORT_ERRORS = tuple(
    value for value in vars(_ort_state).values() if isinstance(value, type) and issubclass(value, Exception)
)

#: ``SessionOptions.add_session_config_entry`` pair: MatMul weights are not pre-packed. Pre-packing keeps a packed
#: copy of each weight for the session's lifetime, which pays for itself only over many runs; its results may
#: differ from the unpacked kernel's in the last bits.
NO_PREPACKING = ("session.disable_prepacking", "1")

#: ORT's error for a node of our domain when no library registered it.
_LOWBIT_OP_MISSING = re.compile(r"\blowbit:\w+\(-?\d+\) is not a registered function/op")


def session_options(
    intra_op_threads: int | None = None,
    matmulnbits_accuracy_level: int | None = None,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    use_lowbit_ops: bool | None = None,
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if use_lowbit_ops or (use_lowbit_ops is None and _lib.is_built()):
        options.register_custom_ops_library(str(_lib.library_path()))
    options.graph_optimization_level = optimization_level
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if matmulnbits_accuracy_level is not None:
        if matmulnbits_accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"matmulnbits_accuracy_level must be 0..4, got {matmulnbits_accuracy_level}")
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmulnbits_accuracy_level))
    return options


def session(
    path: str | os.PathLike,
    providers: list[str] | None = None,
    *,
    intra_op_threads: int | None = None,
    matmulnbits_accuracy_level: int | None = None,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    use_lowbit_ops: bool | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for a (lowbit-optimized or float) ONNX file, CPU by default."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ONNX file at {path!r}")
    options = session_options(intra_op_threads, matmulnbits_accuracy_level, optimization_level, use_lowbit_ops)
    try:
        return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        if use_lowbit_ops is None and not _lib.is_built() and _LOWBIT_OP_MISSING.search(str(error)):
            raise _lib.not_built_error() from error
        raise


def open_session(
    session_or_path: ort.InferenceSession | str | os.PathLike, inputs: Sequence[str], output: str
) -> ort.InferenceSession:
    """A session for the model (accuracy level 0 when opened from a path), checked to have these inputs and output."""
    if isinstance(session_or_path, ort.InferenceSession):
        model, name = session_or_path, "the session's model"
    else:
        model, name = session(session_or_path, matmulnbits_accuracy_level=0), repr(os.fspath(session_or_path))
    have_inputs = [value.name for value in model.get_inputs()]
    have_outputs = [value.name for value in model.get_outputs()]
    if sorted(have_inputs) != sorted(inputs) or output not in have_outputs:
        raise ValueError(
            f"{name} has inputs {have_inputs} and outputs {have_outputs}; expected inputs {list(inputs)} "
            f"and an output {output!r}"
        )
    return model


def external_data_dirs(model: ir.Model) -> dict[str, str]:
    """The folder (absolute) each external-data location of ``model`` is read from: ``{location: folder}``.

    ``ir.to_proto`` writes external tensors as references by location, relative to the model's folder; a
    session made from those bytes needs the folder (``session_from_proto``). One location read from two
    folders (a model put together from two files) cannot be told apart in the proto: refused.
    """
    dirs: dict[str, str] = {}
    for _, tensor in files.tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        folder = os.path.abspath(tensor.base_dir or os.curdir)
        if dirs.setdefault(tensor.location, folder) != folder:
            raise ValueError(
                f"external data location {tensor.location!r} is read from two folders ({dirs[tensor.location]!r} and "
                f"{folder!r}); save the model (lowbit.save) and load it again"
            )
    return dirs


def set_external_data_dirs(model: ir.Model, dirs: Mapping[str, str]) -> ir.Model:
    """Point the external tensors of ``model`` (e.g. a subgraph deserialized from an extracted proto, whose
    tensors have no folder) at the folders ``dirs`` gives for their locations; returns ``model``."""
    for _, tensor in files.tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and tensor.location in dirs:
            tensor.base_dir = dirs[tensor.location]
    return model


def proto_tensors(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and tensor attribute of ``graph`` (or a function's nodes) and its subgraphs, sparse
    tensors' values and indices too (protobuf messages)."""
    sparse = list(getattr(graph, "sparse_initializer", ()))
    yield from getattr(graph, "initializer", ())
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                sparse.append(attribute.sparse_tensor)
            sparse.extend(attribute.sparse_tensors)
            if attribute.HasField("g"):
                yield from proto_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from proto_tensors(subgraph)
    for tensor in sparse:
        yield from (tensor.values, tensor.indices)


#: External tensors up to this many bytes (what onnx.save keeps inline by default) are read into the proto:
#: shape inference (the ONNX checker's and ONNX Runtime's) cannot read the constants it needs (Reshape
#: shapes, axes) from external data.
SMALL_EXTERNAL_TENSOR = 1024


def external_location(tensor: onnx.TensorProto) -> str | None:
    """Where a proto tensor's data lies (its external data location), or None when it is inline."""
    if not onnx.external_data_helper.uses_external_data(tensor):
        return None
    return onnx.external_data_helper.ExternalDataInfo(tensor).location


def external_nbytes(tensor: onnx.TensorProto) -> tuple[int, int]:
    """(offset, length) in bytes of an external tensor's data (length from its shape when not stored)."""
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    length = info.length
    if not length:
        elements = int(np.prod(tensor.dims, dtype=np.int64))
        length = int(np.ceil(elements * ir.DataType(tensor.data_type).itemsize))
    return int(info.offset or 0), int(length)


#: Sessions sharing at least this many bytes of arrays trim the heap once made (``session_from_proto``); below it
#: (a layer's or a module's session) the freed copies are soon reused by the next allocations.
TRIM_AFTER_SHARED_BYTES = 64 * 2**20


def session_from_proto(
    proto: onnx.ModelProto,
    data_dirs: Mapping[str, str],
    options: ort.SessionOptions | None = None,
    providers: list[str] | None = None,
    *,
    consume: bool = False,
    memory_files: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` on ``proto`` (CPU by default), its external data read from ``data_dirs``
    (``external_data_dirs`` of the model it was made from) whatever the working directory.

    ``memory_files``: external data locations held in memory (uint8 arrays, ``proto_sharing_initializers``), read
    before ``data_dirs``; a tensor that is a whole such array is shared with the session, not copied into it.

    ``consume``: empty ``proto`` (``Clear``) once it is serialized, before ONNX Runtime reads it, so that a proto
    holding the weights inline (made by ``ir.to_proto`` for this session only) is not a third copy of them
    beside the serialized bytes and the session's own.

    Each data file is memory-mapped read-only and given to ONNX Runtime under its location
    (``add_external_initializers_from_files_in_memory``): no copy of the weights goes into the serialized
    model. The maps are kept on the session (``_lowbit_data_files``) for its lifetime. External tensors of
    at most ``SMALL_EXTERNAL_TENSOR`` bytes are read into ``proto`` (in place), for shape inference.
    """
    options = session_options() if options is None else options
    external = [tensor for tensor in proto_tensors(proto.graph) if onnx.external_data_helper.uses_external_data(tensor)]
    files = _external_files(external, data_dirs, memory_files)
    locations = sorted(
        {
            onnx.external_data_helper.ExternalDataInfo(tensor).location
            for tensor in external
            if tensor.data_location == onnx.TensorProto.EXTERNAL
        }
    )
    buffers = [files[location] for location in locations]
    if locations:
        options.add_external_initializers_from_files_in_memory(locations, buffers, [buffer.size for buffer in buffers])
    shared, shared_locations = _share_in_memory_initializers(external, memory_files or {}, options)
    serialized = proto.SerializeToString()
    if consume:
        proto.Clear()
    sess = ort.InferenceSession(serialized, options, providers=providers or ["CPUExecutionProvider"])
    del serialized
    sess._lowbit_data_files = (buffers, shared)
    if sum(memory_files[location].size for location in shared_locations) >= TRIM_AFTER_SHARED_BYTES:
        # ONNX Runtime still reads every in-memory file's tensor into a copy while it builds the session, then
        # takes the shared one: the copies are freed, but the heap keeps their pages unless it is trimmed
        release_free_memory()
    return sess


class WeightFedSession:
    """An ONNX Runtime session whose weights are graph inputs, and the arrays fed to them at every run
    (``session_feeding_weights``). ``run`` takes feeds by name as ``InferenceSession.run`` does, ignores names
    the session does not take, and a feed named as a weight replaces it for that run."""

    def __init__(self, session: ort.InferenceSession, weights: dict[str, np.ndarray]):
        self.session = session
        self.weights = weights
        #: The inputs a caller feeds (the graph's inputs less the weights).
        self.input_names = [value.name for value in session.get_inputs() if value.name not in weights]
        self._takes = {value.name for value in session.get_inputs()}

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(outputs), self._inputs(feeds))

    def run_into(self, output: str, feeds: Mapping[str, np.ndarray], out: np.ndarray) -> np.ndarray:
        """``run([output], feeds)[0]`` written into ``out`` (its shape and type those of the output): ONNX Runtime
        writes the output there instead of allocating it and handing over a copy, which for an LM's logits is the
        largest buffer of a run. Returns ``out``."""
        binding = self.session.io_binding()
        for name, value in self._inputs(feeds).items():  # OrtValues over the arrays' own memory: no copy
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        binding.bind_ortvalue_output(output, ort.OrtValue.ortvalue_from_numpy(out))
        self.session.run_with_iobinding(binding)
        return out

    def _inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every input of a run: the weights, replaced where ``feeds`` names them, and the feeds the session takes."""
        return {**self.weights, **{name: value for name, value in feeds.items() if name in self._takes}}


def session_feeding_weights(
    proto: onnx.ModelProto,
    data_dirs: Mapping[str, str],
    options: ort.SessionOptions | None = None,
    providers: list[str] | None = None,
    *,
    memory_files: Mapping[str, np.ndarray] | None = None,
    also: Collection[str] = (),
) -> WeightFedSession:
    """A session on ``proto`` (emptied) in which every external initializer of the main graph of a type in
    ``FEEDABLE_TYPES``, and every initializer named in ``also``, is a graph input instead, fed at every run the array it would
    have been read from: a view of ``memory_files`` (``proto_sharing_initializers``) or of its data file, mapped.

    Why: ONNX Runtime copies the initializers while it builds a session, and constant folding keeps tensors made
    from them (a tied head's transposed table) for the session's lifetime. Fed as inputs, a session of a whole
    model costs its activations alone, for sessions that live beside the model (the end-to-end sensitivity). Its
    results may differ in the last bits from a session holding the same weights as initializers."""
    also = set(also)
    declared = {value.name for value in proto.graph.input}
    initializers = list(proto.graph.initializer)
    files = _external_files(
        [tensor for tensor in initializers if onnx.external_data_helper.uses_external_data(tensor)],
        data_dirs,
        memory_files,
    )
    weights: dict[str, np.ndarray] = {}
    kept = []
    for tensor in initializers:
        data_type = ir.DataType(tensor.data_type)
        if data_type in FEEDABLE_TYPES and tensor.data_location == onnx.TensorProto.EXTERNAL:
            offset, length = external_nbytes(tensor)
            location = onnx.external_data_helper.ExternalDataInfo(tensor).location
            dtype = data_type.numpy().newbyteorder("<")
            array = files[location][offset : offset + length].view(dtype).reshape(tuple(tensor.dims))
            weights[tensor.name] = array if array.flags.aligned else array.copy()
        elif tensor.name in also:
            weights[tensor.name] = onnx.numpy_helper.to_array(tensor)
        else:
            kept.append(tensor)
            continue
        if tensor.name not in declared:
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    session = session_from_proto(proto, data_dirs, options, providers, consume=True, memory_files=memory_files)
    return WeightFedSession(session, weights)


def _external_files(
    external: list[onnx.TensorProto], data_dirs: Mapping[str, str], memory_files: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """``{location: uint8 array}`` for every location ``external`` (proto tensors) reads: ``memory_files`` first,
    else the file in its folder of ``data_dirs`` mapped read-only. Tensors of at most ``SMALL_EXTERNAL_TENSOR``
    bytes are read into their proto (in place), where shape inference can read them."""
    files: dict[str, np.ndarray] = {}
    for tensor in external:
        location = onnx.external_data_helper.ExternalDataInfo(tensor).location
        if location not in files:
            files[location] = _external_file(tensor, location, data_dirs, memory_files)
        offset, length = external_nbytes(tensor)
        if length <= SMALL_EXTERNAL_TENSOR:  # inline, where ONNX Runtime's shape inference can read it
            tensor.raw_data = files[location][offset : offset + length].tobytes()
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return files


def _external_file(
    tensor: onnx.TensorProto,
    location: str,
    data_dirs: Mapping[str, str],
    memory_files: Mapping[str, np.ndarray] | None,
) -> np.ndarray:
    """The bytes ``tensor`` reads from ``location``: held in ``memory_files``, else its file in ``data_dirs`` mapped."""
    if memory_files is not None and location in memory_files:
        return memory_files[location]
    if location not in data_dirs:
        raise ValueError(f"tensor {tensor.name!r} reads external data {location!r}, whose folder is not known")
    path = os.path.join(data_dirs[location], location)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"external data file {path!r} of tensor {tensor.name!r} is missing")
    return np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)


def _share_in_memory_initializers(
    external: list[onnx.TensorProto], memory_files: Mapping[str, np.ndarray], options: ort.SessionOptions
) -> tuple[list[ort.OrtValue], list[str]]:
    """Hand ONNX Runtime each whole-file tensor of ``memory_files`` (``proto_sharing_initializers``' arrays) as a
    shared initializer (``add_initializer``), which it reads in place: from the in-memory file alone it would copy
    the tensor into the session. Returns the OrtValues, which must live as long as the session, and their
    locations."""
    shared, locations = [], []
    for tensor in external:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = onnx.external_data_helper.ExternalDataInfo(tensor).location
        buffer = memory_files.get(location)
        if buffer is None or external_nbytes(tensor) != (0, buffer.size):
            continue
        dtype = ir.DataType(tensor.data_type).numpy().newbyteorder("<")
        if dtype.kind not in "fiu":  # a type of ml_dtypes (bfloat16), which OrtValue does not take: copied
            continue
        value = ort.OrtValue.ortvalue_from_numpy(buffer.view(dtype).reshape(tuple(tensor.dims)))
        options.add_initializer(tensor.name, value)
        shared.append(value)
        locations.append(location)
    return shared, locations


def session_from_model(
    model: ir.Model, options: ort.SessionOptions | None = None, providers: list[str] | None = None
) -> ort.InferenceSession:
    """``session_from_proto`` of an in-memory ``onnx_ir`` model, its external data read from its own folders."""
    return session_from_proto(ir.to_proto(model), external_data_dirs(model), options, providers)


#: ONNX element types whose NumPy arrays (``onnx_ir``'s ``numpy()``) hold exactly the bytes ONNX stores.
NUMPY_BYTES_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
    }
)

#: The types ``session_feeding_weights`` feeds: NumPy's bytes are ONNX's and ONNX Runtime takes the arrays (not
#: ml_dtypes' bfloat16).
FEEDABLE_TYPES = NUMPY_BYTES_TYPES - {ir.DataType.BFLOAT16}

#: Prefix of the in-memory locations ``share_initializers`` gives ONNX Runtime (no file has such a name).
_SHARED_LOCATION = "lowbit-in-memory/"


class MemoryFiles(Mapping[str, np.ndarray]):
    """``{location: uint8 array}`` of in-memory external data (``proto_sharing_initializers``). A lazily computed
    initializer (``ir.LazyTensor``: a weight ``lowbit.load`` reads from its file, a layer split's clusters) is
    computed when a session first reads its location and kept until ``pop``, or until ``release`` lets go of it
    (computed again if read again): a sweep of the model's layers holds one layer's, not all of them at once."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}
        self._deferred: dict[str, ir.LazyTensor] = {}

    def put(self, location: str, array: np.ndarray | ir.LazyTensor) -> None:
        if isinstance(array, ir.LazyTensor):
            self._deferred[location] = array
        else:
            self._arrays[location] = array.reshape(-1).view(np.uint8)

    def __getitem__(self, location: str) -> np.ndarray:
        if location not in self._arrays:
            self.put(location, np.ascontiguousarray(self._deferred[location].numpy()))
        return self._arrays[location]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._arrays, *self._deferred]))

    def __len__(self) -> int:
        return len(self._arrays.keys() | self._deferred.keys())

    def __contains__(self, location: object) -> bool:
        return location in self._arrays or location in self._deferred

    def pop(self, location: str, default=None) -> np.ndarray | None:
        """Let go of ``location`` (its array, or what would compute it)."""
        self._deferred.pop(location, None)
        return self._arrays.pop(location, default)

    def release(self, keep: Collection[str]) -> None:
        """Let go of the computed arrays of the lazily computed locations not in ``keep``; a later read computes them
        again (a weight read from its file: read again, or shared with whoever still holds it)."""
        for location in [location for location in self._arrays if location in self._deferred and location not in keep]:
            del self._arrays[location]


def proto_sharing_initializers(model: ir.Model) -> tuple[onnx.ModelProto, MemoryFiles]:
    """``ir.to_proto(model)`` whose large in-memory initializers are external references to ``model``'s own
    arrays, and ``{location: uint8 array}`` for ``session_from_proto``'s ``memory_files``.

    ``ir.to_proto`` would copy every inline weight into the proto, ``SerializeToString`` again, and ONNX Runtime
    would parse them into its own: handed over as in-memory external data instead, the session reads the model's
    arrays (for a model read from a file, views of its bytes) and none of those copies is made. Only main-graph
    tensors of types whose NumPy bytes are ONNX's are shared, as the model holds them when this is called (the
    session must be made before the model's weights change, and kept no longer than they are).
    """
    shared: dict[str, tuple[ir.Value, np.ndarray | ir.LazyTensor]] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.dtype not in NUMPY_BYTES_TYPES:
            continue
        if tensor.nbytes <= SMALL_EXTERNAL_TENSOR:
            continue
        if isinstance(tensor, ir.LazyTensor):  # computed when a session reads it
            shared[name] = (value, tensor)
            continue
        array = np.ascontiguousarray(tensor.numpy())
        if array.dtype.byteorder != ">" and array.nbytes == tensor.nbytes:
            shared[name] = (value, array)
    saved = {name: value.const_value for name, (value, _) in shared.items()}
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    try:  # serialized without their data (onnx_ir skips an initializer without a value, with a warning)
        logger.setLevel(logging.ERROR)
        for value, _ in shared.values():
            value.const_value = None
        proto = ir.to_proto(model)
    finally:
        logger.setLevel(level)
        for name, (value, _) in shared.items():
            value.const_value = saved[name]
    memory = MemoryFiles()
    for name, (value, array) in shared.items():
        location = f"{_SHARED_LOCATION}{len(memory)}"
        memory.put(location, array)
        reference = proto.graph.initializer.add(
            name=name,
            dims=tuple(array.shape),
            data_type=value.const_value.dtype.value,
            data_location=onnx.TensorProto.EXTERNAL,
        )
        for key, entry in (("location", location), ("offset", "0"), ("length", str(value.const_value.nbytes))):
            reference.external_data.add(key=key, value=entry)
    return proto, memory
