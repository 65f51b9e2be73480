"""One set of codes for an embedding table and the LM head tied to it.

A tied table ``T [V, D]`` serves two consumers: the embedding gathers its rows, the head multiplies by
``W = T^T [D, V]``. Storing one quantized copy for both (what a tied model's float file does) halves the
bytes of the largest weight of a small LLM, but the codes must then suit both: the head's error is the
output error ``trace(dW^T H dW)`` over its input's Hessian ``H [D, D]``, the embedding's error is the plain
``||dW||^2`` of the rows it hands to the first layer. Each is made relative to its own energy (so neither
consumer's scale decides) and their sum is a quadratic form in ``dW`` again, with the Hessian::

    H_tied = H / trace(W^T H W) + I / ||W||^2

so GPTQ over ``H_tied`` (groups along D: per-OC for the head, along each row for the embedding) minimises
the sum of the two relative errors the way it minimises one layer's output error.
"""

from __future__ import annotations

import numpy as np


def tied_hessian(head_hessian: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``H_tied`` (float64 ``[D, D]``) of the head weight ``weight [D, V]`` whose input has ``head_hessian``:
    ``trace(dW^T H_tied dW)`` is the head's relative output error plus the table's relative error."""
    hessian = np.asarray(head_hessian, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float32)
    if hessian.shape != (weight.shape[0], weight.shape[0]):
        raise ValueError(f"head_hessian must be [{weight.shape[0]}, {weight.shape[0]}], got {hessian.shape}")
    table_energy = float(np.square(weight, dtype=np.float64).sum())
    if table_energy == 0.0:
        raise ValueError("the tied table is all zeros")
    head_energy = float(np.einsum("kn,kn->", hessian.astype(np.float32) @ weight, weight, dtype=np.float64))
    combined = np.eye(len(hessian)) / table_energy
    if head_energy > 0.0:  # a head whose input never reached it in calibration: the table's error alone
        combined += hessian / head_energy
    return combined
