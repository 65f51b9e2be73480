"""Sessions that read the model's own weight arrays (in-memory external data) instead of copies."""

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.runtime.session import SMALL_EXTERNAL_TENSOR, proto_sharing_initializers, session_from_proto
from tests import factories
from tests.parity import serialized


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
