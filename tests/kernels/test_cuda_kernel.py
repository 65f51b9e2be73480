"""The CUDA kernel of lowbit::QuantMatMul against the NumPy reference (needs a GPU and onnxruntime-gpu)."""

import numpy as np
import onnxruntime as ort
import pytest

from lowbit.kernels.model import QuantMatMulWeights, quant_matmul_model
from lowbit.runtime.session import session_options

from .cases import AXES, BITS, SHAPES, add_outliers, adversarial_weights, assert_matches_reference, make_weights

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_session(ops_library):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime with the CUDA execution provider and a GPU")

    def run(weights: QuantMatMulWeights, a: np.ndarray) -> np.ndarray:
        options = session_options(1, use_lowbit_ops=True)
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # the op must run on CUDA
        model = quant_matmul_model(weights, tuple(f"d{i}" for i in range(a.ndim - 1)) + (weights.K,))
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
        return sess.run(None, {"A": a})[0]

    return run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
def test_random_weights_and_batches(cuda_session, shape, bits, axis):
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, bits])
    scale_dtype = "float16" if (k + n) % 2 else "float32"  # both storages of the scales
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weights = make_weights(weight, bits, group, axis, bits == 3, True, rng, scale_dtype=scale_dtype)
    for batch in (1, 3, 17):
        a = rng.standard_normal((batch, k)).astype(np.float32)
        assert_matches_reference(cuda_session(weights, a), weights, a)


@pytest.mark.parametrize("kind", ["zero", "constant-groups", "outliers"])
def test_adversarial_weights_and_non_finite_activations(cuda_session, kind):
    rng = np.random.default_rng(5)
    weights = make_weights(adversarial_weights(kind, rng), 4, 32, "ic", False, False, rng)
    a = rng.standard_normal((4, 130)).astype(np.float32)
    a[0, 3], a[1, 5], a[2, 7] = np.inf, np.nan, 1e3
    assert_matches_reference(cuda_session(weights, a), weights, a)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("crowded", [False, True], ids=["spread", "crowded"])
def test_sparse_outliers(cuda_session, shape, crowded):
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, 9])
    weights = add_outliers(
        make_weights(rng.standard_normal((k, n)).astype(np.float32), 3, group, "ic", False, True, rng),
        0.02,
        rng,
        crowded,
    )
    for batch in (1, 17):
        a = rng.standard_normal((batch, k)).astype(np.float32)
        assert_matches_reference(cuda_session(weights, a), weights, a)
