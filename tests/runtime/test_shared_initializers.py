"""Sessions that read the model's own weight arrays (in-memory external data) instead of copies."""

import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lowbit.runtime.session import SMALL_EXTERNAL_TENSOR, proto_sharing_initializers, session_from_proto
from tests import factories
from tests.parity import serialized

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
    location = next(
        entry.value
        for t in proto.graph.initializer
        if t.name == "w1"
        for entry in t.external_data
        if entry.key == "location"
    )
    np.testing.assert_array_equal(memory[location].view(array.dtype).reshape(array.shape), array)
    feeds = factories.feeds_for(model)
    shared = session_from_proto(proto, {}, memory_files=memory).run(None, feeds)
    plain = session_from_proto(ir.to_proto(model), {}).run(None, feeds)
    for left, right in zip(shared, plain):
        np.testing.assert_array_equal(left, right)


SESSION_MEMORY = """
import numpy as np, onnx_ir as ir
from lowbit.runtime.memory import map_large_allocations
from lowbit.runtime.session import TRIM_AFTER_SHARED_BYTES, proto_sharing_initializers, session_from_proto
from tests import factories

def rss_mib():
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))

map_large_allocations()  # as a pipeline runs: blocks under LARGE_ALLOCATION_BYTES come from glibc's heap
x = factories.graph_input("x", [1, 512])
nodes, weights, value = [], [], x
for i in range(TRIM_AFTER_SHARED_BYTES // 2**20 + 16):  # 1 MiB pieces, 16 MiB over the size that trims
    weights.append(factories.constant(f"w{i}", np.full((512, 512), 1.0 / 512, np.float32)))
    nodes.append(factories.node("MatMul", [value, weights[-1]], f"mm{i}"))
    value = nodes[-1].outputs[0]
model = factories.model([x], [value], nodes, weights)
proto, memory = proto_sharing_initializers(model)
before = rss_mib()
session = session_from_proto(proto, {}, memory_files=memory)
print((rss_mib() - before) / (TRIM_AFTER_SHARED_BYTES / 2**20 + 16))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; glibc's heap")
def test_a_shared_session_does_not_keep_a_copy_of_the_weights_resident():
    """ONNX Runtime reads each in-memory file's tensor into a copy while it builds the session, then takes the
    shared array: the session must not leave those freed copies resident (it grows by a fraction of the weights)."""
    grown = float(
        subprocess.run(
            [sys.executable, "-c", SESSION_MEMORY], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout
    )
    assert grown < 0.5
