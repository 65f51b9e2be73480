"""The C++ kernel of lowbit::QuantMatMul through ONNX Runtime against the NumPy reference.

Every case runs with the kernels capped at each instruction set this CPU has (scalar, AVX2, AVX-512,
AVX-512 VNNI), so the dispatch fallbacks are tested too; tolerance in ``cases.py``.
"""

import numpy as np
import onnxruntime as ort
import pytest

from lowbit.kernels.model import INPUT_NAMES, QuantMatMulWeights, quant_matmul_model
from lowbit.runtime.session import session_options

from .cases import AXES, BITS, SHAPES, add_outliers, adversarial_weights, assert_matches_reference, make_weights


def run_kernel(weights: QuantMatMulWeights, a: np.ndarray, constant_weights=True, symbolic_k=False) -> np.ndarray:
    a_shape = tuple(f"d{i}" for i in range(a.ndim - 1)) + ("K" if symbolic_k else weights.K,)
    model = quant_matmul_model(weights, a_shape, constant_weights=constant_weights)
    sess = ort.InferenceSession(
        model.SerializeToString(), session_options(2, use_lowbit_ops=True), providers=["CPUExecutionProvider"]
    )
    feeds = {"A": a}
    if not constant_weights:
        feeds.update({name: x for name, x in zip(INPUT_NAMES[1:], weights.inputs()) if x is not None})
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_random_weights_and_batches(ops_library, isa, shape, bits, axis, symmetric):
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, bits])
    extras = (k + bits + symmetric) % 2 == 0  # permutation and bias on half the cases
    weights = make_weights(rng.standard_normal((k, n)).astype(np.float32), bits, group, axis, symmetric, extras, rng)
    a = rng.standard_normal((17, k)).astype(np.float32)
    for batch in (1, 3, 7, 17):  # GEMV or integer paths (up to 8 rows), and the batched float path
        assert_matches_reference(run_kernel(weights, a[:batch]), weights, a[:batch])


@pytest.mark.parametrize("shape", [(131, 67, 13), (256, 192, 128), (1, 70, 64)], ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("int8_activations", [False, True], ids=["float", "int8"])
def test_float16_scales(ops_library, shape, bits, axis, int8_activations):
    """Scales stored as float16 (the fused form's default): read as float32 when the op prepares them, so the
    result matches the reference on every path, with the weights constant or fed at run time."""
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, bits, 16])
    # magnitudes 0.5-2 (a group of one weight near 0 would have a scale below float16's normal range, and
    # such a weight keeps float32 scales)
    weight = (rng.uniform(0.5, 2.0, (k, n)) * rng.choice([-1.0, 1.0], (k, n))).astype(np.float32)
    weights = make_weights(weight, bits, group, axis, bits == 8, k % 2 == 0, rng, scale_dtype="float16")
    assert weights.scales.dtype == np.float16
    weights.int8_activations = int8_activations
    a = rng.standard_normal((17, k)).astype(np.float32)
    for batch in (1, 3, 17):
        assert_matches_reference(run_kernel(weights, a[:batch]), weights, a[:batch])
    assert_matches_reference(run_kernel(weights, a[:5], constant_weights=False), weights, a[:5])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", AXES)
def test_sparse_outliers_on_every_path(ops_library, isa, shape, bits, axis):
    """Y = A[..., perm] @ (W + S) + bias, S the CSC outliers: GEMV, integer and batched paths, with and
    without permutation and bias, outliers spread or crowded into one output channel (repeated positions)."""
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, bits, 9])
    extras = (k + bits) % 2 == 0
    weights = make_weights(rng.standard_normal((k, n)).astype(np.float32), bits, group, axis, False, extras, rng)
    add_outliers(weights, 0.02, rng, crowded=bits == 3)
    a = rng.standard_normal((17, k)).astype(np.float32)
    for batch in (1, 3, 17):
        assert_matches_reference(run_kernel(weights, a[:batch]), weights, a[:batch])
    assert_matches_reference(run_kernel(weights, a[:5], constant_weights=False), weights, a[:5])


def test_no_outliers_and_non_finite_activations(ops_library, isa):
    rng = np.random.default_rng(8)
    weights = make_weights(rng.standard_normal((64, 70)).astype(np.float32), 4, 16, "ic", False, True, rng)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    weights.outliers = (np.zeros(71, np.uint32), np.zeros(0, np.uint16), np.zeros(0, np.float32))  # nnz = 0
    plain = run_kernel(QuantMatMulWeights(**{**weights.__dict__, "outliers": None}), a)
    np.testing.assert_array_equal(run_kernel(weights, a), plain)
    add_outliers(weights, 0.05, rng)
    a[0, 3], a[1, 5], a[2, 7] = np.inf, np.nan, 3e37
    assert_matches_reference(run_kernel(weights, a), weights, a)
    assert_matches_reference(run_kernel(weights, a[1:2]), weights, a[1:2])


@pytest.mark.parametrize("axis", AXES)
def test_3d_input_with_permutation_and_bias(ops_library, isa, axis):
    rng = np.random.default_rng(3)
    weights = make_weights(rng.standard_normal((96, 80)).astype(np.float32), 4, 32, axis, False, True, rng)
    for shape in [(2, 5, 96), (1, 1, 96), (3, 0, 96)]:
        a = rng.standard_normal(shape).astype(np.float32)
        assert_matches_reference(run_kernel(weights, a), weights, a)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_weights_fed_at_run_time(ops_library, isa, axis, bits):
    rng = np.random.default_rng(4)
    weights = make_weights(rng.standard_normal((70, 90)).astype(np.float32), bits, 64, axis, False, True, rng)
    for batch in (1, 4):
        a = rng.standard_normal((batch, 70)).astype(np.float32)
        assert_matches_reference(run_kernel(weights, a, constant_weights=False), weights, a)


@pytest.mark.parametrize("kind", ["zero", "constant-groups", "outliers"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", [2, 4])
def test_adversarial_weights(ops_library, isa, kind, axis, bits):
    rng = np.random.default_rng(5)
    weights = make_weights(adversarial_weights(kind, rng), bits, 32, axis, False, False, rng)
    for batch in (1, 5):
        a = rng.standard_normal((batch, 130)).astype(np.float32)
        a[:, 7] *= 1e3  # an activation outlier channel too
        assert_matches_reference(run_kernel(weights, a), weights, a)


@pytest.mark.parametrize("axis", AXES)
def test_activation_outlier_over_zero_weights(ops_library, isa, axis):
    """A channel 1e4 times larger than the rest, multiplying zero weights in half the columns: there the
    result comes from the small channels alone (the integer path's resolution is relative to the block's
    largest activation)."""
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((256, 128)).astype(np.float32)
    weight[5, ::2] = 0.0
    weights = make_weights(weight, 4, 64, axis, False, False, rng)
    for batch in (1, 3):
        a = rng.standard_normal((batch, 256)).astype(np.float32)
        a[:, 5] = 1e4
        assert_matches_reference(run_kernel(weights, a), weights, a)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", [3, 8])
def test_nan_inf_and_huge_activations_propagate_like_the_reference(ops_library, isa, axis, bits):
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((100, 70)).astype(np.float32)
    weight[3, ::2] = 0.0  # zero weights behind the infinite activation: inf * 0 = nan in some columns
    weights = make_weights(weight, bits, 32, axis, False, True, rng)
    perm = weights.perm
    rows = rng.standard_normal((6, 100)).astype(np.float32)
    rows[0, perm[3]] = np.inf
    rows[1, perm[3]] = -np.inf
    rows[2, 10] = np.nan
    rows[3, perm[3]], rows[3, perm[4]] = np.inf, -np.inf
    rows[4, 20] = 3e37  # finite but huge: must not overflow where the reference does not
    for row in rows:  # one row at a time: the GEMV path
        assert_matches_reference(run_kernel(weights, row[None]), weights, row[None])
    assert_matches_reference(run_kernel(weights, rows), weights, rows)  # batched path


def test_invalid_inputs_raise_clear_errors(ops_library):
    rng = np.random.default_rng(7)
    weights = make_weights(rng.standard_normal((16, 8)).astype(np.float32), 4, 8, "oc", False, True, rng)
    with pytest.raises(Exception, match=r"A must have shape \[\.\.\., 16\]"):
        run_kernel(weights, np.ones((2, 15), np.float32), symbolic_k=True)
    weights.perm = np.full(16, 16, dtype=np.int64)
    with pytest.raises(Exception, match=r"perm values must be in \[0, 16\)"):
        run_kernel(weights, np.ones((1, 16), np.float32))
    weights.perm = None
    one = np.ones((1, 16), np.float32)
    pointers, rows, values = (
        np.array([0, 1, 1, 1, 1, 1, 1, 1, 2], np.uint32),
        np.array([3, 15], np.uint16),
        np.ones(2, np.float32),
    )
    for outliers, message in [
        ((pointers, rows, None), "give all three or none"),
        ((pointers[:-1], rows, values), r"outlier_pointers must have shape \[9\], got \[8\]"),
        ((pointers, rows, values[:1]), r"outlier_values must have shape \[2\], got \[1\]"),
        ((pointers + 1, rows, values), "must start at 0 and end at the outlier count 2"),
        ((np.array([0, 2, 1, 1, 1, 1, 1, 1, 2], np.uint32), rows, values), "must not decrease"),
        ((pointers, np.array([3, 16], np.uint16), values), r"outlier_rows values must be in \[0, 16\)"),
    ]:
        weights.outliers = outliers
        for constant in (True, False):  # checked once at session creation, or on every call
            with pytest.raises(Exception, match=message):
                run_kernel(weights, one, constant_weights=constant)
    weights.outliers = None
    weights.scales = np.ones((3, 8), np.float32)
    with pytest.raises(Exception, match=r"scales must have shape \[2, 8\], got \[3, 8\]"):
        run_kernel(weights, one)
    weights.scales = np.ones((2, 8), np.float64)
    for constant in (True, False):
        with pytest.raises(Exception, match="QuantMatMul: scales must be float32 or float16"):
            run_kernel(weights, one, constant_weights=constant)
