"""lowbit.load and lowbit.save around the main graph's weights (``lowbit.ir.proto_stream``): the file parsed
without them says what ``onnx.load`` says, the model loaded is the one the whole parse gave, the file saved is
``ir.save``'s byte for byte, a broken file is refused by name, and neither holds a second copy of the weights."""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit import api
from lowbit.ir import files as model_files
from lowbit.ir import proto_stream
from lowbit.runtime.session import NUMPY_BYTES_TYPES, SMALL_EXTERNAL_TENSOR
from tests import factories

ITEMSIZES = {dtype.value: int(dtype.itemsize) for dtype in NUMPY_BYTES_TYPES}
#: (ONNX type, NumPy type of the values drawn) of the initializers drawn; int4 and bool are not read from the
#: file (not in NUMPY_BYTES_TYPES) and must come out as the whole parse gives them.
TYPES = {
    "float32": (TensorProto.FLOAT, np.float32),
    "float16": (TensorProto.FLOAT16, np.float16),
    "int64": (TensorProto.INT64, np.int64),
    "uint8": (TensorProto.UINT8, np.uint8),
    "bool": (TensorProto.BOOL, np.bool_),
    "int4": (TensorProto.INT4, np.int8),
    "bfloat16": (TensorProto.BFLOAT16, np.uint16),
}


def _tensor(name: str, kind: str, shape: list[int], seed: int, raw: bool, doc: str, meta: bool) -> TensorProto:
    elem, numpy_type = TYPES[kind]
    rng = np.random.default_rng(seed)
    if kind in ("float32", "float16"):
        values = (rng.standard_normal(shape) * 100).astype(numpy_type)
    else:  # integers in the type's range; int4 and bfloat16 as their bits
        high = {"int64": 2**40, "uint8": 256, "bool": 2, "int4": 16, "bfloat16": 2**16}[kind]
        values = rng.integers(0, high, size=shape).astype(numpy_type)
    if kind in ("int4", "bfloat16"):
        flat = values.reshape(-1).astype(np.uint8 if kind == "int4" else np.uint16)
        if kind == "int4":  # two 4-bit values a byte, low nibble first
            flat = np.pad(flat, (0, flat.size % 2))
            flat = (flat[0::2] & 0xF) | (flat[1::2] << 4)
        tensor = helper.make_tensor(name, elem, shape, flat.tobytes(), raw=True)
    elif raw:
        tensor = numpy_helper.from_array(values, name)
    else:
        tensor = helper.make_tensor(name, elem, shape, values.reshape(-1).tolist())  # float_data, int32_data, ...
    if doc:
        tensor.doc_string = doc
    if meta:
        tensor.metadata_props.add(key="source", value=name)
    return tensor


tensors = st.lists(
    st.tuples(
        st.sampled_from(sorted(TYPES)),
        st.lists(st.sampled_from([0, 1, 3, 40, 300]), max_size=2),  # up to 720 kB, the threshold at 1 kB
        st.integers(0, 2**16),
        st.sampled_from([True, True, False]),  # raw_data (else the typed field)
        st.sampled_from(["", "a weight"]),
        st.sampled_from([False, False, True]),  # metadata_props
    ),
    min_size=1,
    max_size=6,
)


def _model(initializers, constant, branch, ir_version: int = 10) -> onnx.ModelProto:
    """Identity(x) -> y, drawn initializers (unused), a Constant node holding a drawn tensor, and an If whose
    branches hold an initializer of their own; doc strings and metadata at every level."""
    weights = [_tensor(f"w{i}", *spec) for i, spec in enumerate(initializers)]
    kept = _tensor("kv", *constant)
    constant_type = helper.make_tensor_value_info("k", kept.data_type, list(kept.dims))

    def body(name: str, seed: int) -> onnx.GraphProto:
        inner = _tensor(f"{name}_w", "float32", [branch], seed, True, "", False)
        return helper.make_graph(
            [helper.make_node("Identity", [f"{name}_w"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [branch])],
            [inner],
        )

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["y"], name="identity", doc_string="passes x through"),
            helper.make_node("Constant", [], ["k"], name="constant", value=kept),
            helper.make_node(
                "If", ["c"], ["z"], name="choose", then_branch=body("then", 1), else_branch=body("else", 2)
            ),
        ],
        "drawn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            constant_type,
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [branch]),
        ],
        weights,
        doc_string="a drawn graph",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=ir_version)
    model.doc_string = "a drawn model"
    helper.set_model_props(model, {"author": "hypothesis"})
    return model


models = st.builds(
    _model,
    tensors,
    st.tuples(
        st.sampled_from(sorted(TYPES)),
        st.lists(st.sampled_from([0, 1, 2, 40, 300]), max_size=2),
        st.integers(0, 2**16),
        st.booleans(),
        st.just(""),
        st.just(False),
    ),
    st.integers(1, 400),
)


def _expected_weights(proto: onnx.ModelProto, min_bytes: int, itemsizes: dict[int, int] | None) -> list[int]:
    """Positions of the initializers that ``read_without_weights`` must leave in the file (``itemsizes`` None:
    every plain one, whatever its type and length)."""
    plain = {"dims", "data_type", "name", "raw_data", "doc_string"}
    positions = []
    for index, tensor in enumerate(proto.graph.initializer):
        fields = {field.name for field, _ in tensor.ListFields()}
        itemsize = None if itemsizes is None else itemsizes.get(tensor.data_type)
        exact = itemsize is not None and len(tensor.raw_data) == int(np.prod(tensor.dims)) * itemsize
        if (
            "raw_data" in fields
            and fields <= plain
            and len(tensor.raw_data) > min_bytes
            and (itemsizes is None or exact)
        ):
            positions.append(index)
    return positions


def _check_read(path: pathlib.Path, min_bytes: int, itemsizes: dict[int, int] | None = ITEMSIZES) -> None:
    """``read_without_weights`` against ``onnx.load`` of the same file."""
    whole = onnx.load(path)
    data, weights = proto_stream.read_without_weights(path, min_bytes, itemsizes)
    assert [weight.index for weight in weights] == _expected_weights(whole, min_bytes, itemsizes)
    content = path.read_bytes()
    for weight in weights:
        tensor = whole.graph.initializer[weight.index]
        assert content[weight.offset : weight.offset + weight.length] == tensor.raw_data
        tensor.raw_data = b""
    assert onnx.load_model_from_string(data).SerializeToString() == whole.SerializeToString()


@settings(max_examples=150, deadline=None)
@given(models, st.sampled_from([0, 16, SMALL_EXTERNAL_TENSOR]), st.sampled_from([ITEMSIZES, None]))
def test_the_file_read_without_weights_parses_as_onnx_load_reads_it_less_those_bytes(model, min_bytes, itemsizes):
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "model.onnx"
        onnx.save(model, path)
        _check_read(path, min_bytes, itemsizes)


def _loaded_as_before(path: pathlib.Path) -> ir.Model:
    """What ``lowbit.load`` gave before it read weights from the file itself: the whole file parsed."""
    model = ir.serde.deserialize_model(onnx.load(path, load_external_data=False))
    api._own_tensor_bytes(model)
    return model


def _same_tensor(new, old) -> None:
    if isinstance(new, ir.LazyTensor):  # a large weight, read from the file when asked for: the same tensor then
        new = new.raw()  # its function: the tensor it reads
    assert type(new) is type(old)
    assert (new.name, new.dtype, new.shape, new.doc_string) == (old.name, old.dtype, old.shape, old.doc_string)
    assert new.metadata_props == old.metadata_props
    assert new.tobytes() == old.tobytes()
    if isinstance(new, ir.Tensor):
        assert new.numpy().dtype == old.numpy().dtype
        assert new.numpy().flags.writeable == old.numpy().flags.writeable


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@settings(max_examples=60, deadline=None)
@given(models)
def test_load_gives_the_model_the_whole_parse_gave_and_save_writes_what_ir_save_writes(model):
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        onnx.save(model, folder / "model.onnx")
        loaded, before = lowbit.load(folder / "model.onnx"), _loaded_as_before(folder / "model.onnx")
        pairs = list(zip(model_files.tensors(loaded), model_files.tensors(before), strict=True))
        for (name, new), (old_name, old) in pairs:
            assert name == old_name
            _same_tensor(new, old)
        ir.save(before, folder / "ir_save.onnx")
        lowbit.save(loaded, folder / "lowbit_save.onnx")
        assert _digest(folder / "lowbit_save.onnx") == _digest(folder / "ir_save.onnx")


@pytest.mark.parametrize(
    "recipe",
    [None, lowbit.Recipe(bits=4, group_size=8), lowbit.Recipe(bits=3, group_size=8, fused=True)],
    ids=["float", "w4", "w3-fused"],
)
def test_save_writes_what_ir_save_writes_and_leaves_the_model_as_it_was(recipe, tmp_path):
    model = factories.mlp() if recipe is None else lowbit.optimize(factories.mlp(), recipe).model
    before = [(value, value.const_value) for value in model.graph.initializers.values()]
    ir.save(model, tmp_path / "ir_save.onnx")
    lowbit.save(model, tmp_path / "lowbit_save.onnx")
    assert _digest(tmp_path / "lowbit_save.onnx") == _digest(tmp_path / "ir_save.onnx")
    assert all(value.const_value is tensor for value, tensor in before)
    _check_read(tmp_path / "lowbit_save.onnx", 0)


def test_threads_saving_one_model_each_write_it_whole(tmp_path):
    """The stand-ins swapped in while a model is serialized are never what another save of it reads."""
    model = factories.mlp()
    ir.save(model, tmp_path / "ir_save.onnx")
    threads = [
        threading.Thread(target=proto_stream.write_model, args=(model, tmp_path / f"{index}.onnx"))
        for index in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {_digest(tmp_path / f"{index}.onnx") for index in range(4)} == {_digest(tmp_path / "ir_save.onnx")}


def _wire(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def test_a_group_field_is_skipped_as_protobuf_skips_it(tmp_path):
    """Unknown fields in the deprecated group encoding (nested too) parse; the walk steps over them."""
    group = bytes([(100 << 3 | 3) & 0x7F | 0x80, 100 >> 4, 0x08, 0x01, 0x5B, 0x5C])  # 100{ 1: 1, 11{ } }
    group += bytes([(100 << 3 | 4) & 0x7F | 0x80, 100 >> 4])
    path = tmp_path / "model.onnx"
    path.write_bytes(_wire(ir.to_proto(factories.mlp())) + group)
    _check_read(path, 0)


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda data, raw: data[: raw + 10], id="inside-a-weight"),
        pytest.param(lambda data, raw: data[: len(data) - 1], id="last-byte"),
        pytest.param(lambda data, raw: data + bytes([0x3A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]), id="length-past-the-end"),
        pytest.param(lambda data, raw: data + bytes([0x80] * 11), id="varint-of-11-bytes"),
        pytest.param(lambda data, raw: data + bytes([0x0C]), id="end-of-a-group-never-started"),
        pytest.param(lambda data, raw: data + bytes([0x0E]), id="wire-type-6"),
    ],
)
def test_a_broken_file_is_refused_by_name_and_leaves_nothing(cut, tmp_path):
    data = _wire(ir.to_proto(factories.mlp()))
    raw = data.index(factories.mlp().graph.initializers["w1"].const_value.tobytes())
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "broken.onnx"
    path.write_bytes(cut(data, raw))
    with pytest.raises(ValueError, match="broken.onnx.* is not a readable ONNX model"):
        proto_stream.read_without_weights(path, 0, ITEMSIZES)
    with pytest.raises(ValueError, match="broken.onnx"):
        lowbit.load(path)
    assert [entry.name for entry in tmp_path.rglob("*")] == ["in", "broken.onnx"]


def _checker_cases() -> dict[str, onnx.ModelProto]:
    """Models whose large initializers the checker must see as the file holds them: each is refused."""
    proto = ir.to_proto(factories.mlp())
    cases = {}
    mismatch = onnx.ModelProto()
    mismatch.CopyFrom(proto)
    weight = next(tensor for tensor in mismatch.graph.initializer if tensor.name == "w1")
    weight.CopyFrom(numpy_helper.from_array(np.ones((30, 72), np.float32), "w1"))
    del mismatch.graph.value_info[:]
    cases["shape-mismatch"] = mismatch
    for name, small in (("repeated-name-large", (40, 72)), ("repeated-name-small", (2,))):
        repeated = onnx.ModelProto()
        repeated.CopyFrom(proto)
        repeated.graph.initializer.append(numpy_helper.from_array(np.ones(small, np.float32), "w1"))
        cases[name] = repeated
    old = onnx.ModelProto()
    old.CopyFrom(proto)
    old.ir_version = 3  # initializers must be graph inputs
    del old.opset_import[:]
    old.opset_import.append(helper.make_opsetid("", 8))
    cases["ir3-initializer-not-an-input"] = old
    overridable = onnx.ModelProto()
    overridable.CopyFrom(proto)
    overridable.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [72, 40]))
    cases["input-declared-otherwise"] = overridable
    return cases


@pytest.mark.parametrize("case", sorted(_checker_cases()))
def test_the_checker_says_of_the_file_without_weights_what_it_says_of_the_file(case, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_checker_cases()[case], path)
    whole = api._file_checker_complaint(path)
    assert whole is not None
    assert api._checker_complaint(path, *api._parse(path)) == whole


def test_a_valid_model_passes_the_checker_without_its_weights(tmp_path):
    path = tmp_path / "model.onnx"
    ir.save(factories.mlp(), path)
    proto, weights = api._parse(path)
    assert weights and api._check(api._checked_without_weights(proto, weights)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory from /proc/self/status")
def test_load_and_save_hold_one_copy_of_the_weights(tmp_path):
    """Peak resident memory of load and save, each from its own reset of the peak (``clear_refs``), in a fresh
    process, after a first load and save of a small model: load above one copy of the weights by a little, save
    by less than a third of it."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((1024, 1024), np.float32), f"w{i}") for i in range(24)]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "model.onnx")
    ir.save(factories.mlp(), tmp_path / "small.onnx")
    script = textwrap.dedent(f"""
        import lowbit.api

        small = lowbit.api.load({str(tmp_path / "small.onnx")!r})  # first use: lazy imports, caches
        lowbit.api.save(small, {str(tmp_path / "small.out.onnx")!r})

        def status(key):
            with open("/proc/self/status") as lines:
                return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))

        def reset_peak():
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")

        reset_peak()
        before = status("VmRSS:")
        model = lowbit.api.load({str(tmp_path / "model.onnx")!r})
        load = status("VmHWM:") - before
        reset_peak()
        before = status("VmRSS:")
        lowbit.api.save(model, {str(tmp_path / "saved.onnx")!r})
        print(load, status("VmHWM:") - before)
    """)
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    if completed.returncode and "clear_refs" in completed.stderr:
        pytest.skip("this system cannot reset the peak resident memory (/proc/self/clear_refs)")
    assert completed.returncode == 0, completed.stderr
    load, save = map(int, completed.stdout.split())
    size = sum(len(tensor.raw_data) for tensor in weights)
    assert load < 1.2 * size and save < 0.3 * size, (load / size, save / size)
