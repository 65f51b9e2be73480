"""Sequential calibration: the layer sweep equals the slow definition (calibrate the whole partially-quantized
model) on a random-weight tiny Llama, holds one cut of layer inputs whatever the depth, and falls back to
the parallel statistics outside decoder layers."""

from __future__ import annotations

import dataclasses
import functools
import gc
import threading
import tracemalloc
import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit import cli
from lowbit.ir import analysis
from lowbit.passes import sequential
from lowbit.passes.axis_selectors import WeightPlan
from lowbit.passes.capture_calibration import CaptureCalibrationPass
from lowbit.passes.fold_weights import FoldWeightsPass
from lowbit.passes.quant.gptq import quantize_gptq
from lowbit.passes.quant.scheme import CALIBRATION_MODES, QuantScheme
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.runtime.calibration import collect
from tests import factories
from tests.parity import check_valid, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the 'models' extra (transformers) is not installed")

from tests.test_tiny_llama import CausalLM  # noqa: E402  (needs torch and transformers)

HIDDEN, VOCAB = 64, 96
GPTQ = QuantScheme(3, 16, "oc", False, "gptq")


@functools.cache
def _llama_proto(layers: int) -> bytes:
    """A random-weight Llama with ``layers`` decoder layers, exported and folded (serialized, so each test gets a copy)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    module = CausalLM(transformers.LlamaForCausalLM(config)).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    model = lowbit.export(
        module, (ids,), dynamic_shapes={"input_ids": {1: "seq"}}, input_names=["input_ids"], output_names=["logits"]
    )
    FoldWeightsPass()(model)
    return ir.to_proto(model).SerializeToString()


def _llama(layers: int = 2) -> ir.Model:
    return ir.from_proto(onnx.load_from_string(_llama_proto(layers)))


def _feeds(count: int, tokens: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (2, tokens))} for _ in range(count)]  # the export fixed the batch at 2


def _plans(model: ir.Model) -> list[WeightPlan]:
    """One plan per decoder-layer weight (each read by one MatMul in the tiny Llama)."""
    return [
        WeightPlan([use], analysis.weight_value_array(use), None)
        for use in analysis.weight_uses(model.graph)
        if sequential.layer_of([use]) is not None
    ]


def _gptq_sweep(model: ir.Model, feeds, **options):
    """Run the sweep with GPTQ per layer; returns (H per activation as the sweep measured it, the quantized weights, the sweep)."""
    plans = _plans(model)
    layers, rest = sequential.group_layers(plans)
    assert not rest
    hessians, quantized = {}, {}

    def quantize(layer, step):
        values = {}
        for index in layer.indices:
            plan = plans[index]
            hessians[plan.first.node.inputs[0].name] = plan.hessian.copy()
            values[plan.first.weight.name] = quantize_gptq(plan.weight, plan.hessian, GPTQ).dequantize()
        quantized.update(values)
        return values

    sweep = sequential.LayerSweep(model, plans, layers, feeds, **options)
    sweep.run(quantize)
    return hessians, quantized, sweep


def _layer_activations(model: ir.Model, layer: int) -> list[str]:
    return sorted(
        {
            use.node.inputs[0].name
            for use in analysis.weight_uses(model.graph)
            if sequential.layer_of([use]) is not None and sequential.layer_of([use]).endswith(f".{layer}")
        }
    )


@pytest.mark.slow
def test_sweep_equals_calibrating_the_partially_quantized_model():
    """Layer 0: the float model's statistics, bit for bit. Layer 1: those of the whole model with layer 0
    replaced by its GPTQ weights (the slow definition), to float32 round-off; and not the float model's."""
    feeds = _feeds(5)
    hessians, quantized, _ = _gptq_sweep(_llama(), feeds)

    parallel = collect(_llama(), feeds)
    first, second = _layer_activations(_llama(), 0), _layer_activations(_llama(), 1)
    assert len(first) == len(second) == 4  # q/k/v input, o input, gate/up input, down input
    for name in first:
        np.testing.assert_array_equal(hessians[name], parallel.by_activation[name].hessian)

    partially_quantized = _llama()
    for name, value in quantized.items():
        if any(use.node.inputs[0].name in first for use in partially_quantized.graph.initializers[name].uses()):
            partially_quantized.graph.initializers[name].const_value = ir.tensor(value.astype(np.float32), name=name)
    slow = collect(partially_quantized, feeds)
    for name in second:
        want = slow.by_activation[name].hessian
        np.testing.assert_allclose(hessians[name], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        assert not np.allclose(hessians[name], parallel.by_activation[name].hessian, rtol=1e-3)


def _traced_in_sweep() -> int:
    """Bytes alive (after a collection) that were allocated with the sweep's code on the stack."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, sequential.__file__, all_frames=True)]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.mark.slow
def test_memory_does_not_grow_with_layers():
    """At every layer the sweep holds one cut of layer inputs (samples x tokens x hidden float32): the previous
    layer's inputs are freed, and what else the sweep allocated and still holds does not grow from layer to layer
    (it shrinks where the sweep's references to the done layers' weight arrays were its own copies)."""
    feeds = _feeds(8)
    model = _llama(4)
    plans = _plans(model)
    layers, _ = sequential.group_layers(plans)
    previous, held = [], []

    def quantize(layer, step):  # float weights: only memory is measured here
        held.append(_traced_in_sweep())
        assert all(ref() is None for ref in previous)  # the last layer's inputs are gone
        previous[:] = [
            weakref.ref(value) for sample in step.samples for name, value in sample.items() if name != "input_ids"
        ]
        assert len(previous) == 4  # the residual stream of the first 4 samples
        for index in layer.indices:
            plans[index].hessian = None  # H is the caller's to keep or drop
        return {plans[index].first.weight.name: plans[index].weight for index in layer.indices}

    sweep = sequential.LayerSweep(model, plans, layers, feeds)
    tracemalloc.start(25)
    try:
        sweep.run(quantize)
    finally:
        tracemalloc.stop()
    assert sweep.stream_bytes == [len(feeds) * 2 * 16 * HIDDEN * 4] * 4
    # a layer's float subgraph alone is ~250 KiB
    assert len(held) == 4 and all(later - earlier < 32 * 1024 for earlier, later in zip(held[1:], held[2:])), held


@pytest.mark.parametrize("free_mib", [0, 1024, 1030, 50_000])
def test_the_stream_may_take_half_the_temporary_folder_less_the_reserve(monkeypatch, free_mib):
    monkeypatch.setattr(sequential, "free_bytes", lambda: free_mib * 2**20)
    assert sequential.stream_room() == max(0, free_mib - 1024) * 2**20 // 2


@pytest.mark.slow
def test_sweep_refuses_a_stream_over_the_limit():
    with pytest.raises(ValueError, match=r"over the limit of 0 MiB.*calibration_mode='parallel'"):
        _gptq_sweep(_llama(), _feeds(3), max_stream_bytes=1000)


@pytest.mark.slow
def test_feeds_must_name_the_model_inputs():
    with pytest.raises(ValueError, match=r"name the inputs \['ids'\]; the model takes \['input_ids'\]"):
        _gptq_sweep(_llama(), [{"ids": np.zeros((2, 4), np.int64)}])


def _quantized_tensors(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: value.const_value.numpy()
        for name, value in model.graph.initializers.items()
        if name.endswith((".qweight", ".scales", ".zero_points"))
    }


def _optimize(model: ir.Model, recipe: lowbit.Recipe, feeds):
    result = lowbit.optimize(model, recipe, calibration=feeds)
    check_valid(result.model)
    return result, _quantized_tensors(result.model)


@pytest.mark.slow
def test_rtn_ignores_the_mode():
    """RTN does not read H: both modes write the same codes, scales and zero points."""
    feeds = _feeds(4)
    _, parallel = _optimize(_llama(), lowbit.Recipe(bits=3, group_size=16), feeds)
    result, seq = _optimize(_llama(), lowbit.Recipe(bits=3, group_size=16, calibration_mode="sequential"), feeds)
    assert len(parallel) == 14 * 3 and parallel.keys() == seq.keys()
    for name in parallel:
        np.testing.assert_array_equal(seq[name], parallel[name])
    details = next(p for p in result.report.passes if p.name == "QuantizeWeightsPass").details
    assert details["calibration"] == {
        "mode": "sequential",
        "layers": 2,
        "stream_mb": 4 * 2 * 16 * HIDDEN * 4 / 2**20,
        "parallel_statistics": [],
    }


@pytest.mark.slow
def test_gptq_sequential_changes_only_the_later_layers():
    feeds = _feeds(4)
    _, parallel = _optimize(_llama(), lowbit.Recipe(bits=3, group_size=16, method="gptq"), feeds)
    _, seq = _optimize(
        _llama(), lowbit.Recipe(bits=3, group_size=16, method="gptq", calibration_mode="sequential"), feeds
    )
    assert parallel.keys() == seq.keys()
    for name in parallel:
        if ".layers.0." in name:
            np.testing.assert_array_equal(seq[name], parallel[name])
    assert any(not np.array_equal(seq[name], parallel[name]) for name in parallel if ".layers.1." in name)


@pytest.mark.slow
@pytest.mark.parametrize("selector, modules", [("matrix", None), ("block", 4), ("layer", 2)])
def test_adadim_selectors_in_sequential_mode(selector, modules):
    """Each selector judges a layer on the partially-quantized model's inputs; layer 0 sees the float model's,
    so its choices are the parallel mode's."""
    feeds = _feeds(6)
    recipe = lowbit.Recipe(bits=2, group_size=16, axis="adadim", method="gptq", selector=selector)
    parallel, _ = _optimize(_llama(), recipe, feeds)
    seq, _ = _optimize(_llama(), lowbit.Recipe(**{**recipe.__dict__, "calibration_mode": "sequential"}), feeds)
    details = next(p for p in seq.report.passes if p.name == "QuantizeWeightsPass").details
    if modules is not None:
        assert details["selection"]["modules"] == modules
        assert details["selection"]["final_error"] <= details["selection"]["start_error"]
    assert len(seq.report.weights) == 14
    axes = {
        mode: {w.name: w.axis for w in result.report.weights if ".layers.0." in w.layer}
        for mode, result in (("p", parallel), ("s", seq))
    }
    assert len(axes["s"]) == 7 and axes["s"] == axes["p"]


def test_graph_without_module_paths_keeps_parallel_statistics():
    """No decoder layers to sweep: every weight is quantized on the parallel statistics, and the report says so."""
    batches = [factories.feeds_for(factories.mlp(), seed) for seed in range(4)]
    models = {}
    for mode in CALIBRATION_MODES:
        model = factories.mlp()
        quantize = QuantizeWeightsPass(GPTQ, calibration_mode=mode)
        CaptureCalibrationPass(batches, keep_feeds=mode == "sequential", activations=quantize.parallel_activations)(
            model
        )
        quantize(model)
        models[mode] = _quantized_tensors(model)
    assert quantize.details["calibration"] == {
        "mode": "sequential",
        "layers": 0,
        "stream_mb": 0.0,
        "parallel_statistics": ["fc1", "fc2"],
    }
    assert models["sequential"].keys() == models["parallel"].keys()
    for name, value in models["parallel"].items():
        np.testing.assert_array_equal(models["sequential"][name], value)


def test_statistics_without_feeds_are_refused():
    stats = collect(factories.mlp(), [factories.feeds_for(factories.mlp())])
    with pytest.raises(ValueError, match=r"collect\(\.\.\., keep_feeds=True\)"):
        lowbit.optimize(factories.mlp(), lowbit.Recipe(method="gptq", calibration_mode="sequential"), calibration=stats)


@pytest.mark.slow
@pytest.mark.parametrize("include_lm_head", [False, True])
def test_parallel_pass_collects_only_what_the_sweep_does_not(include_lm_head):
    """By default nothing (the float model is not run at all); with the LM head quantized, its input only."""
    recipe = lowbit.Recipe(
        bits=4, group_size=16, method="gptq", calibration_mode="sequential", include_lm_head=include_lm_head
    )
    result, _ = _optimize(_llama(), recipe, _feeds(2))
    details = {p.name: p.details for p in result.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == int(include_lm_head)
    assert details["CaptureCalibrationPass"]["feeds_kept"] == 2
    assert details["QuantizeWeightsPass"]["calibration"]["parallel_statistics"] == (
        ["model.lm_head"] if include_lm_head else []
    )
    assert len(result.report.weights) == 14 + include_lm_head


def test_recipe_and_command_line_take_the_mode():
    with pytest.raises(ValueError, match="calibration_mode must be one of"):
        lowbit.Recipe(calibration_mode="both")
    with pytest.raises(ValueError, match="calibration_mode='sequential' needs calibration data"):
        lowbit.optimize(factories.mlp(), lowbit.Recipe(calibration_mode="sequential"))
    args = cli.build_parser().parse_args(["optimize", "in.onnx", "-o", "out.onnx", "--calibration-mode", "sequential"])
    assert cli._recipe(args).calibration_mode == "sequential"


def test_recipe_and_command_line_take_the_choice_method():
    with pytest.raises(ValueError, match="choice_method must be"):
        lowbit.Recipe(choice_method="hqq")
    args = cli.build_parser().parse_args(
        ["optimize", "in.onnx", "-o", "out.onnx", "--axis", "adadim", "--choice-method", "rtn"]
    )
    assert cli._recipe(args).choice_method == "rtn"
    batches = [factories.feeds_for(factories.mlp(), seed) for seed in range(3)]
    recipe = lowbit.Recipe(bits=3, group_size=8, axis="adadim", method="gptq", choice_method="rtn")
    result = lowbit.optimize(factories.mlp(), recipe, calibration=batches)
    assert {w.method for w in result.report.weights} == {"gptq"} and result.report.recipe["choice_method"] == "rtn"


@pytest.mark.slow
def test_outlier_branches_stay_inside_their_decoder_layer():
    """SplitOutliersPass puts each branch's nodes inside the reader's layer span (found by the fuzzer: index
    nodes at the top of the graph made every layer start at node 0, and the sweep refused the graph)."""
    recipe = lowbit.Recipe(
        bits=3, group_size=16, method="gptq", calibration_mode="sequential", outlier_fraction=0.02, split=True
    )
    result, _ = _optimize(_llama(), recipe, _feeds(3))
    details = {p.name: p.details for p in result.report.passes}
    assert details["SplitOutliersPass"]["weights_with_outliers"] == 14
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    assert details["QuantizeWeightsPass"]["seconds_onnxruntime"] > 0  # the layers' runs, timed as the pass's own


def test_a_graph_without_weights_has_nothing_to_sweep():
    x = factories.graph_input("x", [2, 8])
    relu = factories.node("Relu", [x], "relu", output="y")
    model = factories.model([x], [relu.outputs[0]], [relu], [])
    result = lowbit.optimize(
        model, lowbit.Recipe(calibration_mode="sequential"), calibration=[{"x": np.ones((2, 8), np.float32)}]
    )
    assert result.report.weights == [] and [n.op_type for n in result.model.graph] == ["Relu"]


def test_an_embedding_alone_is_quantized_in_sequential_mode():
    """Found by the fuzzer: with no weight MatMul to calibrate, the feeds were not kept and the sequential
    mode refused the graph; the embedding table needs no statistics at all."""
    model = factories.tied_lm()
    head = model.graph.node("lm_head")
    model.graph.remove(head, safe=False)  # leave Gather(E) -> Relu
    model.graph.outputs[0] = model.graph.node("act").outputs[0]
    result = lowbit.optimize(
        model,
        lowbit.Recipe(method="gptq", include_embeddings=True, calibration_mode="sequential"),
        calibration=[factories.feeds_for(model)],
    )
    assert [w.kind for w in result.report.weights] == ["embedding"]


def test_block_selector_dequantizes_each_candidate_once(monkeypatch):
    """The greedy search feeds a module's weights once per trial; each candidate is dequantized once and reused."""
    calls: dict[tuple[int, str], int] = {}
    original = WeightPlan.session_input

    def counted(plan, axis):
        calls[id(plan), axis] = calls.get((id(plan), axis), 0) + 1
        return original(plan, axis)

    monkeypatch.setattr(WeightPlan, "session_input", counted)
    recipe = lowbit.Recipe(bits=2, group_size=16, axis="adadim", method="rtn", selector="block")
    result, _ = _optimize(_llama(1), recipe, _feeds(2))
    details = next(p for p in result.report.passes if p.name == "QuantizeWeightsPass").details
    assert details["selection"]["modules"] == 2
    assert calls and set(calls.values()) == {1}
    assert len({plan for plan, _ in calls}) == 7


@pytest.mark.slow
def test_budget_widths_chosen_in_parallel_then_layers_quantized_in_order():
    """Under a budget the widths are allocated on the parallel statistics, then the sweep quantizes each layer
    again at its width: the widths and bytes are the parallel budget's, layer 0 (the float model's inputs)
    is the same, a later layer is not."""
    feeds = _feeds(4)
    recipe = lowbit.Recipe(group_size=32, method="gptq", budget="4", budget_sensitivity="output")
    parallel_result, parallel = _optimize(_llama(), recipe, feeds)
    result, seq = _optimize(_llama(), dataclasses.replace(recipe, calibration_mode="sequential"), feeds)
    widths = {record.name: record.bits for record in result.report.weights}
    assert widths == {record.name: record.bits for record in parallel_result.report.weights}
    assert len(set(widths.values())) > 1  # a mix, so each width's weights are quantized in their own call
    assert result.report.budget == parallel_result.report.budget
    assert result.report.bytes_after == parallel_result.report.bytes_after <= result.report.budget["limit_bytes"]
    details = {p.name: p.details for p in result.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == 8  # the budget reads every layer's statistics
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    assert details["QuantizeWeightsPass"]["seconds_onnxruntime"] > 0  # the layers' runs, timed as the pass's own
    assert parallel.keys() == seq.keys()
    for name in parallel:
        if ".layers.0." in name:
            np.testing.assert_array_equal(seq[name], parallel[name])
    assert any(not np.array_equal(seq[name], parallel[name]) for name in parallel if ".layers.1." in name)


def _whole_and_by_layer(recipe: lowbit.Recipe, feeds):
    """The recipe on statistics of the whole float model (collected beforehand: calibrated whole) and on the feeds
    (the pipeline's own: calibrated layer by layer)."""
    whole, whole_tensors = _optimize(_llama(), recipe, collect(_llama(), feeds, keep_samples=4))
    by_layer, by_layer_tensors = _optimize(_llama(), recipe, feeds)
    return whole, whole_tensors, by_layer, by_layer_tensors


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["matrix", "block", "layer"])
def test_by_layer_calibration_equals_the_whole_model(selector):
    """The float stream gives each layer the statistics of the whole float model: the same codes, scales and zero
    points, the same axis choices and report."""
    recipe = lowbit.Recipe(bits=3, group_size=16, method="gptq", axis="adadim", selector=selector, clip_search=True)
    whole, whole_tensors, by_layer, by_layer_tensors = _whole_and_by_layer(recipe, _feeds(6))
    assert whole_tensors.keys() == by_layer_tensors.keys() and len(whole_tensors) == 14 * 3
    for name in whole_tensors:
        np.testing.assert_array_equal(by_layer_tensors[name], whole_tensors[name], err_msg=name)
    details = {p.name: p.details for p in by_layer.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == 0  # the float model is not run whole
    assert details["QuantizeWeightsPass"]["calibration"]["mode"] == "parallel"
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    assert details["QuantizeWeightsPass"]["seconds_onnxruntime"] > 0  # the layers' runs, timed as the pass's own
    assert "calibration" not in {p.name: p.details for p in whole.report.passes}["QuantizeWeightsPass"]
    for mine, theirs in zip(by_layer.report.weights, whole.report.weights, strict=True):
        assert (mine.name, mine.axis, mine.bits) == (theirs.name, theirs.axis, theirs.bits)
        assert mine.output_error == pytest.approx(theirs.output_error, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", ["output", "kl"])
def test_a_budget_by_layer_equals_the_whole_model(sensitivity):
    """Under a budget the layers are swept twice (measured at every width, then quantized again at the allocated
    ones): the same widths, axes, bytes, errors and tensors as on the whole float model's statistics."""
    recipe = lowbit.Recipe(
        bits=3,
        group_size=32,
        method="gptq",
        axis="adadim",
        selector="block",
        budget="4.5",
        budget_sensitivity=sensitivity,
    )
    whole, whole_tensors, by_layer, by_layer_tensors = _whole_and_by_layer(recipe, _feeds(6))
    assert whole_tensors.keys() == by_layer_tensors.keys() and len(whole_tensors) == 14 * 3
    for name in whole_tensors:
        np.testing.assert_array_equal(by_layer_tensors[name], whole_tensors[name], err_msg=name)
    assert by_layer.report.budget == whole.report.budget
    assert len(set(by_layer.report.budget["widths"].values()) - {0}) > 1  # a mix of widths
    details = {p.name: p.details for p in by_layer.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == 0  # the float model is not run whole
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    assert "by_layer_refused" not in details["QuantizeWeightsPass"]
    for mine, theirs in zip(by_layer.report.weights, whole.report.weights, strict=True):
        assert (mine.name, mine.axis, mine.bits, mine.width_options) == (
            theirs.name,
            theirs.axis,
            theirs.bits,
            theirs.width_options,
        )
        assert mine.output_error == pytest.approx(theirs.output_error, rel=1e-9)


@pytest.mark.slow
def test_a_budget_by_layer_lets_each_measured_layer_go(monkeypatch):
    """While the budget's sweep measures a layer, the Hessians and candidates of the layers measured before it are
    freed (the float weights stay: the second sweep quantizes them again)."""
    from lowbit.passes import quantize_weights

    earlier: list[weakref.ref] = []
    measure = quantize_weights.measure_whole

    def watching(plans, budget, choose_width, indices, sensitivity, positions):
        gc.collect()
        assert all(ref() is None for ref in earlier), "an earlier layer's H or candidate is still alive"
        table = measure(plans, budget, choose_width, indices, sensitivity, positions)
        earlier.extend(weakref.ref(plans[i].hessian) for i in indices)
        for width_plans, axes in zip(table.plans, table.axes):
            earlier.extend(weakref.ref(plan.candidates[axis].codes) for plan, axis in zip(width_plans, axes))
        return table

    monkeypatch.setattr(quantize_weights, "measure_whole", watching)
    recipe = lowbit.Recipe(
        bits=3, group_size=32, method="gptq", axis="adadim", budget="4.5", budget_sensitivity="output"
    )
    result, _ = _optimize(_llama(3), recipe, _feeds(2))
    assert len(result.report.weights) == 21 and len(earlier) == 21 * (1 + 6)


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def _assert_same_codes(whole: ir.Model, by_layer: ir.Model, scales_rtol: float) -> None:
    """The same tensors, bit for bit but the scales (to ``scales_rtol``: float32 round-off in H)."""
    expected, got = _initializers(whole), _initializers(by_layer)
    assert got.keys() == expected.keys()
    for name in expected:
        if name.endswith(".scales"):
            np.testing.assert_allclose(got[name], expected[name], rtol=scales_rtol, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_outliers_ranked_on_diagonals_then_calibrated_by_layer_equal_the_whole_model(fused):
    """Dense-and-sparse outliers ranked by sensitivity read only ``diag(H)``: the calibration pass collects the
    diagonals (no ``[K, K]`` statistics), and the layers are swept on the split model. The file equals the one made
    on the whole float model's statistics: the same outliers, codes and zero points; the scales to float32 round-off
    (past the first split MatMul the layers' activations are ``x @ D`` plus the sparse branch, not ``x @ W``: the same
    values to their last bits), bit for bit where the statistics are of the model's input alone."""
    recipe = lowbit.Recipe(
        bits=3,
        group_size=16,
        method="gptq",
        axis="adadim",
        selector="block",
        clip_search=True,
        outlier_fraction=0.02,
        outlier_criterion="sensitivity",
        fused=fused,
    )
    whole, _, by_layer, _ = _whole_and_by_layer(recipe, _feeds(6))
    details = {p.name: p.details for p in by_layer.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == 0
    assert details["CaptureCalibrationPass"]["diagonals_only"] == 4 * 2  # the inputs of q/k/v, o, gate/up, down
    assert details["SplitOutliersPass"]["weights_with_outliers"] == 14
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    expected, got = _initializers(whole.model), _initializers(by_layer.model)
    assert got.keys() == expected.keys() and any(name.endswith(".outlier_values") for name in got) != fused
    for name in expected:
        if name.endswith(".scales") and ".layers.0.self_attn.o_proj" not in name and "layers.0.self_attn" in name:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)  # q/k/v read the layer's input
        elif name.endswith(".scales"):
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("criterion", "outlier_fraction"), [("absmax", 0.0), ("hessian", 0.0), ("absmax", 0.02)])
def test_channels_sorted_on_diagonals_then_calibrated_by_layer_equal_the_whole_model(criterion, outlier_fraction):
    """Sorting channels reads abs-max or ``diag(H)`` only: the calibration pass collects those of the sorted weights'
    inputs (o_proj's, down_proj's; with outliers also the others), the pass permutes the model, and the layers are
    swept on the permuted model. The file equals the one made on the whole float model's permuted statistics: the
    same permutations, codes and zero points, the scales to float32 round-off."""
    recipe = lowbit.Recipe(
        bits=3,
        group_size=16,
        method="gptq",
        axis="adadim",
        clip_search=True,
        reorder=criterion,
        outlier_fraction=outlier_fraction,
        outlier_criterion="sensitivity",
    )
    whole, _, by_layer, _ = _whole_and_by_layer(recipe, _feeds(6))
    details = {p.name: p.details for p in by_layer.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == 0
    assert details["CaptureCalibrationPass"]["diagonals_only"] == (4 if outlier_fraction else 2) * 2
    assert details["ReorderChannelsPass"]["reordered_weights"] == 2 * 2
    assert (
        details["ReorderChannelsPass"]["reordered"]
        == {p.name: p.details for p in whole.report.passes}["ReorderChannelsPass"]["reordered"]
    )
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    _assert_same_codes(whole.model, by_layer.model, scales_rtol=1e-5)


def _split_recipe(**options) -> lowbit.Recipe:
    """W3 AdaDim GPTQ with the layer split, on the tiny Llama's groups."""
    return lowbit.Recipe(bits=3, group_size=16, method="gptq", axis="adadim", selector="block", split=True, **options)


@pytest.mark.slow
@pytest.mark.parametrize("outlier_fraction", [0.0, 0.02])
def test_the_layer_split_sweeps_the_float_layers_then_calibrates_by_layer_equal_to_the_whole_model(outlier_fraction):
    """The layer split reads each weight's full H: SplitOutliersPass sweeps the float model's layers for it (the
    whole model's H, one layer's at a time), the calibration pass collects nothing of the layers, and the layers are
    then quantized by layer on the split model. The same split decisions and outliers as on the whole model's
    statistics; the same codes and zero points, the scales to float32 round-off (GPTQ's, on the split model's
    activations, where three clusters' products are summed)."""
    recipe = _split_recipe(outlier_fraction=outlier_fraction, outlier_criterion="sensitivity")
    whole, _, by_layer, _ = _whole_and_by_layer(recipe, _feeds(6))
    details = {p.name: p.details for p in by_layer.report.passes}
    expected_details = {p.name: p.details for p in whole.report.passes}["SplitOutliersPass"]
    assert details["CaptureCalibrationPass"]["activations"] == details["CaptureCalibrationPass"]["diagonals_only"] == 0
    assert details["SplitOutliersPass"]["calibration_by_layer"] == {"layers": 2, "refused": None}
    assert "calibration_by_layer" not in expected_details
    assert details["SplitOutliersPass"]["split"] == expected_details["split"]
    assert details["SplitOutliersPass"]["weights_split"] > 0
    assert details["SplitOutliersPass"]["outliers"] == expected_details["outliers"]
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    _assert_same_codes(whole.model, by_layer.model, scales_rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, "5"])
def test_the_split_clusters_are_held_two_layers_at_a_time(monkeypatch, budget):
    """The layer split's clusters are computed when read (the model holds each weight and its clusters' bounds): a
    sweep holds those of the layer it quantizes or measures and of the next one it calibrates, whatever the depth,
    and the readers of a layer (its session, its plans, the axis selector's sessions) share one copy. A budget
    sweeps the layers twice (measured at every width, then written), and reads the clusters again in the second
    (measured on each weight's output; the KL sensitivity runs the whole model, which reads every cluster)."""
    from lowbit.passes import split_outliers

    layers, per_layer = 4, 7 * 3  # every weight split in three
    computed: list[weakref.ref] = []
    most_alive = 0
    lazy = split_outliers._Clusters._lazy

    def alive() -> int:
        return sum(ref() is not None for ref in computed)

    def watching(self, cluster, compute, shape, name):
        def computing():
            nonlocal most_alive
            if alive() > 2 * per_layer:
                gc.collect()  # only what a reference cycle still holds
            most_alive = max(most_alive, alive())
            array = compute()
            computed.append(weakref.ref(array))
            return array

        return lazy(self, cluster, computing, shape, name)

    monkeypatch.setattr(split_outliers._Clusters, "_lazy", watching)
    recipe = _split_recipe(budget=budget, budget_sensitivity="output")
    result, tensors = _optimize(_llama(layers), recipe, _feeds(6))
    assert {p.name: p.details for p in result.report.passes}["SplitOutliersPass"]["weights_split"] == layers * 7
    assert sum(name.endswith(".qweight") for name in tensors) == layers * per_layer  # every cluster quantized
    sweeps = 1 if budget is None else 2
    assert sweeps * layers * per_layer <= len(computed) < 2 * sweeps * layers * per_layer  # once a sweep, or so
    assert 0 < most_alive <= 2 * per_layer
    if budget is not None:
        assert len(set(result.report.budget["widths"].values()) - {0}) > 1  # a mix of widths


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity", ["output", "kl"])
def test_a_budget_with_outliers_is_measured_and_written_by_layer(sensitivity):
    """Under a budget the two sweeps run on the split model: the widths fit the budget as calibrated whole, with the
    same outliers."""
    recipe = lowbit.Recipe(
        group_size=16,
        method="gptq",
        budget="4.5",  # the outliers take about one bit per weight
        budget_sensitivity=sensitivity,
        outlier_fraction=0.02,
        outlier_criterion="sensitivity",
    )
    feeds = _feeds(4)
    whole = lowbit.optimize(_llama(), recipe, calibration=collect(_llama(), feeds, keep_samples=4))
    by_layer = lowbit.optimize(_llama(), recipe, calibration=feeds)
    check_valid(by_layer.model)
    details = {p.name: p.details for p in by_layer.report.passes}
    assert details["CaptureCalibrationPass"]["diagonals_only"] == 4 * 2
    assert "by_layer_refused" not in details["QuantizeWeightsPass"]
    budget = by_layer.report.budget
    assert budget["bytes"] <= budget["limit_bytes"]
    assert sum(count > 0 for count in budget["widths"].values()) > 1  # weights at more than one width
    expected, got = _initializers(whole.model), _initializers(by_layer.model)
    outliers = [name for name in expected if name.endswith((".outlier_rows", ".outlier_values", ".outlier_pointers"))]
    assert outliers and all(np.array_equal(got[name], expected[name]) for name in outliers)


@pytest.mark.slow
def test_outliers_in_sequential_mode_are_ranked_on_the_float_models_diagonals():
    """Sequentially, the outliers are those of the parallel mode (both rank on the float model's ``diag(H)``); the
    layers after the first are then quantized on the partially quantized model."""
    options = {
        "bits": 3,
        "group_size": 16,
        "method": "gptq",
        "outlier_fraction": 0.02,
        "outlier_criterion": "sensitivity",
    }
    feeds = _feeds(4)
    parallel = lowbit.optimize(_llama(), lowbit.Recipe(**options), calibration=feeds)
    result = lowbit.optimize(_llama(), lowbit.Recipe(**options, calibration_mode="sequential"), calibration=feeds)
    details = {p.name: p.details for p in result.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == 0
    assert details["CaptureCalibrationPass"]["diagonals_only"] == 4 * 2
    assert details["QuantizeWeightsPass"]["calibration"]["mode"] == "sequential"
    expected, got = _initializers(parallel.model), _initializers(result.model)
    outliers = [name for name in expected if name.endswith((".outlier_rows", ".outlier_values", ".outlier_pointers"))]
    assert len(outliers) == 3 * 14
    for name in outliers:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow
def test_a_budget_with_a_layer_weight_the_sensitivity_cannot_measure_is_calibrated_whole(monkeypatch):
    from lowbit.passes import sensitivity

    overridable = sensitivity.overridable
    monkeypatch.setattr(
        sensitivity,
        "overridable",
        lambda plan: overridable(plan) and "layers.1.mlp.up" not in analysis.module_path(plan.first.node),
    )
    recipe = lowbit.Recipe(bits=3, group_size=32, method="gptq", budget="4.5", budget_sensitivity="kl")
    whole, whole_tensors, by_layer, by_layer_tensors = _whole_and_by_layer(recipe, _feeds(4))
    refused = {p.name: p.details for p in by_layer.report.passes}["QuantizeWeightsPass"]["by_layer_refused"]
    assert "cannot measure the layer weights" in refused
    assert by_layer.report.budget == whole.report.budget and by_layer.report.budget["not_measured"]
    for name in whole_tensors:
        np.testing.assert_array_equal(by_layer_tensors[name], whole_tensors[name], err_msg=name)


@pytest.mark.slow
def test_by_layer_calibration_lets_each_layer_go(monkeypatch):
    """When a layer is quantized, the Hessians and float weights of the layers before it are freed."""
    from lowbit.passes import quantize_weights

    earlier: list[weakref.ref] = []
    choose = quantize_weights.choose

    def watching(quantizer, plans, **options):
        gc.collect()
        assert all(ref() is None for ref in earlier), "an earlier layer's H or float weight is still alive"
        earlier.extend(weakref.ref(array) for plan in plans for array in (plan.weight, plan.hessian))
        return choose(quantizer, plans, **options)

    monkeypatch.setattr(quantize_weights, "choose", watching)
    recipe = lowbit.Recipe(bits=3, group_size=16, method="gptq", axis="adadim", selector="matrix")
    result, _ = _optimize(_llama(3), recipe, _feeds(2))
    assert len(earlier) == 2 * 21 and len(result.report.weights) == 21


@pytest.mark.slow
def test_a_graph_the_sweep_cannot_cut_is_calibrated_whole(monkeypatch):
    monkeypatch.setattr(sequential, "unsweepable", lambda graph, groups: "its layers interleave")
    recipe = lowbit.Recipe(bits=3, group_size=16, method="gptq")
    whole, whole_tensors, by_layer, by_layer_tensors = _whole_and_by_layer(recipe, _feeds(2))
    details = {p.name: p.details for p in by_layer.report.passes}
    assert details["CaptureCalibrationPass"]["activations"] == 4 * 2  # the inputs of q/k/v, o, gate/up, down
    assert "calibration" not in details["QuantizeWeightsPass"]
    assert details["QuantizeWeightsPass"]["by_layer_refused"] == "its layers interleave"
    for name in whole_tensors:
        np.testing.assert_array_equal(by_layer_tensors[name], whole_tensors[name], err_msg=name)


@pytest.mark.slow
def test_layer_inputs_without_room_in_the_temporary_folder_are_calibrated_whole(monkeypatch):
    """Where every sample's layer inputs would not fit twice in the temporary folder (with 1 GiB to spare), the float
    model is calibrated whole instead, with the same result."""
    feeds = _feeds(48, tokens=64)  # 48 x 2 x 64 x 64 float32 = 1.5 MiB of inputs
    monkeypatch.setattr(sequential, "free_bytes", lambda: sequential.SPILL_RESERVE_BYTES + 2 * 2**20)
    recipe = lowbit.Recipe(bits=3, group_size=16, method="gptq", axis="adadim", selector="block")
    whole, whole_tensors, by_layer, by_layer_tensors = _whole_and_by_layer(recipe, feeds)
    refused = {p.name: p.details for p in by_layer.report.passes}["QuantizeWeightsPass"]["by_layer_refused"]
    assert "calibrating layer by layer would keep 2 MiB" in refused and "over the limit of 1 MiB" in refused
    assert "set TMPDIR" in refused and refused.endswith("(calibrated whole instead)")
    for name in whole_tensors:
        np.testing.assert_array_equal(by_layer_tensors[name], whole_tensors[name], err_msg=name)


def test_float_stream_quantizes_a_layer_while_the_next_is_calibrated(monkeypatch):
    """The float stream hands each layer to the quantizer on a second thread and goes on calibrating the next one:
    layer 0's quantization sees layer 1's calibration start before it ends; layers are quantized in order, one at
    a time, and the sweep reports the time it waited for them."""
    events: list[str] = []
    layer_one_calibrating = threading.Event()
    set_hessians = sequential.LayerSweep._set_hessians

    def calibrating(self, extractor, layer, *args):
        events.append(f"calibrate {layer.name}")
        if layer is self.layers[1]:
            layer_one_calibrating.set()
        return set_hessians(self, extractor, layer, *args)

    monkeypatch.setattr(sequential.LayerSweep, "_set_hessians", calibrating)
    model = _llama(3)
    plans = _plans(model)
    layers, _ = sequential.group_layers(plans)
    threads = set()

    def quantize(layer, step):
        threads.add(threading.current_thread())
        events.append(f"quantize {layer.name}")
        if layer is layers[0]:
            assert layer_one_calibrating.wait(timeout=60), "layer 1 was not calibrated while layer 0 was quantized"
        events.append(f"quantized {layer.name}")
        return {}

    sweep = sequential.LayerSweep(model, plans, layers, _feeds(2), stream="float")
    sweep.run(quantize)
    assert threading.main_thread() not in threads
    assert [event for event in events if event.startswith("quantize")] == [
        f"{verb} {layer.name}" for layer in layers for verb in ("quantize", "quantized")
    ]
    assert events.index(f"calibrate {layers[1].name}") < events.index(f"quantized {layers[0].name}")
    assert sweep.seconds["quantization"] >= 0


def test_float_stream_raises_the_quantizers_error_and_stops(monkeypatch):
    """An error in a layer's quantization (on the second thread) is raised by the sweep, and no later layer is
    quantized after it."""
    model = _llama(3)
    plans = _plans(model)
    layers, _ = sequential.group_layers(plans)
    quantized = []

    def quantize(layer, step):
        if layer is layers[1]:
            raise RuntimeError(f"cannot quantize {layer.name}")
        quantized.append(layer.name)
        return {}

    with pytest.raises(RuntimeError, match=f"cannot quantize {layers[1].name}"):
        sequential.LayerSweep(model, plans, layers, _feeds(2), stream="float").run(quantize)
    assert quantized == [layers[0].name]


def _kl_to_float(model: ir.Model, replaced: dict[str, np.ndarray], feeds) -> float:
    """The definition of the budget's KL sensitivity: the whole model run with ``replaced`` weights against the float
    model, KL of the softmax of the logits, averaged over positions and samples."""
    changed = ir.from_proto(ir.to_proto(model))
    for name, value in replaced.items():
        changed.graph.initializers[name].const_value = ir.tensor(value.astype(np.float32), name=name)
    total = 0.0
    for sample in feeds:
        p, q = (run(m, sample)[0].astype(np.float64) for m in (model, changed))
        log_p, log_q = (x - x.max(-1, keepdims=True) for x in (p, q))
        log_p, log_q = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (log_p, log_q))
        total += float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean()) / len(feeds)
    return total


def test_budget_sensitivity_runs_from_each_weights_layer_and_equals_whole_model_runs():
    """``OutputSensitivity`` feeds each decoder-layer weight's candidate to the rest of the model from the cut before
    its layer: the KL equals the whole model's, alone and beside the other weights' chosen candidates."""
    from lowbit.passes.quant.rtn import quantize_rtn
    from lowbit.passes.sensitivity import OutputSensitivity
    from lowbit.runtime.session import WeightFedSession

    model, feeds = _llama(3), _feeds(2)
    plans = _plans(model)
    sensitivity = OutputSensitivity(model, plans, feeds)
    assert sensitivity.measure == "kl" and len(sensitivity.measured) == len(plans) == 21
    assert sensitivity.start_layers == [position // 7 for position in range(21)]  # 7 weights in each of 3 layers
    assert sensitivity.whole_model_reason is None
    candidates = [[quantize_rtn(plan.weight, QuantScheme(bits, 16, "oc")) for bits in (2, 4)] for plan in plans]
    plain = sensitivity.table(candidates)
    chosen = [position % 2 for position in range(len(plans))]
    in_context = sensitivity.table(candidates, chosen)
    names = [plan.first.weight.name for plan in plans]
    context = {name: row[pick].dequantize() for name, row, pick in zip(names, candidates, chosen)}
    for position in (0, 9, 20):  # first layer, middle, last weight
        assert sensitivity.error(position, plans[position].weight) == 0.0
        for column in range(2):
            alone = {names[position]: candidates[position][column].dequantize()}
            assert plain[position][column] == pytest.approx(_kl_to_float(model, alone, feeds), rel=1e-4)
            mix = {**context, **alone}
            assert in_context[position][column] == pytest.approx(_kl_to_float(model, mix, feeds), rel=1e-4)
        assert plain[position][0] > plain[position][1] > 0  # 2 bits cost more than 4
    # Beside the rest-of-model session in use no session of the whole model is kept.
    assert not [value for value in vars(sensitivity).values() if isinstance(value, WeightFedSession)]
    # A later context that changes a weight before the measured one's layer: its cut is computed again.
    changed = {**context, names[0]: candidates[0][1 - chosen[0]].dequantize()}
    weight = candidates[20][0].dequantize()
    got = sensitivity.error(20, weight, changed)
    assert got == pytest.approx(_kl_to_float(model, {**changed, names[20]: weight}, feeds), rel=1e-4)
    assert got != pytest.approx(in_context[20][0], rel=1e-4)


def test_budget_sensitivity_lets_go_of_a_loaded_models_weights_before_the_layer_it_runs_from(tmp_path):
    """The rest-of-model session from a layer's cut reads the weights of that layer on: those before it, which a
    loaded model reads from its file, are let go of (read again only for a whole-model session). The errors are
    those of the same model in memory, bit for bit."""
    from lowbit.passes.sensitivity import OutputSensitivity

    path = tmp_path / "llama.onnx"
    path.write_bytes(_llama_proto(3))
    feeds = _feeds(2)
    loaded, in_memory = lowbit.load(path), _llama(3)
    sensitivities = [OutputSensitivity(model, _plans(model), feeds) for model in (loaded, in_memory)]
    weights = [plan.weight * np.float32(1.01) for plan in _plans(in_memory)]
    held = []
    for position in (0, 7, 14, 20):  # layers 0, 1, 2, 2
        from_file, from_memory = (sensitivity.error(position, weights[position]) for sensitivity in sensitivities)
        assert from_file == from_memory > 0
        held.append(len(sensitivities[0]._memory_files._arrays))
    assert held[0] > held[1] > held[2] == held[3]  # a layer's 7 weights let go of at each cut
    assert held[0] - held[2] == 14
    plans = _plans(loaded)
    context = {plan.first.weight.name: weight for plan, weight in zip(plans, weights)}
    mixed = [sensitivity.error(0, weights[0], context) for sensitivity in sensitivities]  # a whole-model session
    assert mixed[0] == mixed[1] > 0


def test_kl_budget_on_a_graph_without_value_types_cuts_it_between_layers():
    """The sensitivity's rest-of-model sessions start at typed values: a file without value types gets them first."""
    model = _llama(2)
    for node in model.graph:
        for output in node.outputs:
            if not output.is_graph_output():
                output.type, output.shape = None, None
    recipe = lowbit.Recipe(group_size=16, budget="5", budget_sensitivity="kl", selector="matrix")
    result = lowbit.optimize(model, recipe, calibration=_feeds(2))
    check_valid(result.model)
    assert result.report.budget["bytes"] <= result.report.budget["limit_bytes"]
    assert "sensitivity_whole_model" not in result.report.budget  # the runs started at each weight's layer
    assert all(r.width_options[str(r.bits)]["sensitivity"] >= 0 for r in result.report.weights if r.width_options)


@pytest.mark.slow
@pytest.mark.parametrize(("outlier_fraction", "split"), [(0.0, False), (0.02, False), (0.0, True)])
def test_by_layer_calibration_of_a_graph_without_value_types(outlier_fraction, split):
    """The layer sweeps cut subgraphs at typed values: a file without value types gets them first, whatever the
    selector (found by the fuzzer: AdaDim with the matrix selector, whose choice runs no subgraph, failed in ONNX's
    extractor on an untyped value; then the layer split's own sweep, which runs before the quantizer's)."""
    model = _llama(2)
    for node in model.graph:
        for output in node.outputs:
            if not output.is_graph_output():
                output.type, output.shape = None, None
    recipe = lowbit.Recipe(
        bits=3,
        group_size=16,
        method="gptq",
        axis="adadim",
        selector="matrix",
        outlier_fraction=outlier_fraction,
        split=split,
    )
    result = lowbit.optimize(model, recipe, calibration=_feeds(2))
    check_valid(result.model)
    details = {p.name: p.details for p in result.report.passes}
    assert details["QuantizeWeightsPass"]["calibration"]["layers"] == 2
    if split:
        assert details["SplitOutliersPass"]["calibration_by_layer"] == {"layers": 2, "refused": None}


@pytest.mark.slow
@pytest.mark.parametrize(
    "split, outlier_fraction, budget",
    [(False, 0.0, None), (False, 0.02, None), (True, 0.0, None), (True, 0.02, None), (False, 0.0, "5")],
)
def test_a_loaded_model_reads_its_weights_when_their_layer_comes_and_quantizes_the_same(
    tmp_path, split, outlier_fraction, budget
):
    """``lowbit.load`` reads no weight: each is read from the file when a pass asks for it, and a weight the layer
    split or the dense-and-sparse outliers rewrite is read again (its outliers zeroed) rather than held until the
    sweep reaches it. The recipes (a budget's too, which reads each weight again for its written error) write the
    same tensors from the loaded file as from the same model in memory."""
    from lowbit.passes import split_outliers

    path = tmp_path / "llama.onnx"
    path.write_bytes(_llama_proto(2))
    recipe = lowbit.Recipe(
        bits=3,
        group_size=16,
        method="gptq",
        axis="adadim",
        split=split,
        outlier_fraction=outlier_fraction,
        budget=budget,
    )
    feeds = _feeds(4)
    loaded = lowbit.load(path)
    matrices = [value.const_value for value in loaded.graph.initializers.values() if len(value.shape) == 2]
    assert len(matrices) > 14 and all(isinstance(tensor, ir.LazyTensor) for tensor in matrices)
    remainders = []
    remainder = split_outliers._remainder
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(split_outliers, "_remainder", lambda *args: remainders.append(remainder(*args)) or remainders[-1])
        _, from_file = _optimize(loaded, recipe, feeds)
    _, in_memory = _optimize(_llama(), recipe, feeds)
    assert from_file.keys() == in_memory.keys()
    for name in in_memory:
        np.testing.assert_array_equal(from_file[name], in_memory[name], err_msg=name)
    assert bool(remainders) == (split or outlier_fraction > 0)
    held = [cell.cell_contents for read in remainders for cell in read.__closure__]
    assert all(not isinstance(value, np.ndarray) for value in held)
