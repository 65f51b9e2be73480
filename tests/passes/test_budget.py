"""Recipe(budget=...): widths chosen per weight within a size budget, bytes counted as written, the graph holding
exactly the chosen candidates."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.ir import files
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import SUPPORTED_BITS, QuantScheme
from lowbit.passes.quantize_plan import SkipPolicy, plan_weights, written_structure_bytes
from tests import factories
from tests.parity import check_valid

GROUP = 64
#: An MLP large enough that 64-element groups leave room between the widths (2 bits cost 2.53 with scales).
SHAPE = {"seed": 5, "k": 128, "hidden": 192, "n": 64}


def mlp():
    return factories.mlp(**SHAPE)


def calibration(model, count: int = 4) -> list[dict[str, np.ndarray]]:
    return [factories.feeds_for(model, seed=seed) for seed in range(count)]


def optimize(budget, **options):
    model = mlp()
    feeds = calibration(model)
    recipe = lowbit.Recipe(group_size=GROUP, budget=budget, **options)
    return lowbit.optimize(model, recipe, calibration=feeds)


def uniform_bits(bits: int) -> float:
    """Average stored bits per weight of the mlp's two weights at a uniform width (portable form)."""
    result = lowbit.optimize(mlp(), lowbit.Recipe(bits=bits, group_size=GROUP), calibration=calibration(mlp()))
    weights = sum(int(np.prod(record.shape)) for record in result.report.weights)
    return 8 * result.report.bytes_after / weights


def test_bytes_within_budget_and_the_graph_holds_the_chosen_widths():
    result = optimize("3")
    check_valid(result.model)
    report = result.report
    budget = report.budget
    assert budget["bytes"] <= budget["limit_bytes"]
    assert budget["bytes"] == report.bytes_after  # the bytes the allocation counted are the bytes written
    assert budget["bits_per_weight"] <= 3.0
    matmuls = {node.name: node for node in result.model.graph if node.op_type == "MatMul"}
    for record in report.weights:
        assert set(record.width_options) == {str(bits) for bits in SUPPORTED_BITS}
        assert record.bytes_after == record.width_options[str(record.bits)]["bytes"]
        weight = mlp().graph.initializers[record.name].const_value.numpy()
        expected = quantize_rtn(weight, QuantScheme(record.bits, GROUP, record.axis))
        dequantize = matmuls[{"w1": "fc1", "w2": "fc2"}[record.name]].inputs[1].producer()
        np.testing.assert_array_equal(dequantize.inputs[0].const_value.numpy(), expected.codes)
        np.testing.assert_array_equal(dequantize.inputs[1].const_value.numpy(), expected.scales)
    assert budget["widths"] == {str(bits): sum(r.bits == bits for r in report.weights) for bits in SUPPORTED_BITS}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_budget_equal_to_a_uniform_width_is_never_worse_than_it(bits):
    budget = uniform_bits(bits) + 1e-9  # the uniform width's bytes, less than a byte above (float round-off)
    report = optimize(f"{budget:.12f}", budget_sensitivity="output").report
    uniform_error = sum(record.width_options[str(bits)]["error"] for record in report.weights)
    chosen_error = sum(record.width_options[str(record.bits)]["error"] for record in report.weights)
    assert report.budget["bytes"] <= report.budget["limit_bytes"]
    assert chosen_error <= uniform_error
    assert report.budget["output_error"] == pytest.approx(chosen_error)


def test_more_budget_never_raises_the_error():
    def optimize_on_output_error(budget):
        return optimize(budget, budget_sensitivity="output")

    errors = [optimize_on_output_error(b).report.budget["output_error"] for b in ("2.6", "3.5", "5", "9")]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] == pytest.approx(
        sum(min(o["error"] for o in r.width_options.values()) for r in optimize_on_output_error("9").report.weights)
    )


def written_bytes(model, tmp_path) -> int:
    path = lowbit.save(model, tmp_path / "written.onnx")
    return path.stat().st_size


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("outlier_fraction", [0.0, 0.03])
@pytest.mark.parametrize("name_length", [4, 200])
def test_megabyte_budget_bounds_the_written_file(tmp_path, fused, outlier_fraction, name_length):
    """The file ``save`` writes, graph and metadata included, never exceeds a megabyte budget (the fused
    outliers at the op's wider types too). Without outliers in the fused form (whose side branches the op
    absorbs, while the budget counts them: a graph the rules might not fuse keeps them) the budget is
    spent: what is left is less than the widest step between two widths plus the bytes reserved for the
    quantized form's graph."""
    options = {"fused": fused, "outlier_fraction": outlier_fraction, "outlier_criterion": "sensitivity"}

    def run(**recipe):
        model = factories.with_export_metadata(mlp(), name_length)
        recipe = lowbit.Recipe(group_size=GROUP, budget_sensitivity="output", **{**options, **recipe})
        return lowbit.optimize(model, recipe, calibration=calibration(model))

    plans = plan_weights(
        factories.with_export_metadata(mlp(), name_length).graph, SkipPolicy(), lambda uses: None
    ).plans
    reserved = sum(written_structure_bytes(plan) for plan in plans)
    widest = written_bytes(run(bits=8, fused=False).model, tmp_path)  # with any side branches
    for fraction in (0.7, 0.85, 1.0, 1.2):
        megabytes = widest * fraction / 1e6
        result = run(budget=f"{megabytes!r}MB")
        written = written_bytes(result.model, tmp_path)
        assert written == files.file_bytes(result.model)
        assert written <= megabytes * 1e6
        spent = not (fused and outlier_fraction) and any(r.bits < 8 for r in result.report.weights)
        if spent:
            step = max(max(o["bytes"] for o in r.width_options.values()) for r in result.report.weights)
            assert megabytes * 1e6 - written < step + reserved


def test_fused_budget_counts_the_packed_bytes():
    result = optimize("3", fused=True)
    fused = [node for node in result.model.graph if node.op_type == "QuantMatMul"]
    assert len(fused) == 2
    stored = sum(value.const_value.nbytes for node in fused for value in node.inputs[1:4] if value is not None)
    assert result.report.budget["bytes"] == stored


def test_budget_below_the_narrowest_width_is_refused():
    with pytest.raises(ValueError, match="budget 1 bits per weight: .*below the cheapest"):
        optimize("1")


def test_recipe_budget_field():
    assert lowbit.Recipe(budget=3.5).budget == "3.5"
    assert lowbit.Recipe(budget="180MB").budget == "180MB"
    assert lowbit.Recipe(budget="3").needs_calibration
    assert "budget='3'" in lowbit.Recipe(budget="3").calibration_reasons
    with pytest.raises(ValueError, match="budget"):
        lowbit.Recipe(budget="three")
    with pytest.raises(ValueError, match="needs calibration"):
        lowbit.optimize(mlp(), lowbit.Recipe(budget="3"))


def test_summary_names_the_budget():
    summary = optimize("3").report.summary()
    assert "budget 3 bits per weight: the quantized weights take" in summary


def test_embedding_tables_keep_the_recipe_width_and_count_against_the_budget():
    """A table has no calibration statistics (a Gather's input is token ids): it keeps ``bits``, its bytes
    count, and a budget it alone exceeds is refused."""
    model = factories.tied_lm()
    recipe = lowbit.Recipe(bits=4, group_size=GROUP, include_embeddings=True, budget="8")
    result = lowbit.optimize(model, recipe, calibration=[factories.feeds_for(model)])
    (record,) = result.report.weights
    assert record.kind == "embedding" and record.bits == 4 and record.width_options == {}
    assert result.report.budget["bytes"] == record.bytes_after
    model = factories.tied_lm()
    with pytest.raises(ValueError, match="without calibration statistics .* alone take"):
        lowbit.optimize(
            model, lowbit.Recipe(bits=8, include_embeddings=True, budget="4"), calibration=[factories.feeds_for(model)]
        )


# -- budget_sensitivity="kl": the model's output measured end to end (passes/sensitivity.py) --------------------


def tiny_lm(seed: int = 3, k: int = 64, hidden: int = 128, vocab: int = 96):
    """x -> fc1 -> Relu -> fc2 -> Relu -> lm_head -> logits: an output head, so the measure is the logits' KL."""
    rng = np.random.default_rng(seed)
    x = factories.graph_input("x", [2, 7, k])
    w1 = factories.constant("w1", (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32))
    w2 = factories.constant("w2", (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32))
    head = factories.constant("head", rng.standard_normal((hidden, vocab)).astype(np.float32))
    fc1 = factories.node("MatMul", [x, w1], "fc1")
    relu1 = factories.node("Relu", [fc1.outputs[0]], "act1")
    fc2 = factories.node("MatMul", [relu1.outputs[0], w2], "fc2")
    relu2 = factories.node("Relu", [fc2.outputs[0]], "act2")
    logits = factories.node("MatMul", [relu2.outputs[0], head], "lm_head", output="logits")
    return factories.model([x], [logits.outputs[0]], [fc1, relu1, fc2, relu2, logits], [w1, w2, head])


def _log_softmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_kl(float_logits: np.ndarray, logits: np.ndarray) -> float:
    """KL(softmax(float) || softmax(logits)) per position, averaged: the textbook form, in float64."""
    log_p, log_q = _log_softmax(float_logits), _log_softmax(logits)
    return float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())


def rounded_p_tolerance(float_logits: np.ndarray, logits: np.ndarray) -> float:
    """How far a KL weighted by float32-rounded probabilities may lie from the textbook one: each ``p`` is off by up
    to 2^-24 of itself, times ``|log p - log q|``, whose first-order terms then no longer cancel exactly."""
    log_p, log_q = _log_softmax(float_logits), _log_softmax(logits)
    return 2.0**-22 * float((np.exp(log_p) * np.abs(log_p - log_q)).sum(axis=-1).mean()) + 1e-15


@settings(max_examples=60, deadline=None)
@given(
    positions=st.integers(1, 40),  # across the blocks' edges
    vocab=st.integers(1, 70),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),  # flat, ordinary and peaked distributions
    noise=st.sampled_from([0.0, 1e-4, 0.1, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_the_kl_of_a_candidates_logits_is_the_textbook_kl(positions, vocab, scale, noise, seed):
    """``_Distribution`` keeps the float softmax in float32 and works a block of positions at a time: the KL it
    gives is the float64 textbook KL to float32's precision of the probabilities, and exactly 0 for the float
    logits themselves."""
    from lowbit.passes.sensitivity import _Distribution

    rng = np.random.default_rng(seed)
    float_logits = (scale * rng.standard_normal((1, positions, vocab))).astype(np.float32)
    logits = (float_logits + noise * rng.standard_normal(float_logits.shape)).astype(np.float32)
    distribution = _Distribution(float_logits)
    assert distribution.kl(float_logits) == 0.0
    expected = reference_kl(float_logits, logits)
    assert distribution.kl(logits) == pytest.approx(expected, rel=1e-9, abs=rounded_p_tolerance(float_logits, logits))


@pytest.mark.parametrize(("make", "measure"), [(tiny_lm, "kl"), (mlp, "relative_mse")])
def test_end_to_end_sensitivity_is_zero_for_the_float_weight_and_grows_with_coarser_codes(make, measure):
    from lowbit.passes.quantize_plan import SkipPolicy, plan_weights
    from lowbit.passes.sensitivity import OutputSensitivity

    model = make()
    plans = plan_weights(model.graph, SkipPolicy(), lambda uses: None).plans
    assert [plan.first.weight.name for plan in plans] == ["w1", "w2"]  # the head stays in float
    sensitivity = OutputSensitivity(model, plans, calibration(model, 2))
    assert sensitivity.measure == measure and sensitivity.measured == [0, 1]
    for position, plan in enumerate(plans):
        assert sensitivity.error(position, plan.weight) == 0.0
        errors = [
            sensitivity.error(position, quantize_rtn(plan.weight, QuantScheme(bits, GROUP, "oc")).dequantize())
            for bits in (8, 4, 3, 2)
        ]
        assert all(error > 0 for error in errors)
        assert errors == sorted(errors)  # coarser codes, larger output error


def test_sensitivity_in_context_judges_each_weight_beside_the_others_at_their_chosen_widths():
    """``table(candidates, chosen)``: every other weight is fed at its chosen candidate. Each weight's error at
    its own chosen candidate is the mix's error (the same model), larger than either weight's error alone (they
    compound); with the other weight fed as float again, a weight's error is its plain one."""
    from lowbit.passes.quantize_plan import SkipPolicy, plan_weights
    from lowbit.passes.sensitivity import OutputSensitivity

    model = tiny_lm()
    plans = plan_weights(model.graph, SkipPolicy(), lambda uses: None).plans
    sensitivity = OutputSensitivity(model, plans, calibration(model, 2))
    candidates = [[quantize_rtn(plan.weight, QuantScheme(bits, GROUP, "oc")) for bits in (2, 4, 8)] for plan in plans]
    plain = sensitivity.table(candidates)
    mix = [0, 1]  # w1 at 2 bits, w2 at 4
    in_context = sensitivity.table(candidates, mix)
    mix_error = in_context[0][mix[0]]
    assert in_context[1][mix[1]] == pytest.approx(mix_error, rel=1e-12)
    assert mix_error > max(plain[0][0], plain[1][1])  # the two errors compound
    assert in_context != plain
    context = sensitivity.contexts(candidates, mix)
    alone = {**context, "w2": plans[1].weight}  # w2 float, w1 at its chosen 2 bits
    assert sensitivity.error(0, candidates[0][0].dequantize(), alone) == pytest.approx(plain[0][0], rel=1e-12)


@pytest.mark.parametrize(("make", "measure"), [(tiny_lm, "kl"), (mlp, "relative_mse")])
@pytest.mark.parametrize("budget", ["2.6", "3", "3.5"])
def test_kl_budget_stays_within_its_limit_and_records_the_measure(make, measure, budget):
    model = make()
    recipe = lowbit.Recipe(group_size=GROUP, budget=budget, budget_sensitivity="kl")
    result = lowbit.optimize(model, recipe, calibration=calibration(model))
    check_valid(result.model)
    details = result.report.budget
    assert details["bytes"] <= details["limit_bytes"]
    assert details["bytes"] == result.report.bytes_after
    assert details["sensitivity"] == "kl" and details["sensitivity_measure"] == measure
    assert details["sensitivity_samples"] == 2
    assert details["sensitivity_whole_model"] == "no measured weight lies in a decoder layer"  # none has layers
    records = result.report.weights
    assert all({"error", "sensitivity", "bytes"} <= set(o) for r in records for o in r.width_options.values())
    chosen = sum(r.width_options[str(r.bits)]["sensitivity"] for r in records)
    assert details["sensitivity_error"] == pytest.approx(chosen)
    assert details["output_error"] == pytest.approx(sum(r.width_options[str(r.bits)]["error"] for r in records))


def test_kl_budget_is_never_worse_than_a_uniform_width_in_its_own_measure():
    budget = uniform_bits(3) + 1e-9
    report = optimize(f"{budget:.12f}", budget_sensitivity="kl").report
    uniform = sum(record.width_options["3"]["sensitivity"] for record in report.weights)
    assert report.budget["sensitivity_error"] <= uniform


def test_kl_budget_keeps_weights_a_feed_cannot_replace_at_the_recipe_width():
    """A Gemm's transB weight is stored [N, K]: no candidate can be fed for it, so it keeps ``bits``."""
    model = factories.gemm(k=64, n=48)
    recipe = lowbit.Recipe(bits=4, group_size=GROUP, include_lm_head=True, budget="8", budget_sensitivity="kl")
    result = lowbit.optimize(model, recipe, calibration=calibration(model))
    (record,) = result.report.weights
    assert record.bits == 4 and record.width_options == {}
    assert result.report.budget["not_measured"] == [record.name]
    assert result.report.budget["fixed_width"] == 1


def test_budget_sensitivity_is_validated():
    from lowbit.passes.quant.allocate import parse_budget
    from lowbit.passes.quantize_plan import SizeBudget

    assert lowbit.Recipe().budget_sensitivity == "kl"
    with pytest.raises(ValueError, match="budget_sensitivity"):
        lowbit.Recipe(budget="3", budget_sensitivity="hessian")
    with pytest.raises(ValueError, match="budget sensitivity must be one of"):
        SizeBudget(parse_budget("3"), sensitivity="hessian")
    with pytest.raises(ValueError, match="sensitivity_samples"):
        SizeBudget(parse_budget("3"), sensitivity="kl", sensitivity_samples=0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files through /proc")
def test_the_float_probabilities_wait_in_a_temporary_file_closed_with_the_distribution():
    """``_Distribution`` keeps three float64 numbers per position in memory, not the ``positions x vocabulary``
    probabilities: those are in a temporary file, closed once the distribution is gone."""
    from lowbit.passes.sensitivity import _Distribution

    rng = np.random.default_rng(0)
    float_logits = rng.standard_normal((1, 40, 300)).astype(np.float32)
    gc.collect()  # files an earlier test's garbage holds (a loaded model's) close now, not inside the count
    before = len(os.listdir("/proc/self/fd"))
    distribution = _Distribution(float_logits)
    held = sum(value.nbytes for value in vars(distribution).values() if isinstance(value, np.ndarray))
    assert held == 3 * 40 * 8
    assert len(os.listdir("/proc/self/fd")) == before + 1
    logits = float_logits + 0.1 * rng.standard_normal(float_logits.shape).astype(np.float32)
    assert distribution.kl(logits) == pytest.approx(reference_kl(float_logits, logits), rel=1e-6)
    del distribution
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
