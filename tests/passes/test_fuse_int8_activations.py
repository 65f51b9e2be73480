"""``Recipe.int8_activations``: FuseQDQPass writes ``int8_activations=1`` on every ``lowbit::QuantMatMul``, the
fused graph computes the op's int8 semantics (the NumPy oracle, node by node), its error stays below the
weight quantization's own, and the portable form refuses the option with a clear error."""

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit.kernels import reference
from lowbit.passes.recipe import Recipe
from tests import factories
from tests.parity import run

RTOL = 1e-5  # float32 round-off of the kernels' block sums against the oracle's float64 ones


def _oracle_forward(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The fused MLP (QuantMatMul, Relu, QuantMatMul) evaluated with the ops' NumPy oracle."""
    values = dict(feeds)
    for node in model.graph:
        inputs = [None if v is None else values.get(v.name, v.const_value) for v in node.inputs]
        inputs = [x.numpy() if isinstance(x, ir.TensorProtocol) else x for x in inputs]
        if node.op_type == "QuantMatMul":
            attributes = {name: attr.as_int() for name, attr in node.attributes.items()}
            out = reference.quant_matmul(inputs[0], *inputs[1:], **attributes)
        else:
            assert node.op_type == "Relu", node.op_type
            out = np.maximum(inputs[0], 0)
        values[node.outputs[0].name] = out
    return values[model.graph.outputs[0].name]


@pytest.mark.parametrize(("bits", "axis", "group"), [(4, "oc", 16), (3, "ic", 32), (2, "oc", 8), (8, "ic", 16)])
def test_fused_model_computes_int8_activations(ops_library, bits, axis, group):
    recipe = Recipe(bits=bits, axis=axis, group_size=group, fused=True, int8_activations=True)
    result = lowbit.optimize(factories.mlp(), recipe)
    feeds = factories.feeds_for(result.model)
    nodes = [node for node in result.model.graph if node.op_type == "QuantMatMul"]
    assert len(nodes) == 2 and all(node.attributes["int8_activations"].as_int() == 1 for node in nodes)
    assert result.report.recipe["int8_activations"] is True
    (y,) = run(result.model, feeds)
    expected = _oracle_forward(result.model, feeds)
    np.testing.assert_allclose(y, expected, rtol=0, atol=RTOL * np.abs(expected).max())


def test_int8_error_stays_below_the_weight_error(ops_library):
    """On the float model's output, int8 activations add far less error than 4-bit weights cost: the ratio of
    their rounding steps (of a block's range) is about (2**4 - 1) / (2**8 - 2); asserted within 4x of it."""
    feeds = factories.feeds_for(factories.mlp(k=256, hidden=192))
    (y_float,) = run(factories.mlp(k=256, hidden=192), feeds)
    outputs = {}
    for int8 in (False, True):
        recipe = Recipe(bits=4, group_size=64, fused=True, int8_activations=int8)
        (outputs[int8],) = run(lowbit.optimize(factories.mlp(k=256, hidden=192), recipe).model, feeds)
    weight_error = np.linalg.norm(outputs[False] - y_float)
    int8_error = np.linalg.norm(outputs[True] - outputs[False])
    step_ratio = (2**4 - 1) / (2**8 - 2)
    assert 0 < int8_error < 4 * step_ratio * weight_error
    assert np.linalg.norm(outputs[True] - y_float) < 1.5 * weight_error


def test_without_the_option_the_file_is_unchanged(ops_library):
    """Off by default: the attribute is not written at all (files as before the option existed)."""
    result = lowbit.optimize(factories.mlp(), Recipe(fused=True))
    assert all("int8_activations" not in node.attributes for node in result.model.graph)


def test_portable_form_refuses_the_option():
    with pytest.raises(ValueError, match="int8_activations .* needs fused=True"):
        Recipe(int8_activations=True)
