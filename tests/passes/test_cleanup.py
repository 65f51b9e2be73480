"""CleanupPass: removes dead nodes/initializers, keeps outputs, no-op on a clean model."""

import numpy as np

from lowbit.ir import files
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
    assert cleanup.details == {"removed_nodes": 1, "removed_initializers": 1, "dropped_export_metadata_bytes": 0}
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


def test_the_exporters_record_of_the_export_is_dropped_and_the_module_paths_kept():
    """Stack traces (naming the exporting machine's paths), FX nodes and class names go, to the byte the
    budget counts; the module path the passes and the viewer read stays; outputs unchanged."""
    reference = factories.with_export_metadata(factories.mlp())
    model = factories.with_export_metadata(factories.mlp())
    for node in model.graph:
        node.metadata_props["namespace"] = f"{node.name}: torch.nn.Linear"
    before = files.file_bytes(model)
    provenance = files.export_provenance_bytes(model)
    assert provenance > 0
    cleanup = CleanupPass()
    assert cleanup(model).modified
    assert cleanup.details["dropped_export_metadata_bytes"] == provenance
    assert before - files.file_bytes(model) == provenance
    for node in model.graph:
        assert set(node.metadata_props) == {"pkg.torch.onnx.name_scopes"}
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), rtol=0, atol=0)
