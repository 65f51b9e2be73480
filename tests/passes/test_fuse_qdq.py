"""FuseQDQPass: the fused graph computes what the QDQ graph computes (float32 round-off), with no
DequantizeLinear left behind, shared weights packed once, and what it cannot fuse listed with the reason.

Tolerance: ``|fused - qdq| <= 1e-5 * max|qdq|`` (the issue's 1e-5 relative error in fp32; the two differ
only in summation order). NaN/Inf activations must give NaN/Inf exactly where the QDQ graph does.
"""

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import packing
from lowbit.passes.fuse_qdq import FuseQDQPass
from lowbit.passes.quant.scheme import SUPPORTED_BITS, QuantScheme
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.rules.quant_matmul import read_dequantize
from lowbit.passes.split_outliers import SplitOutliersPass
from tests import factories
from tests.parity import check_valid, run, serialized

RTOL = 1e-5
SCHEMES = [
    QuantScheme(bits, group, axis, symmetric)
    for bits in SUPPORTED_BITS
    for group, axis in ((16, "oc"), (32, "ic"), (7, "ic"), (-1, "oc"))
    for symmetric in (False, True)
]


def _quantized(factory, scheme, **pass_options) -> ir.Model:
    model = factory()
    QuantizeWeightsPass(scheme, **pass_options)(model)
    return model


def _assert_close(fused: np.ndarray, qdq: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(fused), np.isnan(qdq))
    np.testing.assert_array_equal(np.isinf(fused), np.isinf(qdq))
    finite = np.isfinite(qdq)
    tolerance = RTOL * max(float(np.abs(qdq[finite]).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(fused[finite], qdq[finite], rtol=0, atol=tolerance)


def _op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_fused_mlp_matches_qdq(ops_library, scheme):
    model = _quantized(factories.mlp, scheme)
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    fuse = FuseQDQPass()
    assert fuse(model).modified
    check_valid(model)
    ops = _op_types(model)
    assert ops == ["QuantMatMul", "Relu", "QuantMatMul"]
    assert "DequantizeLinear" not in ops and "MatMul" not in ops and "Add" not in ops  # the bias Adds fused too
    assert sum(fuse.details["fused"].values()) == 2 and fuse.details["unfused"] == {}
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


@pytest.mark.parametrize(
    ("scheme", "use_matmulnbits", "expected"),
    [
        (QuantScheme(4, 32, "oc"), True, "MatMulNBits"),
        (QuantScheme(3, 16, "oc", symmetric=True), True, "MatMulNBits"),  # 3-bit codes fit its 4 bits exactly
        (QuantScheme(4, 32, "oc"), False, "QuantMatMul"),
        (QuantScheme(4, 24, "oc"), True, "QuantMatMul"),  # block not a power of two
        (QuantScheme(4, 32, "ic"), True, "QuantMatMul"),  # MatMulNBits has no per-IC groups
        (QuantScheme(8, 32, "oc"), True, "QuantMatMul"),
    ],
    ids=str,
)
def test_target_op(ops_library, scheme, use_matmulnbits, expected):
    model = _quantized(factories.mlp, scheme)
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    FuseQDQPass(use_matmulnbits=use_matmulnbits)(model)
    assert [op for op in _op_types(model) if op != "Relu"] == [expected, expected]
    check_valid(model)
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


def test_matmulnbits_accuracy_level_is_written(ops_library):
    model = _quantized(factories.mlp, QuantScheme(4, 16, "oc"))
    FuseQDQPass(use_matmulnbits=True, matmulnbits_accuracy_level=4)(model)
    levels = {node.attributes.get_int("accuracy_level") for node in model.graph if node.op_type == "MatMulNBits"}
    assert levels == {4}
    with pytest.raises(ValueError, match="0..4"):
        FuseQDQPass(matmulnbits_accuracy_level=7)


def test_shared_weight_is_packed_once(ops_library):
    model = _quantized(factories.shared_weight, QuantScheme(3, 8, "ic"), include_lm_head=True)  # y is an output
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    FuseQDQPass()(model)
    fused_nodes = [node for node in model.graph if node.op_type == "QuantMatMul"]
    assert len(fused_nodes) == 2
    assert fused_nodes[0].inputs[1] is fused_nodes[1].inputs[1]  # one packed initializer for both
    assert len([name for name in model.graph.initializers if name.endswith(".packed")]) == 1
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


def test_gemm_bias_is_fused(ops_library):
    model = _quantized(factories.gemm, QuantScheme(4, 8, "ic"), include_lm_head=True)  # y is an output
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    FuseQDQPass()(model)
    assert _op_types(model) == ["QuantMatMul"]
    assert model.graph.node(0).inputs[5] is not None
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


OUTLIER_SCHEMES = [
    QuantScheme(2, 16, "oc"),
    QuantScheme(3, 7, "ic"),
    QuantScheme(4, 32, "ic", True),
    QuantScheme(8, -1, "oc"),
]


def _with_outliers(factory, scheme, fraction: float = 0.05) -> tuple[ir.Model, SplitOutliersPass]:
    model = factory()
    split = SplitOutliersPass(outlier_fraction=fraction, include_lm_head=True)
    split(model)
    QuantizeWeightsPass(scheme, include_lm_head=True)(model)
    return model, split


@pytest.mark.parametrize("scheme", OUTLIER_SCHEMES, ids=str)
@pytest.mark.parametrize(
    "factory, fused_ops",
    [
        (factories.mlp, ["QuantMatMul", "Relu", "QuantMatMul"]),  # MatMul, outliers, bias Add
        (factories.gemm, ["QuantMatMul"]),  # Gemm: bias, then outliers
        (factories.shared_weight, ["QuantMatMul", "QuantMatMul"]),
    ],
    ids=["mlp", "gemm", "shared"],
)
def test_outlier_branches_become_inputs_of_the_fused_op(ops_library, scheme, factory, fused_ops):
    model, split = _with_outliers(factory, scheme)
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    fuse = FuseQDQPass()
    assert fuse(model).modified
    check_valid(model)
    assert _op_types(model) == fused_ops  # no branch node, Cast, Slice or DequantizeLinear left
    fused_nodes = [node for node in model.graph if node.op_type == "QuantMatMul"]
    assert all(len(node.inputs) == 9 and node.inputs[6] is not None for node in fused_nodes)
    assert list(fuse.details["fused"]) == [f"lowbit::QuantMatMul {scheme.group_axis}{scheme.bits} + outliers"]
    assert fuse.details["unfused"] == {}
    # CSC arrays: uint32 pointers [N + 1], uint16 rows and float32 values [nnz], one set per weight
    outlier_names = [name for name in model.graph.initializers if ".outlier." in name]
    assert len(outlier_names) == 3 * split.details["weights_with_outliers"]
    for node in fused_nodes:
        pointers, rows, values = (value.const_value.numpy() for value in node.inputs[6:])
        assert pointers.dtype == np.uint32 and rows.dtype == np.uint16 and values.dtype == np.float32
        assert pointers.shape == (node.attributes.get_int("N") + 1,) and rows.size == values.size == pointers[-1] > 0
    if factory is factories.shared_weight:
        assert fused_nodes[0].inputs[6] is fused_nodes[1].inputs[6]
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


def test_outliers_the_op_cannot_hold_stay_a_side_branch_with_the_reason(ops_library):
    """K > 65536 does not fit the op's uint16 rows: the MatMul is fused, the branch stays, the report says why."""
    rng = np.random.default_rng(0)
    k = (1 << 16) + 3
    x = factories.graph_input("x", [2, k])
    w = factories.constant("w", rng.standard_normal((k, 3)).astype(np.float32))
    matmul = factories.node("MatMul", [x, w], "wide", output="y")
    model = factories.model([x], [matmul.outputs[0]], [matmul], [w])
    SplitOutliersPass(outlier_fraction=0.01, include_lm_head=True)(model)
    QuantizeWeightsPass(QuantScheme(4, 128, "oc"), include_lm_head=True)(model)
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    fuse = FuseQDQPass()
    fuse(model)
    check_valid(model)
    assert "QuantMatMul" in _op_types(model) and "CumSum" in _op_types(model)
    assert list(fuse.details["fused"]) == ["lowbit::QuantMatMul oc4"]
    (reason,) = fuse.details["unfused"].values()
    assert "outliers left as a side branch" in reason and "uint16" in reason
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_tied_embedding_and_head_share_one_packed_table(ops_library, symmetric, bits):
    """MatMul(x, Transpose(DQ(E))) -> QuantMatMul of E^T; Gather(DQ(E)) -> lowbit::QuantGather over the same
    packed codes, scales and zero points: the table is stored once; the DequantizeLinear is gone."""
    scheme = QuantScheme(bits, 12, "oc", symmetric=symmetric)  # block 12: no GatherBlockQuantized either way
    model = _quantized(factories.tied_lm, scheme, include_lm_head=True, include_embeddings=True)
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    fuse = FuseQDQPass()
    assert fuse(model).modified
    check_valid(model)
    assert _op_types(model) == ["QuantGather", "Relu", "QuantMatMul"]
    assert [node.name for node in model.graph] == ["embed_tokens", "act", "lm_head"]  # the fused nodes keep theirs
    gather, head = model.graph.node(0), model.graph.node(2)
    assert gather.inputs[0] is head.inputs[1] and gather.inputs[2:] == head.inputs[2 : len(gather.inputs)]
    assert fuse.details["fused"] == {
        f"lowbit::QuantGather {bits} (shares the LM head's codes)": 1,
        f"lowbit::QuantMatMul oc{bits}": 1,
    }
    table_bytes = 50 * 36 * bits // 8
    assert fuse.details["initializer_bytes_after"] < fuse.details["initializer_bytes_before"] + table_bytes // 2
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


@pytest.mark.parametrize(("bits", "op_type"), [(4, "GatherBlockQuantized"), (3, "QuantGather"), (2, "QuantGather")])
def test_an_embedding_table_alone_is_gathered_from_its_codes(ops_library, bits, op_type):
    """A 4-bit table in power-of-two row blocks -> ORT's GatherBlockQuantized on the same initializers; 3 and
    2 bits -> lowbit::QuantGather with the codes packed at their width (not stored in 4 bits)."""
    model = _quantized(factories.tied_lm, QuantScheme(bits, 16, "oc"), include_embeddings=True)
    codes_before = next(node for node in model.graph if node.op_type == "DequantizeLinear").inputs[0]
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    fuse = FuseQDQPass()
    assert fuse(model).modified
    check_valid(model)
    gather = next(node for node in model.graph if "Gather" in node.op_type)
    assert gather.op_type == op_type and not fuse.details["unfused"]
    if op_type == "GatherBlockQuantized":
        assert gather.inputs[0] is codes_before  # zero copy
    else:
        assert gather.inputs[0].const_value.numpy().shape == packing.packed_shape(bits, 36, 50)
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


def test_gather_of_an_unsupported_table_is_reported():
    """int32 ids (QuantGather takes int64) of a table in blocks of 12 (GatherBlockQuantized takes powers of two)."""
    model = _quantized(factories.tied_lm, QuantScheme(4, 12, "oc"), include_embeddings=True)
    for node in model.graph:
        if node.op_type == "Gather":
            ids = node.inputs[1]
            cast = factories.node("Cast", [ids], "ids_int32", to=ir.DataType.INT32)
            model.graph.insert_before(node, cast)
            cast.outputs[0].dtype = ir.DataType.INT32
            node.replace_input_with(1, cast.outputs[0])
    fuse = FuseQDQPass()
    fuse(model)
    (reason,) = fuse.details["unfused"].values()
    assert "power-of-two" in reason and "int64 ids" in reason
    assert "Gather" in _op_types(model) and "DequantizeLinear" in _op_types(model)


def test_float_model_is_left_byte_identical():
    model = factories.mlp()
    before = serialized(model)
    fuse = FuseQDQPass()
    assert not fuse(model).modified
    assert serialized(model) == before
    assert fuse.details["fused"] == {} and fuse.details["unfused"] == {}


def test_a_weight_from_a_constant_node_without_types_is_left_byte_identical():
    """Matching evaluates the Constant and types its output; with nothing fused that is undone (fuzz seed 300)."""
    from onnx import TensorProto, helper

    constant = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.5, -1.0, 2.0, 0.25, 1.5, -0.75])
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w_out"], name="w_constant", value=constant),
            helper.make_node("MatMul", ["x", "w_out"], ["y"], name="fc"),
        ],
        "constant_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    before = serialized(model)
    assert not FuseQDQPass()(model).modified
    assert serialized(model) == before


def test_fp16_activations_are_left_with_the_reason():
    model = factories.mlp()
    QuantizeWeightsPass(QuantScheme(4, 16, "ic"))(model)
    for node in model.graph:
        if node.op_type == "DequantizeLinear":
            node.outputs[0].dtype = ir.DataType.FLOAT16  # declared fp16 weight: the activation check decides
    model.graph.inputs[0].dtype = ir.DataType.FLOAT16  # fc1 reads fp16; fc2 still reads float32
    fuse = FuseQDQPass()
    fuse(model)
    assert fuse.details["unfused"] == {"fc1.DequantizeLinear": "activations are FLOAT16; the CPU kernel takes float32"}
    assert fuse.details["fused"] == {"lowbit::QuantMatMul ic4": 1}


def _per_axis_model(axis: int, per_tensor: bool, seed: int = 3) -> ir.Model:
    """x @ DequantizeLinear(q, s, z) with per-axis (or per-tensor) parameters, as other tools write them."""
    rng = np.random.default_rng(seed)
    k, n = 23, 19
    codes = factories.constant("q", rng.integers(0, 256, (k, n)).astype(np.uint8))
    size = 1 if per_tensor else (n if axis == 1 else k)
    shape = [] if per_tensor else [size]
    scale = factories.constant("s", (rng.random(size) + 0.5).astype(np.float32).reshape(shape))
    zero = factories.constant("z", rng.integers(0, 256, size).astype(np.uint8).reshape(shape))
    x = factories.graph_input("x", [4, k])
    dequantize = factories.node("DequantizeLinear", [codes, scale, zero], "dq", axis=axis)
    matmul = factories.node("MatMul", [x, dequantize.outputs[0]], "mm", output="y")
    return factories.model([x], [matmul.outputs[0]], [dequantize, matmul], [codes, scale, zero], opset=21)


@pytest.mark.parametrize(("axis", "per_tensor"), [(0, False), (1, False), (1, True)])
def test_per_axis_and_per_tensor_dequantize(ops_library, axis, per_tensor):
    model = _per_axis_model(axis, per_tensor)
    feeds = factories.feeds_for(model)
    (qdq,) = run(model, feeds)
    FuseQDQPass()(model)
    assert _op_types(model) == ["QuantMatMul"]
    (fused,) = run(model, feeds)
    _assert_close(fused, qdq)


def test_nan_and_inf_activations_propagate_like_qdq(ops_library):
    model = _quantized(factories.mlp, QuantScheme(4, 32, "ic"))
    feeds = factories.feeds_for(model)
    feeds["x"][0, 0, 3] = np.nan
    feeds["x"][1, 2, 5] = np.inf
    feeds["x"][2, 4, :] = 0.0
    (qdq,) = run(model, feeds)
    FuseQDQPass()(model)
    (fused,) = run(model, feeds)
    assert np.isnan(qdq).any() and np.isfinite(qdq).any()
    _assert_close(fused, qdq)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from((2, 4, 8)),
    signed=st.booleans(),
    k=st.integers(1, 20),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_read_dequantize_reproduces_the_weight(bits, signed, k, n, seed):
    """For any blocked DequantizeLinear, (codes - zero) * scale in the kernel's terms equals ONNX's result."""
    rng = np.random.default_rng(seed)
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    code_type = {
        (2, True): ir.DataType.INT2,
        (2, False): ir.DataType.UINT2,
        (4, True): ir.DataType.INT4,
        (4, False): ir.DataType.UINT4,
        (8, True): ir.DataType.INT8,
        (8, False): ir.DataType.UINT8,
    }[bits, signed]
    raw = rng.integers(low, high, (k, n)).astype(np.int8 if signed else np.uint8)
    block = int(rng.integers(1, k + 1))
    groups = -(-k // block)
    scales = (rng.random((groups, n)) + 0.1).astype(np.float32)
    codes = ir.Value(name="q", const_value=ir.Tensor(raw, dtype=code_type))
    scale = ir.Value(name="s", const_value=ir.tensor(scales))
    inputs = [codes, scale]
    zero_raw = None
    if not signed:
        zero_raw = rng.integers(low, high, (groups, n)).astype(np.uint8)
        inputs.append(ir.Value(name="z", const_value=ir.Tensor(zero_raw, dtype=code_type)))
    node = ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": block})
    weight = read_dequantize(node)
    assert weight.bits <= bits
    expected_zero = 0 if zero_raw is None else np.repeat(zero_raw.astype(np.int32), block, axis=0)[:k]
    expected = (raw.astype(np.int32) - expected_zero) * np.repeat(scales, block, axis=0)[:k]
    zero = (1 << (weight.bits - 1)) if weight.zero_points is None else np.repeat(weight.zero_points, block, axis=0)[:k]
    got = (weight.codes.astype(np.int32) - zero) * np.repeat(weight.scales, block, axis=0)[:k]
    np.testing.assert_array_equal(got, expected)
    packing.pack(weight.codes, weight.bits)  # the narrowed codes fit their width


def test_matmulnbits_packing_layout():
    """Byte (n, block, i) holds codes (2i, 2i+1) of output channel n, low nibble first, K padded with 0."""
    codes = np.arange(40 * 3, dtype=np.uint8).reshape(40, 3) % 16
    packed = packing.pack_matmulnbits(codes, 16)
    assert packed.shape == (3, 3, 8)
    assert packed[1, 0, 0] == codes[0, 1] | (codes[1, 1] << 4)
    assert packed[2, 2, 3] == codes[38, 2] | (codes[39, 2] << 4)
    assert packed[0, 2, 4] == 0  # padding past K = 40
    zero_points = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.uint8)  # [G=3, N=2]
    np.testing.assert_array_equal(packing.pack_matmulnbits_zero_points(zero_points), [1 | 3 << 4, 5, 2 | 4 << 4, 6])
    with pytest.raises(ValueError, match="power-of-two"):
        packing.pack_matmulnbits(codes, 24)
