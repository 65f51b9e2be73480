"""CleanupPass: removes dead nodes/initializers, keeps outputs, no-op on a clean model."""

import numpy as np

from lowbit.passes.cleanup import CleanupPass
from tests import factories
from tests.parity import assert_parity, check_valid, serialized


def test_clean_model_is_left_byte_identical():
    model = factories.mlp()
    before = serialized(model)
    assert not CleanupPass()(model).modified
    assert serialized(model) == before


def test_dead_node_and_its_initializer_are_removed():
    reference = factories.mlp()
    model = factories.mlp()
    dead_weight = factories.constant("dead_w", np.ones((40, 3), np.float32))
    model.graph.register_initializer(dead_weight)
    model.graph.append(factories.node("MatMul", [model.graph.inputs[0], dead_weight], "dead"))
    cleanup = CleanupPass()
    assert cleanup(model).modified
    assert cleanup.details == {"removed_nodes": 1, "removed_initializers": 1}
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), rtol=0, atol=0)


def test_a_default_domain_spelled_ai_onnx_keeps_its_opset_import():
    """onnx_ir's unused-opset removal would drop an "ai.onnx" import that the nodes ("") still need."""
    model = factories.mlp()
    version = model.opset_imports.pop("")
    model.opset_imports["ai.onnx"] = version
    result = CleanupPass()(model)
    assert result.modified and model.opset_imports.get("") == version and "ai.onnx" not in model.opset_imports
    check_valid(model)
