"""Differential checks of lowbit's passes on generated graphs (NeuRI-style graphs, Tzer-style pass orders).

``check_order`` runs a sequence of registry passes on one graph and checks after every pass: the pass
contract (``modified=False`` means byte-identical), ``onnx.checker`` (full) and ONNX Runtime accept the
model and run it to finite outputs, lossless passes keep the outputs, and RTN quantization writes the
NumPy reference's weights within half a step of the float ones, so that every quantized MatMul's
output stays within ``|x| @ (scale / 2)`` of the float product. ``check_pipeline`` runs
``lowbit.optimize`` with a random recipe. Both raise ``FuzzFailure``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import lowbit
from lowbit.ir import analysis
from lowbit.passes.quant.rtn import expand_groups, fit_to_type, quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.runtime.session import session_options
from tests import factories
from tests.fuzz.generator import Spec, build
from tests.fuzz.registry import ANALYSIS, LOSSLESS, PASSES, Context, random_recipe
from tests.parity import serialized

#: Lossless passes keep outputs to fp32 round-off: |after - before| <= RTOL * |before| + ATOL * max|before|.
RTOL, ATOL = 1e-4, 1e-5
#: Beyond that, a lossless pass may move an output by this many times what moving every MatMul/Gemm result
#: by up to ``ROUND_OFF_ULPS`` ulps of its largest magnitude moves it (the graph's amplification of round-off).
ROUND_OFF_FACTOR, ROUND_OFF_ULPS = 10.0, 4
#: ONNX Runtime's float32 accumulation on top of the RTN bound, relative to |x| @ |W_hat|.
ACCUMULATION = 1e-4


class FuzzFailure(AssertionError):
    """A check failed at ``step`` (``"<index>:<pass>"``, ``"build"`` or ``"pipeline"``); ``kind`` says which."""

    def __init__(self, step: str, kind: str, message: str):
        super().__init__(f"[{step}] {kind}: {message}")
        self.step, self.kind, self.message = step, kind, message

    @property
    def signature(self) -> tuple[str, str]:
        """What a smaller graph must still show to count as the same failure: the pass and the check."""
        return self.step.split(":")[-1], self.kind


def random_order(rng: np.random.Generator, length: int) -> list[str]:
    """``length`` registry passes drawn with repetition; calibration right before the passes that need it."""
    names = sorted(PASSES)
    order = []
    for index in rng.integers(len(names), size=length):
        if PASSES[names[index]].needs_calibration:
            order.append("capture_calibration")
        order.append(names[index])
    return order


def _feeds(model: ir.Model) -> tuple[dict, list[dict]]:
    """Inputs to compare outputs on, and calibration batches (different draws)."""
    return factories.feeds_for(model, seed=1), [factories.feeds_for(model, seed=seed) for seed in (2, 3)]


def _valid_outputs(model: ir.Model, feeds: dict, step: str, finite: bool) -> list[np.ndarray]:
    """The model passes the checker, ONNX Runtime runs it, and (when ``finite``) its outputs are finite."""
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        outputs = _session(model, []).run(None, feeds)
    except Exception as error:
        raise FuzzFailure(step, "invalid", f"{type(error).__name__}: {error}") from error
    if finite and not all(np.isfinite(output).all() for output in outputs):
        raise FuzzFailure(step, "non-finite", "outputs hold NaN or Inf where the float graph's did not")
    return outputs


def _session(model: ir.Model, extra_outputs: list[str]) -> ort.InferenceSession:
    """An fp32-activation session (MatMulNBits accuracy level 0) with intermediate values as extra outputs."""
    proto = ir.to_proto(model)
    present = {output.name for output in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs if name not in present)
    return ort.InferenceSession(proto.SerializeToString(), session_options(matmulnbits_accuracy_level=0))


def check_order(spec: Spec, order: list[str], seed: int) -> None:
    """Run ``order`` on ``build(spec)`` with every check after every pass."""
    try:
        model = build(spec)
    except Exception as error:
        raise FuzzFailure("build", "crash", f"{type(error).__name__}: {error}") from error
    feeds, batches = _feeds(model)
    context = Context(np.random.default_rng(seed), batches)
    outputs = _valid_outputs(model, feeds, "build", finite=False)
    finite = all(np.isfinite(output).all() for output in outputs)
    for index, name in enumerate(order):
        step, entry = f"{index}:{name}", PASSES[name]
        pass_ = entry.make(context)
        before = serialized(model)
        weights = _weights(model) if entry.rtn_reference else {}
        known = {id(node) for node in model.graph if node.op_type == "DequantizeLinear"}
        try:
            result = pass_(model)
        except Exception as error:
            raise FuzzFailure(step, "crash", f"{type(error).__name__}: {error}") from error
        model = result.model
        if not result.modified and serialized(model) != before:
            raise FuzzFailure(step, "contract", "modified=False, but the model changed")
        if entry.kind == ANALYSIS and result.modified:
            raise FuzzFailure(step, "contract", "an analysis pass modified the model")
        new_outputs = _valid_outputs(model, feeds, step, finite)
        if entry.kind == LOSSLESS:
            _check_close(
                outputs,
                new_outputs,
                step,
                lambda before=before, outputs=outputs: _round_off_noise(before, feeds, outputs),
            )
        if entry.rtn_reference:
            _check_rtn(model, weights, known, pass_.scheme.bits, feeds, step)
        outputs = new_outputs


#: Limits the README documents, refused with a message that names the way out: not findings.
DOCUMENTED_REFUSALS = (
    "lies outside the layer's span in graph order, so layers cannot be calibrated one after another; use "
    "calibration_mode='parallel'",
)


def check_pipeline(spec: Spec, seed: int) -> lowbit.Recipe:
    """``lowbit.optimize`` with a random recipe: the model it returns is valid and runs; returns the recipe."""
    model = build(spec)
    feeds, batches = _feeds(model)
    context = Context(np.random.default_rng(seed), batches)
    finite = all(np.isfinite(output).all() for output in _valid_outputs(model, feeds, "build", finite=False))
    recipe = random_recipe(context)
    calibration = batches if recipe.needs_calibration or context.flag(0.3) else None
    try:
        result = lowbit.optimize(model, recipe, calibration=calibration)
    except ValueError as error:
        if not any(refusal in str(error) for refusal in DOCUMENTED_REFUSALS):
            raise FuzzFailure("pipeline", "crash", f"{recipe}: {type(error).__name__}: {error}") from error
        return recipe
    except Exception as error:
        raise FuzzFailure("pipeline", "crash", f"{recipe}: {type(error).__name__}: {error}") from error
    _valid_outputs(result.model, feeds, "pipeline", finite)
    return recipe


def _check_close(expected: list[np.ndarray], actual: list[np.ndarray], step: str, noise=None) -> None:
    """Outputs kept to float32 round-off; ``noise()`` (asked only on a mismatch) gives how far float32
    round-off alone moves each output, for graphs that amplify it."""
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        scale = float(np.abs(want).max()) if want.size else 0.0
        if want.shape == got.shape and np.allclose(got, want, rtol=RTOL, atol=ATOL * max(scale, 1.0), equal_nan=True):
            continue
        if want.shape == got.shape and noise is not None:
            allowed = RTOL * np.abs(want) + ATOL * max(scale, 1.0) + ROUND_OFF_FACTOR * noise()[index]
            if (np.abs(got - want) <= allowed).all() and (np.isnan(got) == np.isnan(want)).all():
                continue
        error = np.abs(got - want).max() if want.shape == got.shape else f"shape {got.shape} != {want.shape}"
        raise FuzzFailure(step, "mismatch", f"output {index} moved by {error} (outputs up to {scale:.3g})")


def _round_off_noise(model_bytes: bytes, feeds: dict, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """How far each output moves when every MatMul/Gemm result of the model before the pass is off by up
    to a few ulps of its largest magnitude, as a different summation order leaves it: the round-off a
    lossless rewrite may cause, however much the graph amplifies it (a norm over nearly equal values).
    The largest move of three draws (one draw can round two jitters to the same ulp)."""
    moves = [_jittered_move(model_bytes, feeds, outputs, draw) for draw in range(3)]
    return [np.maximum.reduce(per_output) for per_output in zip(*moves, strict=True)]


def _jittered_move(model_bytes: bytes, feeds: dict, outputs: list[np.ndarray], draw: int) -> list[np.ndarray]:
    proto = onnx.ModelProto.FromString(model_bytes)
    graph = proto.graph
    ulps = ROUND_OFF_ULPS * float(np.finfo(np.float32).eps)
    nodes = []
    for index, node in enumerate(graph.node):
        nodes.append(node)
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        result = node.output[0]
        exact = node.output[0] = f"{result}.exact"
        names = [f"{result}.{part}" for part in ("abs", "max", "jitter", "noise")]
        nodes += [
            onnx.helper.make_node("Abs", [exact], [names[0]]),
            onnx.helper.make_node("ReduceMax", [names[0]], [names[1]], keepdims=0),
            onnx.helper.make_node(
                "RandomUniformLike", [exact], [names[2]], low=-ulps, high=ulps, seed=float(index + 1000 * draw)
            ),
            onnx.helper.make_node("Mul", [names[2], names[1]], [names[3]]),
            onnx.helper.make_node("Add", [exact, names[3]], [result]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    moved = ort.InferenceSession(proto.SerializeToString(), session_options(matmulnbits_accuracy_level=0)).run(
        None, feeds
    )
    return [np.abs(m.astype(np.float64) - o) for m, o in zip(moved, outputs, strict=True)]


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Float weight of every weight use, by node name, as a MatMul ``[K, N]`` operand (tables as ``[V, D]``)."""
    weights = {}
    for use in analysis.weight_uses(model.graph):
        weight = np.asarray(analysis.weight_value_array(use), dtype=np.float32)
        weights[use.node.name] = analysis.gemm_weight_kn(use.node, weight) if use.node.op_type == "Gemm" else weight
    return weights


def _dequantize(node: ir.Node, bits: int, step: str) -> tuple[np.ndarray, np.ndarray, QuantScheme]:
    """``W_hat`` and half a step per element, from the DequantizeLinear's initializers, and its scheme."""
    codes = node.inputs[0].const_value.numpy().astype(np.int64)
    scales = node.inputs[1].const_value.numpy().astype(np.float32)
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    symmetric = zero is None
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    if codes.min() < low or codes.max() > high:
        raise FuzzFailure(
            step, "bound", f"{node.name}: codes span {codes.min()}..{codes.max()}, outside {bits}-bit {low}..{high}"
        )
    axis, block = node.attributes.get_int("axis", 1), node.attributes.get_int("block_size", 0)
    full_scales = expand_groups(scales, block, axis, codes.shape)
    centered = (
        codes
        if symmetric
        else codes - expand_groups(zero.const_value.numpy().astype(np.int64), block, axis, codes.shape)
    )
    scheme = QuantScheme(bits, block, ("oc", "ic")[axis], symmetric)
    half_step = full_scales.astype(np.float64) / 2
    if node.inputs[1].dtype != ir.DataType.FLOAT:  # codes rounded on the float32 grid, stored scales rounded to float16
        # a stored scale is off by at most its relative precision, or by the subnormal spacing below 6.1e-5
        float16 = np.finfo(np.float16)
        rounding = np.maximum(full_scales.astype(np.float64) * float(float16.eps), float(float16.smallest_subnormal))
        half_step = half_step + (np.abs(centered) + 1) * rounding
    return centered.astype(np.float32) * full_scales, half_step, scheme


def _check_rtn(model: ir.Model, weights: dict, known: set[int], bits: int, feeds: dict, step: str) -> None:
    """Every weight this pass quantized equals the NumPy RTN reference and lies within half a step of
    the float weight; every quantized MatMul's output lies within ``|x| @ (scale / 2)`` of ``x @ W``."""
    products = []
    for node in model.graph:
        operand = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if operand is None:
            continue
        producer, transposed = node.inputs[operand].producer(), False
        if producer is not None and producer.op_type == "Cast":  # a bfloat16 / double weight: DQ to float32, Cast
            producer = producer.inputs[0].producer()
        if producer is not None and producer.op_type == "Transpose":
            producer, transposed = producer.inputs[0].producer(), True
        if producer is None or producer.op_type != "DequantizeLinear" or id(producer) in known:
            continue
        original = weights.get(node.name.removesuffix(".MatMul"))  # a Gemm became <name>.MatMul [+ Add]
        if original is None:
            raise FuzzFailure(step, "bound", f"{node.name} reads a new DequantizeLinear but had no float weight")
        w_hat, half_step, scheme = _dequantize(producer, bits, step)
        stored = original.T if transposed else original  # the DequantizeLinear's own layout
        # the scales as the DequantizeLinear's type stores them (float16 weights: float16 scales)
        reference = fit_to_type(quantize_rtn(stored, scheme), producer.inputs[1].dtype.numpy()).dequantize()
        if not np.array_equal(w_hat, reference):
            raise FuzzFailure(
                step,
                "reference",
                f"{node.name}: W_hat differs from the NumPy RTN reference by {np.abs(w_hat - reference).max()}",
            )
        excess = np.abs(w_hat.astype(np.float64) - stored) - half_step * (1 + 1e-5) - 1e-6 * np.abs(stored)
        if excess.max() > 0:
            raise FuzzFailure(step, "bound", f"{node.name}: |W - W_hat| exceeds half a step by {excess.max():.3g}")
        if node.op_type == "MatMul":
            products.append(
                (node, original, (w_hat.T if transposed else w_hat), (half_step.T if transposed else half_step))
            )
    if not products:
        return
    names = [name for node, *_ in products for name in (node.inputs[0].name, node.outputs[0].name)]
    values = {**feeds, **dict(zip(names, _session(model, names).run(names, feeds)))}
    for node, weight, w_hat, half_step in products:
        x = np.abs(values[node.inputs[0].name].astype(np.float64))
        error = np.abs(values[node.outputs[0].name] - values[node.inputs[0].name].astype(np.float64) @ weight)
        # a float16 MatMul rounds its inputs and its output to float16
        precision = max(ACCUMULATION, float(np.finfo(values[node.outputs[0].name].dtype).eps))
        allowed = x @ half_step * (1 + 1e-6) + precision * (x @ np.abs(w_hat.astype(np.float64))) + 1e-6
        if precision > ACCUMULATION:
            allowed += precision * np.abs(values[node.inputs[0].name].astype(np.float64) @ weight)
        if (error > allowed).any():
            worst = np.unravel_index(np.argmax(error - allowed), error.shape)
            raise FuzzFailure(
                step, "bound", f"{node.name}: output error {error[worst]:.3g} > bound {allowed[worst]:.3g}"
            )
