"""Run ONNX models in ONNX Runtime and compare outputs with a stated tolerance."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from lowbit.runtime.session import session_options


def ort_session(model: ir.Model, accuracy_level: int | None = 0) -> ort.InferenceSession:
    """A CPU session on an in-memory model; accuracy level 0 keeps MatMulNBits activations in fp32."""
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, session_options(matmulnbits_accuracy_level=accuracy_level))


def run(model: ir.Model, feeds: dict[str, np.ndarray], accuracy_level: int | None = 0) -> list[np.ndarray]:
    return ort_session(model, accuracy_level).run(None, feeds)


def check_valid(model: ir.Model) -> None:
    """The model passes onnx.checker (full check, with shape inference) and ONNX Runtime loads it."""
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    ort.InferenceSession(proto.SerializeToString(), session_options())


def assert_parity(
    reference: ir.Model, candidate: ir.Model, feeds: dict[str, np.ndarray], *, rtol: float, atol: float
) -> None:
    """Every output of ``candidate`` equals ``reference``'s within ``atol + rtol * |reference|``."""
    expected = run(reference, feeds)
    actual = run(candidate, feeds)
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()
