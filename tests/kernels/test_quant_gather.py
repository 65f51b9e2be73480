"""lowbit::QuantGather (rows of a tied embedding table read as columns of a packed QuantMatMul weight): the C++
op through ONNX Runtime equals the NumPy oracle bitwise (it is pure dequantization), and the oracle equals
``dequantize(codes)[:, ids]`` of the codes before packing."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from lowbit.kernels import build, reference
from lowbit.kernels.model import DOMAIN, GATHER_INPUT_NAMES, QuantMatMulWeights, quant_gather_model
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.runtime.session import session_options

from .cases import AXES, BITS, SHAPES

#: cases.SHAPES plus group size 1 over a ragged K and N (K not a multiple of 4, N just past a tile).
GATHER_SHAPES = [*SHAPES, (7, 65, 1), (5, 129, 3)]


def quantized_weight(k, n, bits, group, axis, symmetric, rng):
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[rng.integers(0, k), rng.integers(0, n)] = 40.0  # an outlier: one group's scale far from the rest
    return quantize_rtn(weight, QuantScheme(bits=bits, group_size=group, group_axis=axis, symmetric=symmetric))


def make_session(weights: QuantMatMulWeights, ids_shape, constant_weights=True) -> ort.InferenceSession:
    model = quant_gather_model(weights, ids_shape, constant_weights=constant_weights)
    return ort.InferenceSession(
        model.SerializeToString(), session_options(1, use_lowbit_ops=True), providers=["CPUExecutionProvider"]
    )


def run_gather(weights: QuantMatMulWeights, ids: np.ndarray, constant_weights=True) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    sess = make_session(weights, tuple(f"d{i}" for i in range(ids.ndim)), constant_weights)
    feeds = {"ids": ids}
    if not constant_weights:
        arrays = {"packed": weights.packed, "scales": weights.scales, "zero_points": weights.zero_points}
        feeds.update({name: arrays[name] for name in GATHER_INPUT_NAMES if arrays.get(name) is not None})
    return sess.run(None, feeds)[0]


def oracle(weights: QuantMatMulWeights, ids) -> np.ndarray:
    return reference.quant_gather(
        weights.packed,
        ids,
        weights.scales,
        weights.zero_points,
        bits=weights.bits,
        group_size=weights.group_size,
        group_axis=weights.group_axis,
        K=weights.K,
        N=weights.N,
    )


def assert_bitwise_equal(y: np.ndarray, expected: np.ndarray) -> None:
    assert y.dtype == np.float32 and expected.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


def ids_cases(n: int, rng) -> list[np.ndarray]:
    """Rank 0, 1 and 2; first and last column, negative ids, repeats."""
    picks = rng.integers(-n, n, 12)
    return [
        np.array(n - 1),
        np.array(-1),
        np.array([0, n - 1, -1, -n, 0, n // 2, n // 2, 0]),
        np.concatenate([picks, picks[:3]]),
        np.concatenate([picks, [0, -n, n - 1, -1]]).reshape(4, 4),
        np.zeros((0,), np.int64),
    ]


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_matches_the_oracle_bitwise(ops_library, shape, bits, axis, symmetric):
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, bits, symmetric])
    quantized = quantized_weight(k, n, bits, group, axis, symmetric, rng)
    weights = QuantMatMulWeights.from_quantized(quantized)  # symmetric: no zero_points input (the mid-point)
    assert (weights.zero_points is None) == symmetric
    table = reference.dequantize(
        quantized.codes,
        quantized.scales,
        quantized.zero_points,
        bits=bits,
        group_size=group,
        group_axis=weights.group_axis,
    )  # W[K, N] from the codes before packing
    for ids in ids_cases(n, rng):
        expected = oracle(weights, ids)
        assert_bitwise_equal(expected, np.ascontiguousarray(np.moveaxis(table[:, ids], 0, -1)))
        assert expected.shape == (*ids.shape, k)
        assert_bitwise_equal(run_gather(weights, ids), expected)


@pytest.mark.parametrize("axis", AXES)
def test_weights_fed_at_run_time(ops_library, axis):
    rng = np.random.default_rng(11)
    weights = QuantMatMulWeights.from_quantized(quantized_weight(70, 90, 3, 16, axis, False, rng))
    ids = np.array([[89, -90], [3, 3]])
    assert_bitwise_equal(run_gather(weights, ids, constant_weights=False), oracle(weights, ids))


@pytest.mark.parametrize("constant_weights", [True, False], ids=["constant", "fed"])
@pytest.mark.parametrize("axis", AXES)
def test_float16_scales(ops_library, axis, constant_weights):
    """Scales stored as float16 (the fused form's default) gather the same rows as their float32 values."""
    rng = np.random.default_rng(13)
    weights = QuantMatMulWeights.from_quantized(quantized_weight(70, 90, 4, 16, axis, False, rng))
    as_float32 = run_gather(weights, np.arange(-90, 90), constant_weights)
    weights.scales = weights.scales.astype(np.float16)
    ids = np.array([[89, -90], [3, 3]])
    expected = oracle(weights, ids)
    assert_bitwise_equal(run_gather(weights, ids, constant_weights), expected)
    assert not np.array_equal(run_gather(weights, np.arange(-90, 90), constant_weights), as_float32)  # read as float16


def test_tied_head_and_embedding_share_one_table(ops_library):
    """QuantMatMul(QuantGather(ids)) over the same three initializers: the table is stored once."""
    rng = np.random.default_rng(12)
    d, v = 48, 130
    weights = QuantMatMulWeights.from_quantized(quantized_weight(d, v, 4, 16, "ic", False, rng))
    model = quant_gather_model(weights, ("B", "S"))
    graph = model.graph
    attributes = {a.name: a.i for a in graph.node[0].attribute}
    head = helper.make_node(
        "QuantMatMul", ["Y", "packed", "scales", "zero_points"], ["logits"], domain=DOMAIN, **attributes
    )
    graph.node.append(head)
    graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", "S", v]))
    assert len(graph.initializer) == 3
    sess = ort.InferenceSession(
        model.SerializeToString(), session_options(1, use_lowbit_ops=True), providers=["CPUExecutionProvider"]
    )
    ids = np.array([[0, 5, -1], [129, 7, 7]], np.int64)
    logits = sess.run(None, {"ids": ids})[0]
    embedded = oracle(weights, ids)
    expected = reference.quant_matmul(embedded, *weights.inputs(), **weights.attributes)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_out_of_range_ids_raise_naming_the_op_the_id_and_n(ops_library):
    rng = np.random.default_rng(13)
    weights = QuantMatMulWeights.from_quantized(quantized_weight(16, 70, 4, 8, "oc", False, rng))
    for ids, bad in [(np.array([3, 70]), 70), (np.array([[-71]]), -71), (np.array(2**40), 2**40)]:
        message = rf"QuantGather: id {bad} is out of range for N = 70 \(ids must be in \[-70, 70\)\)"
        with pytest.raises(IndexError, match=message):
            oracle(weights, ids)
        with pytest.raises(Exception, match=message):
            run_gather(weights, ids)


def test_wrong_shapes_and_attributes_raise_clear_errors(ops_library):
    rng = np.random.default_rng(14)
    good = QuantMatMulWeights.from_quantized(quantized_weight(16, 70, 4, 8, "oc", False, rng))
    ids = np.array([1, 2])

    def variant(**changes) -> QuantMatMulWeights:
        return QuantMatMulWeights(**{**good.__dict__, **changes})

    cases = [
        (variant(packed=good.packed[:1]), r"QuantGather: packed must have shape \[2, 4, 128\], got \[1, 4, 128\]"),
        (variant(scales=np.ones((3, 70), np.float32)), r"QuantGather: scales must have shape \[2, 70\], got \[3, 70\]"),
        (
            variant(zero_points=np.ones((2, 69), np.uint8)),
            r"QuantGather: zero_points must have shape \[2, 70\], got \[2, 69\]",
        ),
        (variant(bits=7), "QuantGather: bits must be 2, 3, 4, 5, 6 or 8, got 7"),
        (variant(group_axis=2), "QuantGather: group_axis must be 0 or 1"),
    ]
    for weights, message in cases:
        for constant in (True, False):
            with pytest.raises(Exception, match=message):
                run_gather(weights, ids, constant_weights=constant)


def test_model_builder_refuses_inputs_the_op_lacks():
    rng = np.random.default_rng(15)
    quantized = quantized_weight(8, 8, 4, 8, "oc", False, rng)
    weights = QuantMatMulWeights.from_quantized(quantized, perm=np.arange(8))
    with pytest.raises(ValueError, match="no perm, bias or outliers"):
        quant_gather_model(weights, (2,))


def test_the_build_compiles_and_watches_the_op_source():
    assert "quant_gather.cpp" in [name for name, _, _ in build.CPU_SOURCES]
    assert {"quant_gather.cpp", "quant_gather.h"} <= {path.name for path in build._sources()}
