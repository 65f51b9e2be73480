"""Recipe(budget=...): widths chosen per weight within a size budget, bytes counted as written, the graph holding
exactly the chosen candidates."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit.ir import files
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
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
        assert set(record.width_options) == {"2", "3", "4", "8"}
        assert record.bytes_after == record.width_options[str(record.bits)]["bytes"]
        weight = mlp().graph.initializers[record.name].const_value.numpy()
        expected = quantize_rtn(weight, QuantScheme(record.bits, GROUP, record.axis))
        dequantize = matmuls[{"w1": "fc1", "w2": "fc2"}[record.name]].inputs[1].producer()
        np.testing.assert_array_equal(dequantize.inputs[0].const_value.numpy(), expected.codes)
        np.testing.assert_array_equal(dequantize.inputs[1].const_value.numpy(), expected.scales)
    assert budget["widths"] == {str(bits): sum(r.bits == bits for r in report.weights) for bits in (2, 3, 4, 8)}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_budget_equal_to_a_uniform_width_is_never_worse_than_it(bits):
    budget = uniform_bits(bits) + 1e-9  # the uniform width's bytes, less than a byte above (float round-off)
    report = optimize(f"{budget:.12f}").report
    uniform_error = sum(record.width_options[str(bits)]["error"] for record in report.weights)
    chosen_error = sum(record.width_options[str(record.bits)]["error"] for record in report.weights)
    assert report.budget["bytes"] <= report.budget["limit_bytes"]
    assert chosen_error <= uniform_error
    assert report.budget["output_error"] == pytest.approx(chosen_error)


def test_more_budget_never_raises_the_error():
    errors = [optimize(budget).report.budget["output_error"] for budget in ("2.6", "3.5", "5", "9")]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] == pytest.approx(
        sum(min(o["error"] for o in r.width_options.values()) for r in optimize("9").report.weights)
    )


def test_megabyte_budget_counts_every_tensor_of_the_model():
    floor = optimize("3").report.budget["limit_bytes"]  # the quantized weights at 3 bits on average
    others = sum(t.nbytes for _, t in files.tensors(mlp())) - sum(
        int(np.prod(r.shape)) * 4 for r in optimize("3").report.weights
    )
    megabytes = float(floor + others + 200) / 1e6
    result = optimize(f"{megabytes!r}MB")
    total = sum(tensor.nbytes for _, tensor in files.tensors(result.model))
    assert total <= megabytes * 1e6
    assert result.report.budget["limit_bytes"] == pytest.approx(megabytes * 1e6 - others)


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
    with pytest.raises(ValueError, match="size budget is not supported with calibration_mode='sequential'"):
        optimize("3", calibration_mode="sequential")
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
