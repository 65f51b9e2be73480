"""Public API: load/save safety, Recipe validation, optimize end to end on a small graph."""

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit.passes.pipelines import DUMP_DIR_VARIABLE
from tests import factories
from tests.parity import check_valid, run


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(factories.mlp(), path)
    return path


def test_optimize_save_load_round_trip(mlp_file, tmp_path):
    digest = _sha(mlp_file)
    model = lowbit.load(mlp_file)
    result = lowbit.optimize(model, lowbit.Recipe(bits=4, group_size=16, axis="ic"))
    assert result.model is model
    output = lowbit.save(result.model, tmp_path / "mlp.w4.onnx")
    assert _sha(mlp_file) == digest  # the input is untouched
    reloaded = lowbit.load(output)
    check_valid(reloaded)
    assert output.stat().st_size < mlp_file.stat().st_size
    report = result.report
    assert [p.name for p in report.passes] == ["FoldWeightsPass", "QuantizeWeightsPass", "CleanupPass"]
    assert [w.name for w in report.weights] == ["w1", "w2"]
    assert all(0 < w.relative_error < 0.2 for w in report.weights)
    again = lowbit.OptimizeReport.from_json(report.to_json())
    assert again == report
    assert json.loads(report.to_json())["recipe"]["axis"] == "ic"
    feeds = factories.feeds_for(reloaded)
    float_out = run(factories.mlp(), feeds)[0]
    quant_out = run(reloaded, feeds)[0]
    assert np.linalg.norm(quant_out - float_out) / np.linalg.norm(float_out) < 0.1


def test_save_leaves_no_temporary_file_behind(mlp_file, tmp_path):
    lowbit.save(lowbit.load(mlp_file), tmp_path / "copy.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "mlp.onnx"]


def test_optimize_with_calibration_runs_adadim_gptq_and_reports_output_error():
    model = factories.mlp()
    batches = [factories.feeds_for(model, seed=seed) for seed in range(4)]
    result = lowbit.optimize(
        model, lowbit.Recipe(bits=3, group_size=16, axis="adadim", method="gptq"), calibration=batches
    )
    assert [p.name for p in result.report.passes] == [
        "FoldWeightsPass",
        "CaptureCalibrationPass",
        "QuantizeWeightsPass",
        "CleanupPass",
    ]
    assert result.report.passes[1].details["batches"] == 4
    assert all(
        w.method == "gptq" and w.output_error is not None and set(w.axis_errors) == {"oc", "ic"}
        for w in result.report.weights
    )
    check_valid(result.model)


ADADIM_GPTQ = lowbit.Recipe(bits=3, group_size=16, axis="adadim", method="gptq", selector="matrix")


def test_statistics_collected_by_optimize_drop_their_hessians_before_the_weights_are_written(monkeypatch):
    import weakref

    from lowbit.passes import capture_calibration, quantize_weights

    collected, alive_at_write = [], []

    def collect(*args, **kwargs):
        stats = capture_calibration.collect.__wrapped__(*args, **kwargs)
        collected.extend(weakref.ref(accumulator.hessian) for accumulator in stats.by_activation.values())
        return stats

    def write_weight(*args, **kwargs):
        alive_at_write.append(sum(ref() is not None for ref in collected))
        return write_weight.__wrapped__(*args, **kwargs)

    collect.__wrapped__ = capture_calibration.collect
    write_weight.__wrapped__ = quantize_weights.write_weight
    monkeypatch.setattr(capture_calibration, "collect", collect)
    monkeypatch.setattr(quantize_weights, "write_weight", write_weight)
    model = factories.mlp()
    lowbit.optimize(model, ADADIM_GPTQ, calibration=[factories.feeds_for(model, seed=seed) for seed in range(4)])
    assert len(collected) == 2 and alive_at_write == [0, 0]


def test_statistics_passed_in_keep_their_hessians_and_give_what_collected_ones_give():
    """Callers reuse one collect() across recipes: optimize must not empty it; the release of collected
    statistics changes nothing in the model or the report."""
    import dataclasses

    from lowbit.runtime.calibration import collect

    def outcome(calibration):
        result = lowbit.optimize(factories.mlp(), ADADIM_GPTQ, calibration=calibration)
        return ir.to_proto(result.model).SerializeToString(), [dataclasses.asdict(w) for w in result.report.weights]

    batches = [factories.feeds_for(factories.mlp(), seed=seed) for seed in range(4)]
    stats = collect(factories.mlp(), batches)
    before = {name: accumulator.hessian.copy() for name, accumulator in stats.by_activation.items()}
    assert outcome(stats) == outcome(stats) == outcome(batches)
    for name, hessian in before.items():
        np.testing.assert_array_equal(stats.by_activation[name].hessian, hessian)


def test_optimize_needs_an_ir_model(mlp_file):
    with pytest.raises(TypeError, match="lowbit.load"):
        lowbit.optimize(str(mlp_file), lowbit.Recipe())


def test_dump_dir_saves_the_model_after_each_pass(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_DIR_VARIABLE, str(tmp_path / "dump"))
    lowbit.optimize(factories.mlp(), lowbit.Recipe(bits=8))
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumped == ["00_FoldWeightsPass.onnx", "01_QuantizeWeightsPass.onnx", "02_CleanupPass.onnx"]
    check_valid(ir.load(tmp_path / "dump" / "02_CleanupPass.onnx"))


def test_fused_recipe_writes_fused_ops_that_run_in_a_lowbit_session(mlp_file, tmp_path, ops_library):
    from lowbit.runtime.session import session

    recipe = lowbit.Recipe(bits=3, group_size=16, axis="ic", scale_dtype="float16")  # the fused form's default
    portable = lowbit.optimize(lowbit.load(mlp_file), recipe).model
    result = lowbit.optimize(lowbit.load(mlp_file), dataclasses.replace(recipe, fused=True))
    assert [p.name for p in result.report.passes][-2:] == ["FuseQDQPass", "CleanupPass"]
    assert [node.op_type for node in result.model.graph] == ["QuantMatMul", "Relu", "QuantMatMul"]
    path = lowbit.save(result.model, tmp_path / "mlp.w3.fused.onnx")
    feeds = factories.feeds_for(result.model)
    fused = session(path).run(None, feeds)[0]
    expected = run(portable, feeds)[0]
    np.testing.assert_allclose(fused, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("recipe", "error", "message"),
    [
        ({"bits": 4}, TypeError, "optimize\\(\\) takes a lowbit.Recipe"),
        ("rtn", TypeError, "optimize\\(\\) takes a lowbit.Recipe"),
    ],
)
def test_optimize_refuses_what_is_not_a_recipe(recipe, error, message):
    with pytest.raises(error, match=message):
        lowbit.optimize(factories.mlp(), recipe)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"symmetric": "no"}, TypeError, "Recipe.symmetric must be a bool, got 'no'"),
        ({"bits": 4.0}, TypeError, "Recipe.bits must be a int"),
        ({"bits": True}, TypeError, "Recipe.bits must be a int"),
        ({"bits": 7}, ValueError, "Recipe.bits must be one of \\(2, 3, 4, 5, 6, 8\\)"),
        ({"group_size": "128"}, TypeError, "Recipe.group_size must be a int"),
        ({"axis": "rows"}, ValueError, "Recipe.axis must be one of"),
        ({"reorder": "size"}, ValueError, "Recipe.reorder must be one of \\('absmax', 'hessian'\\) or None"),
        ({"fused": 1}, TypeError, "Recipe.fused must be a bool"),
        ({"outlier_fraction": 1.0}, ValueError, "outlier_fraction must be in \\[0, 1\\)"),
        ({"outlier_fraction": "0.1"}, TypeError, "Recipe.outlier_fraction must be a float"),
        ({"head_bits": 4}, ValueError, "head_bits applies to the LM head and embedding tables: include one"),
        ({"head_bits": 7, "include_lm_head": True}, ValueError, "Recipe.head_bits must be one of"),
        ({"head_bits": 4, "include_lm_head": True, "budget": "3"}, ValueError, "head_bits and Recipe.budget exclude"),
    ],
)
def test_recipe_checks_every_fields_type_and_values(fields, error, message):
    with pytest.raises(error, match=message):
        lowbit.Recipe(**fields)


def test_recipe_accepts_numpy_numbers():
    recipe = lowbit.Recipe(bits=np.int64(3), group_size=np.int32(32), outlier_fraction=np.float32(0.01))
    assert recipe.scheme().bits == 3


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ({"x": np.zeros((2, 16), np.float32)}, "wrap a single feed dict in a list"),
        (np.zeros((2, 16), np.float32), "got ndarray"),
        ("batches.npz", "got str"),
    ],
)
def test_optimize_refuses_calibration_that_is_not_a_list_of_feeds(calibration, message):
    recipe = lowbit.Recipe(bits=4, group_size=16, method="gptq")
    with pytest.raises(TypeError, match=f"calibration must be a list of feed dicts.*{message}"):
        lowbit.optimize(factories.mlp(), recipe, calibration=calibration)


def test_statistics_of_another_model_are_refused_by_name():
    from lowbit.runtime.calibration import collect

    narrow = factories.mlp(k=16)
    stats = collect(narrow, [factories.feeds_for(narrow, seed=seed) for seed in range(2)])
    with pytest.raises(ValueError, match="statistics do not fit this model: activation .* channels"):
        lowbit.optimize(factories.mlp(k=32), lowbit.Recipe(bits=4, group_size=8, method="gptq"), calibration=stats)


def test_save_accepts_an_onnx_model_proto_and_refuses_other_objects(tmp_path):
    proto = ir.to_proto(factories.mlp())
    path = lowbit.save(proto, tmp_path / "from_proto.onnx")
    check_valid(lowbit.load(path))
    with pytest.raises(TypeError, match="save\\(\\) takes an onnx_ir.Model .* got dict"):
        lowbit.save({"graph": None}, tmp_path / "x.onnx")


def test_save_names_a_parent_that_is_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="'.*a_file' is a file, not a folder"):
        lowbit.save(factories.mlp(), tmp_path / "a_file" / "m.onnx")


def test_a_long_legal_output_name_saves(tmp_path):
    name = "m" * 250 + ".onnx"  # 255 bytes: the longest a name can be; the staging name must not be longer
    path = lowbit.save(factories.mlp(), tmp_path / name)
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [name]
    with pytest.raises(ValueError, match="bytes; this file system allows 255"):
        lowbit.save(factories.mlp(), tmp_path / ("m" * 251 + ".onnx"))


def test_threads_saving_to_one_path_never_leave_a_corrupt_file(tmp_path):
    import concurrent.futures

    models = [factories.mlp(seed=seed) for seed in range(4)]
    path = tmp_path / "shared.onnx"
    for _ in range(5):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda model: lowbit.save(model, path), models))
        check_valid(lowbit.load(path))  # one complete model, whichever thread finished last
        assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.onnx"]


def test_sigterm_during_save_leaves_no_partial_file(tmp_path):
    """SIGTERM while the tensors are written: the previous output stays and nothing else is left."""
    import subprocess
    import sys
    import textwrap

    output = tmp_path / "model.onnx"
    output.write_bytes(b"previous output")
    script = textwrap.dedent(f"""
        import os, signal, time
        import lowbit
        from lowbit.ir import proto_stream
        from tests import factories
        real_write = proto_stream.write_model
        def slow_write(model, path):
            real_write(model, path)
            os.kill(os.getpid(), signal.SIGTERM)  # arrives after the staging file is written, before it moves
            time.sleep(5)
        proto_stream.write_model = slow_write
        lowbit.save(factories.mlp(), {str(output)!r})
    """)
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    assert completed.returncode == 128 + 15, completed.stderr
    assert output.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_optimize_takes_an_onnx_model_proto_and_leaves_it_alone():
    proto = ir.to_proto(factories.mlp())
    before = proto.SerializeToString()
    result = lowbit.optimize(proto, lowbit.Recipe(bits=4, group_size=8))
    assert len(result.report.weights) == 2 and proto.SerializeToString() == before
    check_valid(result.model)


def test_load_names_sparse_initializers(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    values = helper.make_tensor("w_values", TensorProto.FLOAT, [2], [1.0, 2.0])
    indices = helper.make_tensor("w_indices", TensorProto.INT64, [2], [0, 5])
    sparse = helper.make_sparse_tensor(values, indices, [4, 3])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_values"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        sparse_initializer=[sparse],
    )
    path = tmp_path / "sparse.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    with pytest.raises(ValueError, match="has sparse initializers \\(w_values\\), which lowbit does not read"):
        lowbit.load(path)


def test_load_without_the_checker_keeps_the_other_checks(tmp_path):
    """A contrib op in the ONNX domain (as the genai builder writes SimplifiedLayerNormalization): the
    checker refuses it, checker=False loads it; a missing data file is still refused by name."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], name="norm", axis=-1)],
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("g", TensorProto.FLOAT, [4], [1.0] * 4)],
    )
    path = tmp_path / "contrib.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        lowbit.load(path)
    assert [node.op_type for node in lowbit.load(path, checker=False).graph] == ["SimplifiedLayerNormalization"]
    with pytest.raises(FileNotFoundError):
        lowbit.load(tmp_path / "absent.onnx", checker=False)


def test_loaded_tensors_own_their_bytes_and_save_as_they_were(tmp_path):
    """lowbit.load gives plain raw-data tensors NumPy arrays of their own (each numpy() is the same array, not
    another copy of the parsed proto's bytes), a doc_string too; others keep a proto of their own (here
    float_data). Saved unchanged, every tensor is written back as the file had it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    plain = numpy_helper.from_array(np.arange(8 * 4, dtype=np.float32).reshape(8, 4), "w")
    scalar = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "s")
    listed = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.5] * 4)  # float_data, not raw_data
    described = numpy_helper.from_array(np.ones(4, dtype=np.float32), "c")
    described.doc_string = "bias"
    constant = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(4, np.float32), "kv"))
    graph = helper.make_graph(
        [
            constant,
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Mul", ["h", "s"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Add", ["a", "c"], ["a2"]),
            helper.make_node("Add", ["a2", "k"], ["y"]),
        ],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [plain, scalar, listed, described],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    model = lowbit.load(path)
    weights = model.graph.initializers
    assert isinstance(weights["w"].const_value, ir.Tensor)
    assert weights["w"].const_value.numpy() is weights["w"].const_value.numpy()
    assert isinstance(weights["b"].const_value, ir.serde.TensorProtoTensor)
    assert isinstance(weights["c"].const_value, ir.Tensor)
    output = lowbit.save(model, tmp_path / "again.onnx")
    before, after = onnx.load(path), onnx.load(output)
    assert [t.SerializeToString() for t in after.graph.initializer] == [
        t.SerializeToString() for t in before.graph.initializer
    ]
    assert after.graph.node[0].SerializeToString() == before.graph.node[0].SerializeToString()


def test_gptq_damping_reaches_gptq():
    """A recipe field is one edit plus its use: Recipe.gptq_damping is the dampening GPTQ gets."""
    from lowbit.passes import pipelines
    from lowbit.passes.quantize_weights import QuantizeWeightsPass

    model = factories.mlp()
    feeds = [factories.feeds_for(model, seed=seed) for seed in range(3)]
    codes = {}
    for damping in (0.01, 1.0):
        recipe = lowbit.Recipe(bits=3, group_size=8, method="gptq", gptq_damping=damping)
        (quantize,) = [
            p for p in pipelines.portable_pipeline(recipe, calibration=feeds) if isinstance(p, QuantizeWeightsPass)
        ]
        assert quantize.quantizer.gptq_damp == damping
        result = lowbit.optimize(factories.mlp(), recipe, calibration=feeds)
        codes[damping] = [
            result.model.graph.initializers[f"{layer}.qweight"].const_value.numpy() for layer in ("fc1", "fc2")
        ]
    assert any(not np.array_equal(a, b) for a, b in zip(codes[0.01], codes[1.0]))
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="gptq_damping must be > 0"):
            lowbit.Recipe(gptq_damping=bad)


def test_large_weights_are_read_from_the_file_when_asked_for(tmp_path):
    """lowbit.load reads no large weight: each is read from the file when its values are asked for and nothing
    holds them (readers at one time share one read-only array; none is kept once they let go), also after the file
    was moved or deleted; a file changed in place is refused, naming it and the tensor. Saved, the tensors are the
    file's."""
    import os
    import weakref

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "large.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    model = lowbit.load(path)
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.LazyTensor)
    first, second = tensor.numpy(), tensor.numpy()
    assert np.shares_memory(first, second) and not first.flags.writeable
    np.testing.assert_array_equal(first, weight)
    read = weakref.ref(first.base)
    del first, second
    assert read() is None
    saved = lowbit.save(model, tmp_path / "saved.onnx")
    assert (
        onnx.load(saved).graph.initializer[0].SerializeToString()
        == onnx.load(path).graph.initializer[0].SerializeToString()
    )

    moved = tmp_path / "moved.onnx"
    os.replace(path, moved)
    np.testing.assert_array_equal(tensor.numpy(), weight)
    with open(moved, "ab") as file:  # changed in place
        file.write(b"\0")
    with pytest.raises(ValueError, match=r"large\.onnx.* changed after lowbit.load read it \(tensor 'w'"):
        tensor.numpy()

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    model = lowbit.load(path)
    path.unlink()
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), weight)
