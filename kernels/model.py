"""One-node ONNX models of ``lowbit::QuantMatMul`` and ``lowbit::QuantGather``, for the kernel tests and benchmarks."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.kernels import packing

DOMAIN = "lowbit"
OP_TYPE = "QuantMatMul"
#: Input names in the op's order; an absent optional input is the empty name.
INPUT_NAMES = (
    "A",
    "packed",
    "scales",
    "zero_points",
    "perm",
    "bias",
    "outlier_pointers",
    "outlier_rows",
    "outlier_values",
)
GATHER_OP_TYPE = "QuantGather"
#: QuantGather's input names in the op's order.
GATHER_INPUT_NAMES = ("packed", "ids", "scales", "zero_points")


#: The types of lowbit::QuantMatMul's outlier inputs (CSC: column pointers [N + 1], rows and values [nnz]).
OUTLIER_TYPES = {"pointers": np.uint32, "rows": np.uint16, "values": np.float32}


def storage_scales(scales: np.ndarray) -> np.ndarray:
    """Group scales in the type the ops store them: float16 where every scale is exactly a float16 value
    (``rtn.round_scales`` makes them so), float32 otherwise. Lossless either way: the kernels compute in
    float32 and read either type."""
    scales = np.asarray(scales, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = scales.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), scales) else scales


@dataclasses.dataclass
class QuantMatMulWeights:
    """The constant inputs of one ``QuantMatMul`` (``zero_points``, ``perm``, ``bias``, the outliers optional)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    perm: np.ndarray | None
    bias: np.ndarray | None
    bits: int
    group_size: int
    group_axis: int
    K: int
    N: int
    outliers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # CSC (pointers, rows, values)
    int8_activations: bool = False  # the op's optional attribute (written only when set)

    @classmethod
    def from_quantized(cls, quantized, perm=None, bias=None) -> QuantMatMulWeights:
        """From a ``passes.quant.rtn.QuantizedWeight``; symmetric weights drop their (mid-point) zero points."""
        k, n = quantized.codes.shape
        zero_points = None if quantized.symmetric else quantized.zero_points
        return cls(
            packing.pack(quantized.codes, quantized.bits),
            storage_scales(quantized.scales),
            zero_points,
            perm,
            bias,
            quantized.bits,
            quantized.block_size,
            quantized.block_axis,
            k,
            n,
        )

    @property
    def attributes(self) -> dict[str, int]:
        attributes = {
            "bits": self.bits,
            "group_size": self.group_size,
            "group_axis": self.group_axis,
            "K": self.K,
            "N": self.N,
        }
        return attributes | ({"int8_activations": 1} if self.int8_activations else {})

    def inputs(self) -> list[np.ndarray | None]:
        """The op's inputs after ``A``, ``None`` where absent."""
        return [self.packed, self.scales, self.zero_points, self.perm, self.bias, *(self.outliers or (None,) * 3)]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight: codes, scales and zero points."""
        return sum(x.nbytes for x in (self.packed, self.scales, self.zero_points) if x is not None)


def quant_matmul_model(
    weights: QuantMatMulWeights, a_shape: tuple[int | str, ...], *, constant_weights: bool = True
) -> onnx.ModelProto:
    """``Y = lowbit::QuantMatMul(A, ...)`` with ``A`` a graph input of ``a_shape`` (str = symbolic dim).

    ``constant_weights=False`` makes the weight tensors graph inputs too (fed at run time, named as in
    ``INPUT_NAMES``), which exercises the kernel's per-call preparation path.
    """
    node_inputs = ["A"]
    graph_inputs = [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, list(a_shape))]
    initializers = []
    for name, array in zip(INPUT_NAMES[1:], weights.inputs()):
        if array is None:
            node_inputs.append("")
            continue
        node_inputs.append(name)
        if constant_weights:
            initializers.append(numpy_helper.from_array(np.asarray(array), name))
        else:
            elem_type = helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem_type, list(np.shape(array))))
    while node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node(OP_TYPE, node_inputs, ["Y"], domain=DOMAIN, **weights.attributes)
    y_shape = [*a_shape[:-1], weights.N]
    graph = helper.make_graph(
        [node],
        "quant_matmul",
        graph_inputs,
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, y_shape)],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def quant_gather_model(
    weights: QuantMatMulWeights, ids_shape: tuple[int | str, ...], *, constant_weights: bool = True
) -> onnx.ModelProto:
    """``Y = lowbit::QuantGather(packed, ids, scales[, zero_points])``: rows ``ids`` of the table ``W^T`` of
    ``weights`` (a QuantMatMul weight ``W[K, N]``), ``ids`` an int64 graph input of ``ids_shape`` (str =
    symbolic dim, ``()`` = a scalar), ``Y`` float32 ``[*ids_shape, K]``.

    ``constant_weights=False`` makes the weight tensors graph inputs too (named as in ``GATHER_INPUT_NAMES``).
    QuantGather has no permutation, bias or outlier inputs, so weights with any of them are refused.
    """
    if weights.perm is not None or weights.bias is not None or weights.outliers is not None:
        raise ValueError(
            "QuantGather reads packed, scales and zero_points only: weights must have no perm, bias or outliers"
        )
    arrays = {"packed": weights.packed, "scales": weights.scales, "zero_points": weights.zero_points}
    graph_inputs = [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, list(ids_shape))]
    initializers = []
    node_inputs = []
    for name in GATHER_INPUT_NAMES:
        array = arrays.get(name)
        if name == "ids" or array is not None:
            node_inputs.append(name)
        if array is None:
            continue
        if constant_weights:
            initializers.append(numpy_helper.from_array(np.asarray(array), name))
        else:
            elem_type = helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem_type, list(np.shape(array))))
    attributes = {
        "bits": weights.bits,
        "group_size": weights.group_size,
        "group_axis": weights.group_axis,
        "K": weights.K,
        "N": weights.N,
    }
    node = helper.make_node(GATHER_OP_TYPE, node_inputs, ["Y"], domain=DOMAIN, **attributes)
    graph = helper.make_graph(
        [node],
        "quant_gather",
        graph_inputs,
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [*ids_shape, weights.K])],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)
