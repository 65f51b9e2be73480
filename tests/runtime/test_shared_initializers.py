"""Sessions that read the model's own weight arrays (in-memory external data) instead of copies."""

import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lowbit.runtime.session import (
    SMALL_EXTERNAL_TENSOR,
    external_location,
    proto_sharing_initializers,
    session_feeding_weights,
    session_from_proto,
)
from tests import factories
from tests.parity import serialized

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _location(proto: onnx.ModelProto, name: str) -> str | None:
    """Where the proto's initializer ``name`` reads its external data."""
    return external_location(next(t for t in proto.graph.initializer if t.name == name))


def test_large_initializers_are_references_to_the_models_arrays_and_the_outputs_are_the_same():
    model = factories.mlp()
    before = serialized(model)
    proto, memory = proto_sharing_initializers(model)
    assert serialized(model) == before  # the model is as it was, its values' constants restored
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    large = {
        name for name, value in model.graph.initializers.items() if value.const_value.nbytes > SMALL_EXTERNAL_TENSOR
    }
    assert external == large and large and len(memory) == len(large)
    assert proto.ByteSize() < sum(model.graph.initializers[name].const_value.nbytes for name in large)
    array = model.graph.initializers["w1"].const_value.numpy()
    location = _location(proto, "w1")
    np.testing.assert_array_equal(memory[location].view(array.dtype).reshape(array.shape), array)
    feeds = factories.feeds_for(model)
    shared = session_from_proto(proto, {}, memory_files=memory).run(None, feeds)
    plain = session_from_proto(ir.to_proto(model), {}).run(None, feeds)
    for left, right in zip(shared, plain):
        np.testing.assert_array_equal(left, right)


def test_a_lazily_computed_initializer_is_computed_when_a_session_reads_it_and_let_go_when_popped():
    """``ir.LazyTensor`` initializers (a layer split's clusters) are shared without being computed; a session that
    reads one computes it once, ``release`` lets go of its array unless kept (a later read computes it again), and
    ``pop`` lets go of it altogether."""
    model = factories.mlp()
    value = model.graph.initializers["w1"]
    array = value.const_value.numpy()
    computed = []

    def compute() -> ir.Tensor:
        computed.append(1)
        return ir.tensor(array.copy())

    value.const_value = ir.LazyTensor(compute, dtype=value.const_value.dtype, shape=value.const_value.shape)
    proto, memory = proto_sharing_initializers(model)
    location = _location(proto, "w1")
    assert not computed and location in memory and len(memory) == 2  # w1 and w2, neither copied
    feeds = factories.feeds_for(model)
    shared = session_from_proto(proto, {}, memory_files=memory).run(None, feeds)
    assert len(computed) == 1
    np.testing.assert_array_equal(memory[location].view(array.dtype).reshape(array.shape), array)
    assert len(computed) == 1  # kept until released or popped
    memory.release(keep={location})
    memory[location]
    assert len(computed) == 1
    memory.release(keep=())
    assert location in memory and len(memory) == 2 and len(computed) == 1  # let go of, not computed yet
    np.testing.assert_array_equal(memory[location].view(array.dtype).reshape(array.shape), array)
    assert len(computed) == 2
    before = len(memory)
    memory.release(keep=())  # w2, in memory from the start, cannot be computed again: kept
    assert len(memory) == before and all(memory[name].size for name in memory)
    value.const_value = ir.tensor(array)
    plain = session_from_proto(ir.to_proto(model), {}).run(None, feeds)
    for left, right in zip(shared, plain):
        np.testing.assert_array_equal(left, right)
    memory.pop(location)
    assert location not in memory and len(memory) == 1


#: Prelude of the memory scripts, each run in a fresh interpreter: ``status_mib`` reads /proc/self/status, and
#: ``chain(mib)`` is a model of ``mib`` MatMuls of 1 MiB weights, built as a pipeline runs (blocks under
#: LARGE_ALLOCATION_BYTES from glibc's heap). Each script prints the growth it measures per MiB of weights.
MEMORY_PRELUDE = """
import numpy as np
from lowbit.runtime.memory import map_large_allocations
from lowbit.runtime.session import proto_sharing_initializers
from tests import factories

def status_mib(key):
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(key + ":"))

def start_peak():  # VmRSS now; the peak (VmHWM) counts from here on
    before = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return before

def chain(mib):
    x = factories.graph_input("x", [1, 512])
    nodes, weights, value = [], [], x
    for i in range(mib):
        weights.append(factories.constant(f"w{i}", np.full((512, 512), 1.0 / 512, np.float32)))
        nodes.append(factories.node("MatMul", [value, weights[-1]], f"mm{i}"))
        value = nodes[-1].outputs[0]
    return factories.model([x], [value], nodes, weights), value.name

map_large_allocations()
"""


def grown_per_weight_mib(script: str) -> float:
    """What ``script`` (after ``MEMORY_PRELUDE``) prints, run in a fresh interpreter."""
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_PRELUDE + script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return float(completed.stdout)


SESSION_MEMORY = """
from lowbit.runtime.session import TRIM_AFTER_SHARED_BYTES, session_from_proto

mib = TRIM_AFTER_SHARED_BYTES // 2**20 + 16  # 16 MiB over the size that trims
model, _ = chain(mib)
proto, memory = proto_sharing_initializers(model)
before = status_mib("VmRSS")
session = session_from_proto(proto, {}, memory_files=memory)
print((status_mib("VmRSS") - before) / mib)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; glibc's heap")
def test_a_shared_session_does_not_keep_a_copy_of_the_weights_resident():
    """ONNX Runtime reads each in-memory file's tensor into a copy while it builds the session, then takes the
    shared array: the session must not leave those freed copies resident (it grows by a fraction of the weights)."""
    assert grown_per_weight_mib(SESSION_MEMORY) < 0.5


def test_a_session_feeding_weights_reads_the_models_arrays_and_a_feed_replaces_them():
    model = factories.mlp()
    feeds = factories.feeds_for(model)
    plain = session_from_proto(ir.to_proto(model), {}).run(None, feeds)
    proto, memory = proto_sharing_initializers(model)
    session = session_feeding_weights(proto, {}, memory_files=memory, also=["b2"])
    assert not proto.ByteSize()  # emptied once serialized
    # the external (large) weights and the one named; b1, small and inline, stays an initializer
    assert set(session.weights) == {"w1", "w2", "b2"} and session.input_names == ["x"]
    for name in ("w1", "w2"):  # views of the model's arrays, no copies
        assert any(np.shares_memory(session.weights[name], array) for array in memory.values())
    fed = session.run(["y"], {**feeds, "unused": np.zeros(1)})  # names the session does not take are ignored
    np.testing.assert_allclose(fed[0], plain[0], rtol=1e-6, atol=1e-6)
    w2 = model.graph.initializers["w2"].const_value.numpy()
    replaced = session.run(["y"], {**feeds, "w2": np.zeros_like(w2)})[0]
    np.testing.assert_array_equal(
        replaced, np.broadcast_to(model.graph.initializers["b2"].const_value.numpy(), replaced.shape)
    )
    assert session.run(["y"], feeds)[0].tolist() == fed[0].tolist()  # the replacement lasted one run


def test_running_into_a_buffer_writes_the_output_there_bit_for_bit():
    """``run_into`` gives ``run``'s output, in the caller's array (no output allocated per run), with the feeds and
    weight replacements ``run`` takes; a weight fed once stays replaced for that run only."""
    model = factories.mlp()
    feeds = factories.feeds_for(model)
    proto, memory = proto_sharing_initializers(model)
    session = session_feeding_weights(proto, {}, memory_files=memory, also=["b2"])
    expected = session.run(["y"], feeds)[0]
    out = np.full_like(expected, np.nan)
    assert session.run_into("y", {**feeds, "unused": np.zeros(1)}, out) is out
    np.testing.assert_array_equal(out, expected)
    w2 = model.graph.initializers["w2"].const_value.numpy()
    replaced = {**feeds, "w2": np.asfortranarray(w2 * 0.5)}  # any memory order: fed as a contiguous array
    np.testing.assert_array_equal(session.run_into("y", replaced, out), session.run(["y"], replaced)[0])
    np.testing.assert_array_equal(session.run_into("y", feeds, out), expected)


def test_a_session_feeding_weights_maps_a_models_data_file(tmp_path):
    model = factories.mlp()
    feeds = factories.feeds_for(model)
    expected = session_from_proto(ir.to_proto(model), {}).run(None, feeds)[0]
    ir.save(model, tmp_path / "m.onnx", external_data="m.data", size_threshold_bytes=0)
    loaded = ir.load(tmp_path / "m.onnx")
    session = session_feeding_weights(ir.to_proto(loaded), {"m.data": str(tmp_path)})
    assert {"w1", "w2"} <= set(session.weights)
    assert all(isinstance(session.weights[name].base, np.ndarray) for name in ("w1", "w2"))  # views of the map
    np.testing.assert_allclose(session.run(["y"], feeds)[0], expected, rtol=1e-6, atol=1e-6)


FED_SESSION_MEMORY = """
from lowbit.runtime.session import session_feeding_weights

mib = 160  # the session and its run add about 12 MiB whatever the weights: enough weights to tell a copy from that
model, output = chain(mib)
proto, memory = proto_sharing_initializers(model)
before = start_peak()
session = session_feeding_weights(proto, {}, memory_files=memory)
session.run([output], {"x": np.ones((1, 512), np.float32)})
print((status_mib("VmHWM") - before) / mib)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets /proc/self/status's peak")
def test_a_session_feeding_weights_never_holds_a_copy_of_them():
    """Not even while it is built (where ``session_from_proto`` copies each tensor for a moment): the peak
    grows by a small fraction of the weights."""
    assert grown_per_weight_mib(FED_SESSION_MEMORY) < 0.15


def test_a_session_feeding_weights_keeps_a_type_numpy_cannot_feed_as_an_initializer():
    """ONNX Runtime takes no bfloat16 array (ml_dtypes): such a weight stays an initializer, shared in memory."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(ml_dtypes.bfloat16)
    x = factories.graph_input("x", [2, 64])
    cast = factories.node("Cast", [factories.constant("w", w)], "cast", to=ir.DataType.FLOAT)
    matmul = factories.node("MatMul", [x, cast.outputs[0]], "mm", output="y")
    model = factories.model([x], [matmul.outputs[0]], [cast, matmul], [cast.inputs[0]])
    proto, memory = proto_sharing_initializers(model)
    session = session_feeding_weights(proto, {}, memory_files=memory)
    assert "w" not in session.weights and session.input_names == ["x"]
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_allclose(session.run(["y"], feeds)[0], feeds["x"] @ w.astype(np.float32), rtol=1e-5, atol=1e-5)


COLLECT_MEMORY = """
from lowbit.runtime.calibration import collect

mib = 160
model, _ = chain(mib)
inputs = {"x", *(f"mm{i}_out" for i in range(mib - 1))}  # every MatMul's input
feeds = [{"x": np.ones((1, 512), np.float32)}] * 2
before = start_peak()
stats = collect(model, feeds, only=set(), diagonals=inputs) if DIAGONALS else collect(model, feeds)
assert len(stats.by_activation) == mib
print((status_mib("VmHWM") - before) / mib)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets /proc/self/status's peak")
def test_collecting_diagonals_only_neither_copies_the_weights_nor_keeps_a_matrix():
    """A calibration that collects only ``diag(H)`` (what the outlier ranking reads before a layer sweep) grows by a
    small fraction of the weights; one with a full H per weight grows by more than the weights (H is 2 MiB per 1 MiB
    weight here, of which the updates touch the upper triangle)."""
    assert grown_per_weight_mib("DIAGONALS = True\n" + COLLECT_MEMORY) < 0.15
    assert grown_per_weight_mib("DIAGONALS = False\n" + COLLECT_MEMORY) > 1.0
