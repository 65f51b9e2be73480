"""ONNX Runtime sessions for lowbit models.

ONNX Runtime fuses per-OC ``DequantizeLinear(axis=0) + MatMul`` into ``com.microsoft::MatMulNBits``. That
kernel's default accuracy level (4) quantizes the *activations* to int8 on the fly, which adds its own
error on top of the weight quantization. ``matmulnbits_accuracy_level=0`` keeps activations in fp32:
use it to measure weight quantization alone (every accuracy figure lowbit reports does), and leave it
``None`` (ONNX Runtime's default) to measure deployment speed.

Models with fused ``lowbit::`` ops need lowbit's custom-op library (``kernels/build.py``).
``use_lowbit_ops=None`` registers it when it is built, ``True`` requires it, ``False`` never registers it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import onnxruntime as ort

from lowbit.kernels import _lib

#: ORT's error for a node of our domain when no library registered it.
_LOWBIT_OP_MISSING = re.compile(r"\blowbit:\w+\(-?\d+\) is not a registered function/op")


def session_options(
    intra_op_threads: int | None = None,
    matmulnbits_accuracy_level: int | None = None,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    use_lowbit_ops: bool | None = None,
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if use_lowbit_ops or (use_lowbit_ops is None and _lib.is_built()):
        options.register_custom_ops_library(str(_lib.library_path()))
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
    use_lowbit_ops: bool | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for a (lowbit-optimized or float) ONNX file, CPU by default."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ONNX file at {path!r}")
    options = session_options(intra_op_threads, matmulnbits_accuracy_level, optimization_level, use_lowbit_ops)
    try:
        return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        if use_lowbit_ops is None and not _lib.is_built() and _LOWBIT_OP_MISSING.search(str(error)):
            raise _lib.not_built_error() from error
        raise


def open_session(
    session_or_path: ort.InferenceSession | str | os.PathLike, inputs: Sequence[str], output: str
) -> ort.InferenceSession:
    """A session for the model (accuracy level 0 when opened from a path), checked to have these inputs and output."""
    if isinstance(session_or_path, ort.InferenceSession):
        model, name = session_or_path, "the session's model"
    else:
        model, name = session(session_or_path, matmulnbits_accuracy_level=0), repr(os.fspath(session_or_path))
    have_inputs = [value.name for value in model.get_inputs()]
    have_outputs = [value.name for value in model.get_outputs()]
    if sorted(have_inputs) != sorted(inputs) or output not in have_outputs:
        raise ValueError(
            f"{name} has inputs {have_inputs} and outputs {have_outputs}; expected inputs {list(inputs)} "
            f"and an output {output!r}"
        )
    return model
