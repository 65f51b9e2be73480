"""ONNX Runtime sessions for lowbit models.

ONNX Runtime fuses per-OC ``DequantizeLinear(axis=0) + MatMul`` into ``com.microsoft::MatMulNBits``. That
kernel's default accuracy level (4) quantizes the *activations* to int8 on the fly, which adds its own
error on top of the weight quantization. ``matmulnbits_accuracy_level=0`` keeps activations in fp32:
use it to measure weight quantization alone (every accuracy figure lowbit reports does), and leave it
``None`` (ONNX Runtime's default) to measure deployment speed.
"""

from __future__ import annotations

import os

import onnxruntime as ort


def session_options(
    intra_op_threads: int | None = None,
    matmulnbits_accuracy_level: int | None = None,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization_level
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if matmulnbits_accuracy_level is not None:
        if matmulnbits_accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"matmulnbits_accuracy_level must be 0..4, got {matmulnbits_accuracy_level}")
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmulnbits_accuracy_level))
    return options


def session(
    path: str | os.PathLike,
    providers: list[str] | None = None,
    *,
    intra_op_threads: int | None = None,
    matmulnbits_accuracy_level: int | None = None,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for a (lowbit-optimized or float) ONNX file, CPU by default."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ONNX file at {path!r}")
    options = session_options(intra_op_threads, matmulnbits_accuracy_level, optimization_level)
    return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
