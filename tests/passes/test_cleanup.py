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
