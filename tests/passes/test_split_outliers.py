"""SplitOutliersPass: exact decompositions in the graph, fp32 parity before quantization, the quantized
graph equal to the NumPy reference, the report of what was touched, and the Recipe / CLI wiring."""

import json

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit.cli import main
from lowbit.ir import analysis
from lowbit.passes import pipelines
from lowbit.passes.capture_calibration import CaptureCalibrationPass
from lowbit.passes.fuse_qdq import FuseQDQPass
from lowbit.passes.quant import outliers
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.split_outliers import SplitOutliersPass, fused_outlier_bytes
from lowbit.runtime.calibration import calibration_of
from tests import factories
from tests.parity import assert_parity, check_valid, run, serialized

SCHEME = QuantScheme(3, 8, "oc")
#: Float32 round-off of the reordered sums (sparse branch, three split products) against one MatMul;
#: outputs reach |y| ~ 60 from sums of ~70 products, so absolute differences of 1e-5..1e-4 are round-off.
PARITY = {"rtol": 1e-5, "atol": 1e-4}


def _initial(model, name):
    return model.graph.initializers[name].const_value.numpy()


def _sparse_from_graph(model, name, shape):
    """The stored CSC arrays (with their trailing zero entry) back as SparseOutliers."""
    rows = _initial(model, f"{name}.outlier_rows").astype(np.int64)
    values = _initial(model, f"{name}.outlier_values")[:, 0]
    assert rows[-1] == 0 and values[-1] == 0
    pointers = _initial(model, f"{name}.outlier_pointers").astype(np.int64)
    cols = np.repeat(np.arange(shape[1]), np.diff(pointers))
    return outliers.SparseOutliers(rows[:-1], cols, values[:-1], shape)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3])
def test_dense_plus_sparse_in_the_graph_is_the_weight_and_outputs_keep_fp32_parity(fraction):
    reference, model = factories.mlp(), factories.mlp()
    split = SplitOutliersPass(outlier_fraction=fraction)
    assert split(model).modified
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), **PARITY)
    for name in ("w1", "w2"):
        weight = _initial(reference, name)
        sparse = _sparse_from_graph(model, name, weight.shape)
        assert sparse.nnz == round(fraction * weight.size)
        np.testing.assert_array_equal(_initial(model, name) + sparse.to_dense(), weight)
    records = {record["name"]: record for record in split.details["outliers"]}
    assert split.details["nnz"] == sum(record["nnz"] for record in records.values())
    for name, n in (("w1", 72), ("w2", 24)):  # K = 40, 72: uint8 rows; float32 values; pointers uint8/uint16
        nnz = records[name]["nnz"]
        assert records[name]["bytes"] == (nnz + 1) * (1 + 4) + (n + 1) * (1 if nnz < 256 else 2)
    assert split.details["sparse_bytes"] == sum(record["bytes"] for record in records.values())


def test_the_sparse_branch_is_not_a_weight_and_only_the_dense_part_gets_quantized():
    reference, model = factories.mlp(), factories.mlp()
    before = [(use.weight.name, use.kind) for use in analysis.weight_uses(model.graph)]
    SplitOutliersPass(outlier_fraction=0.05)(model)
    assert [(use.weight.name, use.kind) for use in analysis.weight_uses(model.graph)] == before
    dense = {name: _initial(model, name).copy() for name in ("w1", "w2")}
    sparse = {name: _sparse_from_graph(model, name, dense[name].shape).to_dense() for name in dense}
    quantize = QuantizeWeightsPass(SCHEME)
    quantize(model)
    check_valid(model)
    assert [record.name for record in quantize.weight_records] == ["w1", "w2"]
    hat = {name: quantize_rtn(dense[name], SCHEME).dequantize() + sparse[name] for name in dense}
    feeds = factories.feeds_for(model)
    hidden = np.maximum(feeds["x"].astype(np.float64) @ hat["w1"] + _initial(reference, "b1"), 0)
    np.testing.assert_allclose(
        run(model, feeds)[0], hidden @ hat["w2"] + _initial(reference, "b2"), rtol=1e-5, atol=1e-4
    )
    for name in dense:  # the outliers are reproduced exactly: the dense part is exactly zero there
        positions = sparse[name] != 0
        np.testing.assert_array_equal(hat[name][positions], _initial(reference, name)[positions])


def test_outliers_crowded_in_one_output_channel_are_summed_exactly_every_run():
    """Every outlier in one output channel, 512 of them over 512 tokens: there ONNX Runtime's
    ScatterND(reduction="add") loses updates on 2 cores; the running-sum branch must not."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((1024, 64)).astype(np.float32)
    weight[:, 3] *= 100
    x = factories.graph_input("x", [4, 128, 1024])
    matmul = factories.node("MatMul", [x, factories.constant("w", weight)], "proj", output="y")
    model = factories.model([x], [matmul.outputs[0]], [matmul], [matmul.inputs[1]])
    SplitOutliersPass(outlier_fraction=512 / weight.size, include_lm_head=True)(model)  # the larger half of channel 3
    assert np.all(_sparse_from_graph(model, "w", weight.shape).cols == 3)
    feeds = factories.feeds_for(model)
    runs = [run(model, feeds)[0] for _ in range(5)]
    assert all(np.array_equal(runs[0], other) for other in runs[1:])
    expected = feeds["x"].astype(np.float64) @ weight
    # float32 round-off of sums over 1024 products as large as 1e3 (the dense MatMul's own as well)
    np.testing.assert_allclose(runs[0], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_non_finite_weight_raises_naming_it():
    model = factories.mlp()
    bad = _initial(model, "w2").copy()
    bad[1, 2] = np.inf
    model.graph.initializers["w2"].const_value = ir.tensor(bad, name="w2")
    with pytest.raises(ValueError, match="'w2'.*NaN or Inf"):
        SplitOutliersPass(outlier_fraction=0.01)(model)


def _float16_model() -> ir.Model:
    """x -> Relu -> MatMul(W fp16 [32, 16]) -> Relu -> y, all float16."""
    weight = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float16)
    x = factories.graph_input("x", [3, 32], ir.DataType.FLOAT16)
    relu = factories.node("Relu", [x], "act")
    matmul = factories.node("MatMul", [relu.outputs[0], factories.constant("w", weight)], "proj")
    out = factories.node("Relu", [matmul.outputs[0]], "out", output="y")
    return factories.model([x], [out.outputs[0]], [relu, matmul, out], [matmul.inputs[1]])


def test_float16_weights_split_in_their_own_type_and_skip_dense_sparse():
    rng = np.random.default_rng(0)
    reference, model = _float16_model(), _float16_model()
    assert SplitOutliersPass(split=True, scheme=SCHEME, split_min_gain=1.0)(model).modified
    check_valid(model)
    assert_parity(
        reference, model, {"x": rng.standard_normal((3, 32)).astype(np.float16)}, rtol=1e-2, atol=1e-2
    )  # fp16 sums
    # dense-and-sparse keeps float32 outliers: a float16 weight is left whole (quantized as a whole later)
    model = _float16_model()
    split = SplitOutliersPass(outlier_fraction=0.1)
    assert not split(model).modified
    assert "FLOAT16" in str(split.details)


def test_sensitivity_needs_calibration_and_ranks_by_the_captured_hessian():
    with pytest.raises(ValueError, match="needs calibration statistics"):
        SplitOutliersPass(outlier_fraction=0.05, criterion="sensitivity")(factories.mlp())
    model = factories.mlp()
    CaptureCalibrationPass([factories.feeds_for(model, seed=seed) for seed in range(4)])(model)
    weight = _initial(model, "w1").copy()
    diagonal = np.diagonal(calibration_of(model).by_activation["x"].hessian)
    SplitOutliersPass(outlier_fraction=0.05, criterion="sensitivity")(model)
    _, expected = outliers.split_dense_sparse(weight, outliers.outlier_scores(weight, "sensitivity", diagonal), 0.05)
    sparse = _sparse_from_graph(model, "w1", weight.shape)
    np.testing.assert_array_equal(sparse.rows, expected.rows)
    np.testing.assert_array_equal(sparse.cols, expected.cols)


def test_layer_split_makes_three_matmuls_whose_weights_sum_to_the_original():
    reference, model = factories.mlp(), factories.mlp()
    split = SplitOutliersPass(split=True, scheme=SCHEME, split_min_gain=1.0)
    assert split(model).modified
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), **PARITY)
    assert sum(node.op_type == "MatMul" for node in model.graph) == 6
    for name in ("w1", "w2"):
        parts = [_initial(model, f"{name}.split_low"), _initial(model, name), _initial(model, f"{name}.split_high")]
        np.testing.assert_array_equal(parts[0] + parts[1] + parts[2], _initial(reference, name))
    records = split.details["split"]
    assert split.details["weights_split"] == 2 and all(record["split"] for record in records)
    assert all(record["split_error"] * record["gain"] == pytest.approx(record["base_error"]) for record in records)
    quantize = QuantizeWeightsPass(SCHEME)
    quantize(model)
    assert sorted(record.name for record in quantize.weight_records) == sorted(
        f"{name}{tail}" for name in ("w1", "w2") for tail in ("", ".split_low", ".split_high")
    )


@pytest.mark.parametrize(
    "options, decisions",
    [({}, []), ({"split": True, "scheme": SCHEME, "split_min_gain": 1e9}, [False, False])],
    ids=["nothing asked", "split gains too little"],
)
def test_nothing_to_do_leaves_the_model_byte_identical(options, decisions):
    model = factories.mlp()
    before = serialized(model)
    split = SplitOutliersPass(**options)
    assert not split(model).modified
    assert serialized(model) == before
    assert [record["split"] for record in split.details.get("split", [])] == decisions


def test_dense_sparse_and_split_together_keep_parity():
    reference, model = factories.mlp(batch=[2, 3, 4]), factories.mlp(batch=[2, 3, 4])  # rank-4 activations
    split = SplitOutliersPass(outlier_fraction=0.05, split=True, scheme=SCHEME, split_min_gain=1.0)
    assert split(model).modified
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), **PARITY)
    dense = sum(_initial(model, f"w1{tail}") for tail in ("", ".split_low", ".split_high"))
    sparse = _sparse_from_graph(model, "w1", dense.shape).to_dense()
    np.testing.assert_array_equal(dense + sparse, _initial(reference, "w1"))


@pytest.mark.parametrize("trans_b, alpha, beta", [(1, 0.5, 2.0), (0, 1.0, 1.0)])
def test_gemm_keeps_its_layout_and_gets_the_branches_on_its_output(trans_b, alpha, beta):
    reference = factories.gemm(trans_b=trans_b, alpha=alpha, beta=beta)
    model = factories.gemm(trans_b=trans_b, alpha=alpha, beta=beta)
    split = SplitOutliersPass(
        outlier_fraction=0.05, split=True, scheme=SCHEME, split_min_gain=1.0, include_lm_head=True
    )
    assert split(model).modified
    check_valid(model)
    assert model.graph.outputs[0].name == "y"
    assert_parity(reference, model, factories.feeds_for(model), **PARITY)
    original, kept = _initial(reference, "w"), _initial(model, "w")
    as_matmul = (lambda b: b.T) if trans_b else (lambda b: b)
    parts = [as_matmul(kept) * np.float32(alpha), _initial(model, "w.split_low"), _initial(model, "w.split_high")]
    sparse = _sparse_from_graph(model, "w", parts[1].shape).to_dense()
    np.testing.assert_array_equal(parts[0] + parts[1] + parts[2] + sparse, as_matmul(original) * np.float32(alpha))
    quantize = QuantizeWeightsPass(SCHEME, include_lm_head=True)
    quantize(model)
    check_valid(model)
    assert len(quantize.weight_records) == 3 and not any(node.op_type == "Gemm" for node in model.graph)


def test_output_heads_are_left_alone_unless_opted_in_and_tied_heads_always():
    split = SplitOutliersPass(outlier_fraction=0.1)
    model = factories.shared_weight()  # the second MatMul produces the graph output: an output head
    before = serialized(model)
    assert not split(model).modified
    assert serialized(model) == before
    assert split.details["skipped"][0]["reason"].startswith("output head")
    tied = SplitOutliersPass(outlier_fraction=0.1, include_lm_head=True)
    assert not tied(factories.tied_lm()).modified
    assert tied.details["skipped"][0]["reason"].startswith("tied output head")


def test_a_shared_weight_is_decomposed_once_for_all_its_matmuls():
    reference, model = factories.shared_weight(), factories.shared_weight()
    split = SplitOutliersPass(outlier_fraction=0.1, include_lm_head=True)
    assert split(model).modified
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), **PARITY)
    assert split.details["weights_with_outliers"] == 1
    assert sum(node.op_type == "CumSum" for node in model.graph) == 2
    assert sum(name.endswith("outlier_values") for name in model.graph.initializers) == 1


def test_old_opsets_are_refused_with_the_reason():
    model = factories.mlp()
    model.opset_imports[""] = 10
    with pytest.raises(ValueError, match="opset 11 or later"):
        SplitOutliersPass(outlier_fraction=0.05)(model)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"outlier_fraction": 1.0}, r"fraction must be in \[0, 1\)"),
        ({"outlier_fraction": -0.01}, r"fraction must be in \[0, 1\)"),
        ({"outlier_criterion": "size"}, "outlier_criterion must be one of"),
    ],
)
def test_recipe_validates_the_outlier_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        lowbit.Recipe(**fields)


def test_recipe_with_sensitivity_needs_calibration():
    recipe = lowbit.Recipe(outlier_fraction=0.01, outlier_criterion="sensitivity")
    assert recipe.needs_calibration
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.optimize(factories.mlp(), recipe)


def test_optimize_runs_the_pass_before_quantization_and_reports_it(tmp_path):
    source = tmp_path / "mlp.onnx"
    ir.save(factories.mlp(), source)
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    arguments = ["--bits", "3", "--group-size", "8", "--outlier-fraction", "0.02", "--split", "--report", str(report)]
    assert main(["optimize", str(source), "-o", str(output), *arguments]) == 0
    check_valid(ir.load(output))
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == [
        "FoldWeightsPass",
        "SplitOutliersPass",
        "QuantizeWeightsPass",
        "CleanupPass",
    ]
    details = data["passes"][1]["details"]
    assert details["weights_with_outliers"] == 2 and details["nnz"] == round(0.02 * 40 * 72) + round(0.02 * 72 * 24)
    assert data["recipe"]["outlier_fraction"] == 0.02 and data["recipe"]["split"] is True
    assert len(data["weights"]) == 2 + 2 * details["weights_split"]
    report_object = lowbit.OptimizeReport.from_json(report.read_text())
    assert details["weights_split"] >= 1
    float_bytes = (40 * 72 + 72 * 24) * 4  # the two weights of the input model, not their split clusters
    assert report_object.bytes_before == float_bytes
    assert details["split_bytes"] == 2 * 4 * sum(
        record["shape"][0] * record["shape"][1] for record in data["weights"] if record["name"].endswith(".split_low")
    )
    quantized = sum(record["bytes_after"] for record in data["weights"])
    assert report_object.bytes_after == quantized + details["sparse_bytes"] > quantized


def test_outlier_pipeline_keeps_the_measured_setting_on():
    with pytest.raises(ValueError, match="pass calibration data"):
        pipelines.outlier_pipeline(lowbit.Recipe(bits=3, group_size=8), calibration=None)
    model = factories.mlp()
    passes = pipelines.outlier_pipeline(
        lowbit.Recipe(bits=3, group_size=8), calibration=[factories.feeds_for(model, seed=seed) for seed in range(3)]
    )
    split = next(pass_ for pass_ in passes if isinstance(pass_, SplitOutliersPass))
    assert (split.outlier_fraction, split.criterion, split.split) == (0.005, "sensitivity", False)
    pipelines.run_pipeline(model, passes, lowbit.OptimizeReport())
    check_valid(model)
    assert split.details["weights_with_outliers"] == 2


def test_running_twice_keeps_node_names_unique():
    """Found by the fuzzer: a second run named its nodes like the first, which ONNX Runtime refuses."""
    reference, model = factories.mlp(), factories.mlp()
    for _ in range(2):
        SplitOutliersPass(outlier_fraction=0.02, split=True, scheme=SCHEME, split_min_gain=1.0)(model)
    names = [node.name for node in model.graph]
    assert len(names) == len(set(names))
    check_valid(model)
    assert_parity(reference, model, factories.feeds_for(model), **PARITY)


@pytest.mark.parametrize("k", [40, 300])  # rows stored in uint8 / uint16 by the branch, uint16 by the fused op
def test_fused_outlier_bytes_are_what_the_fused_op_stores(k):
    """``fused_outlier_bytes`` of the branch's arrays (which a fused megabyte budget counts) equals the bytes
    of lowbit::QuantMatMul's outlier inputs after fusion."""
    model = factories.mlp(k=k, hidden=64, n=24)
    SplitOutliersPass(outlier_fraction=0.05)(model)
    counted = sum(fused_outlier_bytes(value) or 0 for value in model.graph.initializers.values())
    assert counted > 0
    QuantizeWeightsPass(SCHEME)(model)
    FuseQDQPass()(model)
    fused = [node for node in model.graph if node.op_type == "QuantMatMul"]
    assert len(fused) == 2
    stored = sum(value.const_value.nbytes for node in fused for value in node.inputs[-3:])
    assert [value.name.rsplit(".", 1)[-1] for value in fused[0].inputs[-3:]] == ["pointers", "rows", "values"]
    assert counted == stored
