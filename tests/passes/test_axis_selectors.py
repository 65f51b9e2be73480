"""AdaDim's module boundaries: what a module reads and what it hands out, the weights its outputs judge."""

from __future__ import annotations

import numpy as np
import onnx.utils
import onnx_ir as ir

from lowbit.passes.axis_selectors import Module, _capture, _module_boundaries, module_session
from lowbit.runtime.threads import NO_SPINNING
from tests import factories


def _module_graph(present_output: bool):
    """x -> [layer: a = x @ Wa (read by the head), b = x @ Wb (a graph output only)] -> head = Relu(a).

    With ``present_output`` the second output reads Wa instead of its own weight, as a KV cache's
    present keys do: it then judges no weight that the read output does not judge already."""
    rng = np.random.default_rng(0)
    x = factories.graph_input("x", [2, 4])
    wa = factories.constant("wa", rng.standard_normal((4, 4)).astype(np.float32))
    wb = factories.constant("wb", rng.standard_normal((4, 4)).astype(np.float32))
    a = factories.node("MatMul", [x, wa], "layer.a", output="a")
    b = factories.node("MatMul", [x, wa if present_output else wb], "layer.b", output="b")
    head = factories.node("Relu", [a.outputs[0]], "head", output="y")
    model = factories.model([x], [head.outputs[0], b.outputs[0]], [a, b, head], [wa] if present_output else [wa, wb])
    paths = {id(a): "layer.a", id(b): "layer.b", id(head): "head"}
    return model, paths


def test_a_graph_output_that_alone_depends_on_a_weight_is_a_module_output():
    """Fuzz seed 400: the second weight reached only a graph output, which the module left out, so its
    session had no input for that weight."""
    model, paths = _module_graph(present_output=False)
    inputs, outputs = _module_boundaries(model.graph, paths, "layer")
    assert inputs == ["x"] and outputs == ["a", "b"]


def test_a_graph_output_that_judges_no_new_weight_is_left_out():
    """A KV cache's present keys: a graph output computed from weights the read output already judges."""
    model, paths = _module_graph(present_output=True)
    inputs, outputs = _module_boundaries(model.graph, paths, "layer")
    assert inputs == ["x"] and outputs == ["a"]


def test_capture_returns_the_boundary_values_and_leaves_the_model_as_it_was():
    """The boundary values are extra outputs of the model's own proto while its session is made (no copy of
    the weights); afterwards the proto's outputs are what they were."""
    model = factories.mlp()
    proto = ir.to_proto(model)
    before = proto.SerializeToString()
    module = Module("fc", ["x"], [model.graph.node(2).outputs[0].name, "y"], [])
    samples = [factories.feeds_for(model, seed) for seed in (1, 2)]
    captured = _capture(proto, {}, [module], samples)
    assert proto.SerializeToString() == before
    x = samples[1]["x"].astype(np.float64)
    weights = {name: model.graph.initializers[name].const_value.numpy().astype(np.float64) for name in ("w1", "b1")}
    hidden = np.maximum(x @ weights["w1"] + weights["b1"], 0)
    np.testing.assert_allclose(captured[1][module.outputs[0]], hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(captured[1]["x"], samples[1]["x"])
    assert set(captured[0]) == {"x", *module.outputs}


def test_a_consumed_capture_returns_the_same_values():
    """``consume``: the proto is the capture session's only (pruned to the boundary values, emptied once
    serialized); the values are those of a capture that leaves it as it was."""
    model = factories.mlp()
    module = Module("fc", ["x"], [model.graph.node(2).outputs[0].name], [])
    samples = [factories.feeds_for(model, seed) for seed in (1, 2)]
    kept = _capture(ir.to_proto(model), {}, [module], samples)
    proto = ir.to_proto(model)
    consumed = _capture(proto, {}, [module], samples, consume=True)
    assert not proto.graph.node and not proto.graph.initializer
    for left, right in zip(kept, consumed):
        assert left.keys() == right.keys()
        for name in left:
            np.testing.assert_array_equal(left[name], right[name])


def test_a_module_session_takes_the_candidates_as_inputs_and_sleeps_between_runs():
    """The module's weights are inputs fed with candidates; NumPy works between the trials, so the session's
    threads must not spin meanwhile."""
    model = factories.mlp()
    hidden = model.graph.node(2).outputs[0].name
    sess = module_session(onnx.utils.Extractor(ir.to_proto(model)), Module("fc", ["x"], [hidden], []), ["w1"], {})
    assert "w1" in {value.name for value in sess.get_inputs()}
    key, value = NO_SPINNING
    assert sess.get_session_options().get_session_config_entry(key) == value


def test_keeping_one_candidate_lets_the_others_go_and_keeps_its_error():
    """A budget keeps one axis per width: the other candidate must not stay alive in the plan's measured errors."""
    import gc
    import weakref

    from lowbit.ir import analysis
    from lowbit.passes.axis_selectors import WeightPlan
    from lowbit.passes.quant.rtn import quantize_rtn
    from lowbit.passes.quant.scheme import QuantScheme

    model = factories.mlp(k=32, hidden=48, n=16)
    use = analysis.weight_uses(model.graph)[0]
    weight = analysis.weight_value_array(use)
    x = np.random.default_rng(0).standard_normal((64, weight.shape[0]))
    plan = WeightPlan([use], weight, x.T @ x)
    plan.candidates = {axis: quantize_rtn(weight, QuantScheme(3, 16, axis)) for axis in ("oc", "ic")}
    errors, energy = plan.output_errors(), plan.output_energy()
    dropped = weakref.ref(plan.candidates["oc"])
    plan.keep_candidate("ic")
    gc.collect()
    assert dropped() is None and list(plan.candidates) == ["ic"]
    assert plan.output_errors() == {"ic": errors["ic"]} and plan.output_energy() == energy
