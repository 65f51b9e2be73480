"""Rewrite rules ``MatMul(A, DequantizeLinear(q, s[, z])) [+ bias] -> lowbit::QuantMatMul`` (or
``com.microsoft::MatMulNBits``).

The pattern is the MatMul (and its bias Add) alone; the ``DequantizeLinear`` that makes its weight is
read in ``check``. So a DequantizeLinear shared by several MatMuls (or also read by a Gather) stays valid
for its other readers, and every MatMul it feeds reuses one set of packed initializers; a DequantizeLinear
left without readers is removed afterwards as dead code.

Codes are repacked at the narrowest width that holds them exactly (3-bit codes that the portable form
stores in UINT4 pack as 3 bits) and scales that are all float16 values are stored as float16, so fusion
is lossless: the op dequantizes the same integers with the same scales. ``MatMulNBits`` takes per-OC
(``axis=0``) weights whose codes fit 4 bits and whose block is a power of two >= 16, when the fuse pass asks
for it; everything else that is fp32 goes to ``lowbit::QuantMatMul``.

The exact float32 outliers that ``SplitOutliersPass`` keeps beside a weight (a side branch of standard
ONNX added to the MatMul's output) become the fused op's ``outlier_*`` inputs: the rules with outliers match
the MatMul, the branch and the Add (and a bias Add before or after it), read the branch's constants in
``check`` and leave its shared parts (the transposed activations, the index decoding) to dead-code removal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from lowbit.ir import builders
from lowbit.kernels import model as quant_matmul_op
from lowbit.kernels import packing

MATMULNBITS_DOMAIN = "com.microsoft"
_SIGNED_CODE_TYPES = frozenset({ir.DataType.INT2, ir.DataType.INT4, ir.DataType.INT8})
_CODE_TYPES = _SIGNED_CODE_TYPES | {ir.DataType.UINT2, ir.DataType.UINT4, ir.DataType.UINT8}


@dataclasses.dataclass
class DequantizedWeight:
    """A constant ``DequantizeLinear`` output ``W[K, N]`` in the terms of ``lowbit::QuantMatMul``."""

    codes: np.ndarray  # uint8 [K, N], unsigned domain
    scales: np.ndarray  # float32, ``kernels.reference.params_shape``
    zero_points: np.ndarray | None  # uint8, unsigned domain; None = the mid-point 2**(bits-1)
    bits: int  # narrowest of 2, 3, 4, 8 that holds every code and zero point
    group_axis: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def op_attributes(self) -> dict[str, int]:
        """The attributes that describe this weight on ``lowbit::QuantMatMul`` and ``lowbit::QuantGather``."""
        k, n = self.shape
        return {"bits": self.bits, "group_size": self.group_size, "group_axis": self.group_axis, "K": k, "N": n}

    def transposed(self) -> DequantizedWeight:
        """The weight of ``Transpose(W)``: groups along the other axis (a tied head's ``E^T``)."""
        return DequantizedWeight(
            np.ascontiguousarray(self.codes.T),
            np.ascontiguousarray(self.scales.T),
            None if self.zero_points is None else np.ascontiguousarray(self.zero_points.T),
            self.bits,
            1 - self.group_axis,
            self.group_size,
        )


def _narrowest_bits(largest: int) -> int:
    return next(bits for bits in packing.SUPPORTED_BITS if largest < 1 << bits)


def _narrowest_signed_bits(codes: np.ndarray) -> int:
    low, high = int(codes.min()), int(codes.max())
    return next(bits for bits in packing.SUPPORTED_BITS if -(1 << (bits - 1)) <= low and high < 1 << (bits - 1))


def read_dequantize(node: ir.Node) -> DequantizedWeight | str:
    """The weight a 2-D constant ``DequantizeLinear`` produces, or the reason it cannot be fused."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return f"the weight comes from {node.op_type}, not DequantizeLinear"
    inputs = [*node.inputs, None, None][:3]
    if any(value is not None and value.const_value is None for value in inputs) or inputs[1] is None:
        return "DequantizeLinear inputs are not all constants"
    code_type = inputs[0].const_value.dtype
    if code_type not in _CODE_TYPES:
        return f"codes of type {code_type} are not 2-, 4- or 8-bit integers"
    signed = code_type in _SIGNED_CODE_TYPES
    codes = inputs[0].const_value.numpy().astype(np.int16)  # from ml_dtypes' int2/int4 too
    scales = inputs[1].const_value.numpy()
    zero_points = inputs[2].const_value.numpy().astype(np.int16) if inputs[2] is not None else None
    if codes.ndim != 2 or 0 in codes.shape:
        return f"the quantized weight has shape {codes.shape}, not a non-empty [K, N]"
    if scales.dtype != np.float32:
        return f"scales are {scales.dtype}; the CPU kernel takes float32"
    k, n = codes.shape
    axis = node.attributes.get_int("axis", 1)
    axis = axis + 2 if axis < 0 else axis
    block_size = node.attributes.get_int("block_size", 0)
    if block_size > 0 and axis in (0, 1):  # blocked: axis 0 = groups along K (per-OC), 1 = along N
        group_axis, group_size = axis, block_size
    elif scales.ndim == 1 and scales.size == (n if axis == 1 else k) and axis in (0, 1):  # per-axis
        group_axis, group_size = 1 - axis, (k if axis == 1 else n)
        scales = scales.reshape((1, n) if axis == 1 else (k, 1))
        zero_points = None if zero_points is None else zero_points.reshape(scales.shape)
    elif scales.size == 1:  # per-tensor
        group_axis, group_size = 0, k
        scales = np.full((1, n), scales.item(), dtype=np.float32)
        zero_points = None if zero_points is None else np.full((1, n), zero_points.item(), dtype=np.int16)
    else:
        return f"unsupported DequantizeLinear layout (axis={axis}, block_size={block_size}, scales {scales.shape})"
    if signed:
        if zero_points is not None and np.any(zero_points != 0):
            return "signed codes with non-zero zero points"
        bits = _narrowest_signed_bits(codes)
        unsigned = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
        return DequantizedWeight(unsigned, scales, None, bits, group_axis, group_size)
    largest = max(int(codes.max()), int(zero_points.max()) if zero_points is not None else 0)
    bits = _narrowest_bits(largest)
    zero_points = np.zeros(scales.shape, np.uint8) if zero_points is None else zero_points.astype(np.uint8)
    return DequantizedWeight(codes.astype(np.uint8), scales, zero_points, bits, group_axis, group_size)


def fits_matmulnbits(weight: DequantizedWeight) -> bool:
    """``MatMulNBits`` (4-bit) can hold the weight exactly: per-OC, codes in 4 bits, power-of-two block >= 16."""
    size = weight.group_size
    return weight.group_axis == 0 and weight.bits <= 4 and size >= 16 and size & (size - 1) == 0


def weight_source(value: ir.Value) -> tuple[ir.Node, bool] | None:
    """The DequantizeLinear that makes ``value`` and whether a 2-D ``Transpose`` lies between (a tied LM
    head reads ``Transpose(DequantizeLinear(embedding table))``); None if ``value`` is made otherwise."""
    producer, transposed = value.producer(), False
    if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
        perm = producer.attributes.get_ints("perm", [1, 0])
        source = producer.inputs[0].producer() if list(perm) == [1, 0] else None
        producer, transposed = source, True
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
        return None
    return producer, transposed


def typed_output(output: ir.Value, a: ir.Value, n: int) -> ir.Value:
    """Give a fused MatMul's output its type and shape (float32, ``A``'s shape with the last dimension N):
    no shape inference knows lowbit's op, and the next fusion reads its activation's type from here.
    (The rewriter keeps the replaced output's own type and shape where those were known.)"""
    output.dtype = ir.DataType.FLOAT
    if a.shape is not None and len(a.shape) >= 1:
        output.shape = ir.Shape([*a.shape[:-1], n])
    return output


def _reads_dequantized(node: ir.Node) -> bool:
    return any(
        value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear"
        for value in node.inputs
    )


class _FuseDequantizeMatMul(pattern.RewriteRuleClassBase):
    """``MatMul(A, [Transpose](DequantizeLinear(...)))`` -> one fused op; see the module docstring.

    ``use_matmulnbits``: send weights that ``fits_matmulnbits`` to ``MatMulNBits`` (with
    ``accuracy_level``); ``int8_activations``: the ``lowbit::QuantMatMul`` attribute of that name. ``state`` (a
    ``FusionState``) is shared by the rules of one run.
    """

    with_bias = False
    with_outliers = False

    def __init__(self, *, use_matmulnbits: bool, accuracy_level: int, int8_activations: bool, state: FusionState):
        super().__init__(type(self).__name__.lstrip("_"), remove_nodes=True)
        self.use_matmulnbits = use_matmulnbits
        self.accuracy_level = accuracy_level
        self.int8_activations = int8_activations
        self.state = state
        self._name: str | None = None  # of the MatMul being fused

    def pattern(self, op, a, b):
        return op.MatMul(a, b)

    def check(self, context, a, b, bias=None, **branch):
        result = pattern.MatchResult()
        # The fused node keeps the MatMul's name (the rewriter calls rewrite right after a successful check).
        self._name = next(node for node in context.nodes if node.op_type == "MatMul").name
        source = weight_source(b)
        if source is None:
            producer = b.producer()
            if producer is not None and _reads_dequantized(producer):
                self.state.reject(producer, f"the weight is {producer.op_type} of a DequantizeLinear output")
            return result.fail("the MatMul's right operand is not a DequantizeLinear output")
        producer, transposed = source
        weight = self.state.dequantized(producer, transposed)
        if isinstance(weight, str):
            self.state.reject(producer, weight)
            return result.fail(weight)
        k, n = weight.shape
        # A MatMul's operands share one type and the weight is float32 (read_dequantize checked its scales):
        # an activation of unknown type (a file without value_info, a fused op's output) is float32 too.
        if a.dtype is not None and a.dtype != ir.DataType.FLOAT:
            reason = f"activations are {a.dtype}; the CPU kernel takes float32"
            self.state.reject(producer, reason)
            return result.fail(reason)
        if a.shape is not None and isinstance(a.shape[-1], int) and a.shape[-1] != k:
            return result.fail(f"activation width {a.shape[-1]} != K = {k}")
        if self.with_bias:
            if bias.const_value is None or bias.const_value.dtype != ir.DataType.FLOAT:
                return result.fail("the Add is not a constant float32 bias")
            if bias.const_value.numpy().size != n or (bias.shape is not None and len(bias.shape) != 1):
                return result.fail(f"the bias is not a [{n}] vector")
        if self.with_outliers:
            outliers = read_outlier_branch(a, k, n, **branch)
            if isinstance(outliers, str):
                self.state.reject(branch["sums"].producer(), f"outliers left as a side branch: {outliers}")
                return result.fail(outliers)
        return result

    def rewrite(self, op, a, b, bias=None, **branch):
        source = weight_source(b)
        weight = self.state.dequantized(*source)
        if self.with_outliers:  # MatMulNBits has no input for them
            return self._quant_matmul(op, a, source, weight, bias, self._outlier_constants(op, a, weight, branch))
        if self.use_matmulnbits and fits_matmulnbits(weight):
            return self._matmulnbits(op, a, source, weight, bias)
        return self._quant_matmul(op, a, source, weight, bias)

    def _outlier_constants(self, op, a, weight, branch) -> list[ir.Value]:
        """The outliers' CSC initializers, made once per branch constants (a shared weight has one set)."""
        k, n = weight.shape
        source = (branch["ends"].producer().inputs[0].producer(), False)  # the Cast of the stored pointers
        arrays = read_outlier_branch(a, k, n, **branch)
        constants = self.state.constants(
            op, source, "outlier", lambda: dict(zip(("pointers", "rows", "values"), arrays))
        )
        return [constants["pointers"], constants["rows"], constants["values"]]

    def _quant_matmul(self, op, a, source, weight, bias, outliers=None):
        constants = self.state.lowbit_constants(op, source, weight)
        inputs = [a, constants["packed"], constants["scales"], constants["zero_points"]]
        if bias is not None or outliers is not None:
            inputs += [None, bias]
        if outliers is not None:
            inputs += outliers
        axis = "oc" if weight.group_axis == 0 else "ic"
        self.state.count(f"lowbit::QuantMatMul {axis}{weight.bits}" + (" + outliers" if outliers else ""))
        optional = {"int8_activations": 1} if self.int8_activations else {}  # the file stays as before without it
        return typed_output(
            op.op(
                quant_matmul_op.OP_TYPE,
                *inputs,
                _name=self._name,
                _domain=quant_matmul_op.DOMAIN,
                _version=1,
                **weight.op_attributes(),
                **optional,
            ),
            a,
            weight.shape[1],
        )

    def _matmulnbits(self, op, a, source, weight, bias):
        k, n = weight.shape
        codes = weight.codes
        if weight.zero_points is None:  # re-centre on MatMulNBits' implicit zero point, 8
            codes = codes + np.uint8(8 - (1 << (weight.bits - 1)))
        constants = self.state.constants(
            op,
            source,
            "nbits",
            lambda: {
                "packed": packing.pack_matmulnbits(codes, weight.group_size),
                "scales": np.ascontiguousarray(weight.scales.T.reshape(-1)),
                "zero_points": None
                if weight.zero_points is None
                else packing.pack_matmulnbits_zero_points(weight.zero_points),
            },
        )
        inputs = [a, constants["packed"], constants["scales"], constants["zero_points"]]
        if bias is not None:
            inputs += [None, bias]
        self.state.count("com.microsoft::MatMulNBits 4")
        return typed_output(
            op.op(
                "MatMulNBits",
                *inputs,
                _name=self._name,
                _domain=MATMULNBITS_DOMAIN,
                _version=1,
                K=k,
                N=n,
                bits=4,
                block_size=weight.group_size,
                accuracy_level=self.accuracy_level,
            ),
            a,
            n,
        )


class _FuseDequantizeMatMulBias(_FuseDequantizeMatMul):
    """The same with the bias ``Add`` that follows the MatMul folded into the op."""

    with_bias = True

    def pattern(self, op, a, b, bias):
        return op.Add(op.MatMul(a, b), bias)


def _outlier_branch(op, y, xt, rows, values, axis, ends, starts):
    """SplitOutliersPass's side branch on the MatMul output ``y`` (``passes/split_outliers.py``)."""
    running = op.CumSum(op.Mul(op.Gather(xt, rows, axis=0), values), axis, exclusive=1)
    sums = op.Sub(op.Gather(running, ends, axis=0), op.Gather(running, starts, axis=0), _outputs=["sums"])
    return op.Reshape(op.Transpose(sums, perm=[1, 0]), op.Shape(y))


class _FuseDequantizeMatMulOutliers(_FuseDequantizeMatMul):
    """``MatMul + outlier branch`` -> one op with the outliers as inputs."""

    with_outliers = True

    def pattern(self, op, a, b, xt, rows, values, axis, ends, starts):
        y = op.MatMul(a, b)
        return op.Add(y, _outlier_branch(op, y, xt, rows, values, axis, ends, starts))


class _FuseDequantizeMatMulOutliersBias(_FuseDequantizeMatMulOutliers):
    """``MatMul + outlier branch + bias`` (a MatMul and its bias Add: the branch sits between them)."""

    with_bias = True

    def pattern(self, op, a, b, bias, xt, rows, values, axis, ends, starts):
        y = op.MatMul(a, b)
        return op.Add(op.Add(y, _outlier_branch(op, y, xt, rows, values, axis, ends, starts)), bias)


class _FuseDequantizeMatMulBiasOutliers(_FuseDequantizeMatMulOutliers):
    """``MatMul + bias + outlier branch`` (a Gemm's output, which holds the bias, got the branch)."""

    with_bias = True

    def pattern(self, op, a, b, bias, xt, rows, values, axis, ends, starts):
        y = op.Add(op.MatMul(a, b), bias)
        return op.Add(y, _outlier_branch(op, y, xt, rows, values, axis, ends, starts))


def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _producer_is(value: ir.Value, op_type: str) -> ir.Node | None:
    node = value.producer()
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _cast_constant(value: ir.Value) -> np.ndarray | None:
    """The constant under ``Cast(constant, to=INT64)``, or None."""
    cast = _producer_is(value, "Cast")
    if cast is None or cast.attributes.get_int("to", 0) != ir.DataType.INT64:
        return None
    return _constant(cast.inputs[0])


def _slice_of(value: ir.Value, start: int, stop: int) -> ir.Value | None:
    """``x`` if ``value`` is ``Slice(x, [start], [stop], [0])`` (steps absent or 1), else None."""
    node = _producer_is(value, "Slice")
    if node is None or len(node.inputs) < 4:
        return None
    bounds = [_constant(v) for v in node.inputs[1:4]] + [
        _constant(node.inputs[4]) if len(node.inputs) > 4 else np.ones(1)
    ]
    if any(bound is None or bound.size != 1 for bound in bounds):
        return None
    return node.inputs[0] if [int(bound.item()) for bound in bounds] == [start, stop, 0, 1] else None


def read_outlier_branch(
    a, k, n, *, xt, rows, values, axis, ends, starts, **_
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """The CSC outliers ``(pointers uint32 [N+1], rows uint16 [nnz], values float32 [nnz])`` of a matched side
    branch, or the reason it cannot be an input of the fused op (or is not SplitOutliersPass's branch)."""
    reshape = None
    transpose = _producer_is(xt, "Transpose")
    if transpose is not None and list(transpose.attributes.get_ints("perm", [])) == [1, 0]:
        reshape = _producer_is(transpose.inputs[0], "Reshape")
    shape = _constant(reshape.inputs[1]) if reshape is not None else None
    if reshape is None or reshape.inputs[0] is not a or shape is None or shape.tolist() != [-1, k]:
        return "the branch does not read the MatMul's activations as Transpose(Reshape(A, [-1, K]))"
    pointer_source = _slice_of(ends, 1, n + 1)
    if pointer_source is None or _slice_of(starts, 0, n) is not pointer_source:
        return "the branch's column bounds are not slices of one pointer array"
    pointers, row_array, value_array = _cast_constant(pointer_source), _cast_constant(rows), _constant(values)
    axis_array = _constant(axis)
    if (
        pointers is None
        or row_array is None
        or value_array is None
        or axis_array is None
        or axis_array.size != 1
        or int(axis_array.item()) != 0
    ):
        return "the branch's indices or values are not constants"
    nnz = int(pointers[-1]) if pointers.size else -1
    if (
        pointers.shape != (n + 1,)
        or value_array.dtype != np.float32
        or row_array.shape != (nnz + 1,)
        or value_array.size != nnz + 1
    ):
        return "the branch's arrays do not form a CSC matrix of the weight's shape"
    if k > 1 << 16 or nnz >= 1 << 32:
        return f"K = {k} or {nnz} outliers exceed the op's uint16 rows / uint32 pointers"
    types = quant_matmul_op.OUTLIER_TYPES
    return (
        pointers.astype(types["pointers"]),
        row_array[:nnz].astype(types["rows"]),
        value_array.reshape(-1)[:nnz].astype(types["values"]),
    )


class FusionState:
    """What the rules of one fuse run share: read weights, packed initializers, counts, rejections."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._weights: dict[tuple[ir.Node, bool], DequantizedWeight | str] = {}
        self._constants: dict[tuple[ir.Node, bool, str], dict[str, ir.Value | None]] = {}
        self.fused: dict[str, int] = {}
        self.rejected: dict[ir.Node, str] = {}

    def dequantized(self, node: ir.Node, transposed: bool = False) -> DequantizedWeight | str:
        """``read_dequantize(node)`` (transposed on request), read once."""
        key = (node, transposed)
        if key not in self._weights:
            weight = self.dequantized(node) if transposed else read_dequantize(node)
            self._weights[key] = weight.transposed() if transposed and not isinstance(weight, str) else weight
        return self._weights[key]

    def reject(self, node: ir.Node, reason: str) -> None:
        self.rejected[node] = reason

    def count(self, target: str) -> None:
        self.fused[target] = self.fused.get(target, 0) + 1

    def constants(self, op, source: tuple[ir.Node, bool], kind: str, make) -> dict[str, ir.Value | None]:
        """The initializers for the weight of ``source`` (``weight_source``) in layout ``kind``, made (by
        ``make()``) once, so that every MatMul reading the same weight shares them."""
        key = (*source, kind)
        if key not in self._constants:
            node, transposed = source
            base = (node.inputs[0].name or node.name or "weight") + (".T" if transposed else "")
            values = {}
            for role, array in make().items():
                values[role] = (
                    None
                    if array is None
                    else op.initializer(ir.tensor(array), name=self._unique(f"{base}.{kind}.{role}"))
                )
            self._constants[key] = values
        return self._constants[key]

    def lowbit_constants(
        self, op, source: tuple[ir.Node, bool], weight: DequantizedWeight
    ) -> dict[str, ir.Value | None]:
        """``constants`` in ``lowbit::QuantMatMul``'s layout (packed codes, scales, zero points), which
        ``lowbit::QuantGather`` reads too."""
        return self.constants(
            op,
            source,
            "lowbit",
            lambda: {
                "packed": packing.pack(weight.codes, weight.bits),
                "scales": quant_matmul_op.storage_scales(weight.scales),  # float16 where lossless
                "zero_points": weight.zero_points,
            },
        )

    def made_constants(self, source: tuple[ir.Node, bool], kind: str) -> dict[str, ir.Value | None] | None:
        """The initializers already made for ``source`` in layout ``kind``, or None."""
        return self._constants.get((*source, kind))

    def _unique(self, name: str) -> str:
        return builders.unique_name(name, self.graph.initializers.__contains__, separator=".", first=1)


def rule_sets(
    state: FusionState, *, use_matmulnbits: bool, accuracy_level: int, int8_activations: bool
) -> list[pattern.RewriteRuleSet]:
    """Apply in this order: the forms with outliers, then the bias form over the whole graph, then the
    plain one, so a MatMul with its outlier branch and bias Add becomes one node (the rewriter visits a
    MatMul before its Adds)."""
    return [
        pattern.RewriteRuleSet(
            [
                rule.rule(
                    use_matmulnbits=use_matmulnbits,
                    accuracy_level=accuracy_level,
                    int8_activations=int8_activations,
                    state=state,
                )
            ],
            commute=True,
        )
        for rule in (
            _FuseDequantizeMatMulOutliersBias,
            _FuseDequantizeMatMulBiasOutliers,
            _FuseDequantizeMatMulOutliers,
            _FuseDequantizeMatMulBias,
            _FuseDequantizeMatMul,
        )
    ]
