"""lowbit.runtime.session registers the op library, and says how to build it when it is missing or stale."""

import os

import numpy as np
import onnx
import pytest
from onnx import helper

from lowbit.kernels import _lib, reference
from lowbit.kernels.model import QuantMatMulWeights, quant_matmul_model
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.runtime import session


@pytest.fixture
def lowbit_model(tmp_path):
    weight = np.random.default_rng(0).standard_normal((32, 16))
    quantized = quantize_rtn(weight, QuantScheme(bits=4, group_size=16, group_axis="ic"))
    weights = QuantMatMulWeights.from_quantized(quantized)
    path = tmp_path / "quant_matmul.onnx"
    onnx.save(quant_matmul_model(weights, ("M", 32)), path)
    return path, weights


@pytest.fixture
def float_model(tmp_path):
    node = helper.make_node("Relu", ["X"], ["Y"])
    graph = helper.make_graph(
        [node],
        "relu",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def test_session_registers_the_built_library(ops_library, lowbit_model):
    path, weights = lowbit_model
    a = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    y = session.session(path, intra_op_threads=1).run(None, {"A": a})[0]
    expected = reference.quant_matmul(a, *weights.inputs(), **weights.attributes)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="lowbit:QuantMatMul"):
        session.session(path, use_lowbit_ops=False)


def test_missing_library_names_the_build_command(monkeypatch, tmp_path, lowbit_model, float_model):
    monkeypatch.setenv("LOWBIT_OPS_LIBRARY", str(tmp_path / "absent.so"))
    assert not _lib.is_built()
    for use_lowbit_ops in (None, True):
        with pytest.raises(_lib.KernelsNotBuiltError, match="python kernels/build.py"):
            session.session(lowbit_model[0], use_lowbit_ops=use_lowbit_ops)
    y = session.session(float_model).run(None, {"X": np.array([-1.0, 2.0], np.float32)})[0]
    np.testing.assert_array_equal(y, [0.0, 2.0])  # models without lowbit ops run as before


def test_a_library_older_than_its_sources_is_refused_by_name(monkeypatch, lowbit_model, float_model):
    """A stale library runs old kernels and ignores attributes added since (int8_activations): never silently."""
    from lowbit.kernels import build

    monkeypatch.delenv("LOWBIT_OPS_LIBRARY", raising=False)
    if not build.LIBRARY.is_file():
        pytest.skip("the op library is not built")
    monkeypatch.setattr(build, "newer_sources", lambda library=build.LIBRARY: ["int8.cpp"])
    assert not _lib.is_built()
    for use_lowbit_ops in (None, True):
        with pytest.raises(_lib.KernelsNotBuiltError, match=r"older than its sources \(int8.cpp\).*kernels/build.py"):
            session.session(lowbit_model[0], use_lowbit_ops=use_lowbit_ops)
    y = session.session(float_model).run(None, {"X": np.array([-1.0, 2.0], np.float32)})[0]
    np.testing.assert_array_equal(y, [0.0, 2.0])


def test_newer_sources_names_the_files_changed_after_the_build(monkeypatch, tmp_path):
    from lowbit.kernels import build

    (old := tmp_path / "old.cpp").write_text("")
    (new := tmp_path / "new.cpp").write_text("")
    (library := tmp_path / "lib.so").write_text("")
    monkeypatch.setattr(build, "_sources", lambda: [old, new])
    for path, when in ((old, 100), (library, 200), (new, 300)):
        os.utime(path, (when, when))
    assert build.newer_sources(library) == ["new.cpp"]
