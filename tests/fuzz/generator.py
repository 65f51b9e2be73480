"""Random valid ONNX graphs from the op kinds lowbit's passes touch, seeded and reproducible.

A graph is described by a ``Spec`` (plain data: JSON-able, shrinkable) and built by ``build``: a chain
of blocks over one activation, 2-D ``[B, D]`` or 3-D ``[B, S, D]``: weight MatMuls and Gemms (plain,
with a bias, behind a foldable Transpose / Cast / Mul, or sharing an earlier weight), activations, Layer
and RMS norms, per-channel scales, Transpose, Reshape, and branches (``fork`` keeps the activation,
``merge`` adds or multiplies it back). With ``vocab`` the input is token ids read from an embedding
table, which a ``tied`` block multiplies by again (a tied LM head). Every block adapts to the shape it
receives, so any subset of a spec's blocks still builds: that is what ``smaller`` relies on.

Issue 16 added what odd files carry: weights in float16 / bfloat16 / float64 (a cast weight, or a MatMul in
that type between Casts), weights from ``Constant`` nodes, files without value_info, the default domain
spelled ``"ai.onnx"``, older opsets (13-17: Gelu, LayerNormalization and ReduceMean's axes input adapt) and
an ``If`` whose branches name values like the quantizer's (``<layer>.scales``, ``<layer>.dequantized``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from tests import factories

KINDS = ("linear", "act", "norm", "affine", "transpose", "reshape", "fork", "merge")
OPSETS = (13, 15, 17, 20)
KIND_WEIGHTS = (0.38, 0.14, 0.1, 0.08, 0.07, 0.07, 0.09, 0.07)
VARIANTS = {
    "linear": (
        "matmul",
        "bias",
        "gemm",
        "gemm_t",
        "transposed",
        "fp16",
        "scaled",
        "tied",
        "constant",
        "bf16",
        "f64",
        "f16_native",
    ),
    "act": ("Relu", "Gelu", "Sigmoid", "Tanh", "silu"),
    "norm": ("layer", "rms"),
    "affine": ("mul", "add"),
    "transpose": ("",),
    "reshape": ("",),
    "fork": ("",),
    "merge": ("add", "mul"),
}
WIDTHS = (1, 3, 8, 16, 17, 24, 33)
VOCAB = 64  # tests.factories.feeds_for draws token ids below 50


@dataclasses.dataclass(frozen=True)
class Block:
    kind: str
    variant: str = ""
    width: int = 0  # linear: output channels
    share: int = -1  # linear: reuse the weight of this earlier linear block when its shape fits


@dataclasses.dataclass(frozen=True)
class Spec:
    seed: int  # weights and constants
    batch: tuple[int, ...]  # leading input dimensions: one -> 2-D input, two -> 3-D
    width: int  # input channels (embedding width with ``vocab``)
    blocks: tuple[Block, ...]
    vocab: int = 0  # > 0: the input is token ids into an embedding table [vocab, width]
    outputs: int = 1  # 2: the first block's result is a graph output as well
    opset: int = 20
    value_info: bool = True  # False: no type or shape on any intermediate value
    domain: str = ""  # the default domain's spelling: "" or "ai.onnx"
    subgraph: bool = False  # the result goes through an If whose branches use the quantizer's names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Spec:
        blocks = tuple(Block(**block) for block in data["blocks"])
        return cls(**{**data, "batch": tuple(data["batch"]), "blocks": blocks})


def random_spec(rng: np.random.Generator, max_blocks: int = 10) -> Spec:
    rank = int(rng.integers(2, 4))
    batch = tuple(int(d) for d in rng.integers(1, 6, size=rank - 1))
    blocks = []
    for _ in range(int(rng.integers(1, max_blocks + 1))):
        kind = str(rng.choice(KINDS, p=KIND_WEIGHTS))
        variant = str(rng.choice(VARIANTS[kind]))
        width = int(rng.choice(WIDTHS)) if kind == "linear" else 0
        share = int(rng.integers(0, len(blocks))) if kind == "linear" and blocks and rng.random() < 0.3 else -1
        blocks.append(Block(kind, variant, width, share))
    vocab = VOCAB if rank == 3 and rng.random() < 0.25 else 0
    outputs = 2 if rng.random() < 0.2 else 1
    odd = rng.random(4)
    return Spec(
        int(rng.integers(2**31)),
        batch,
        int(rng.choice(WIDTHS)),
        tuple(blocks),
        vocab,
        outputs,
        opset=int(rng.choice(OPSETS)) if odd[0] < 0.3 else 20,
        value_info=bool(odd[1] >= 0.3),
        domain="ai.onnx" if odd[2] < 0.15 else "",
        subgraph=bool(odd[3] < 0.2),
    )


def smaller(spec: Spec) -> Iterator[Spec]:
    """Specs one step smaller (a block dropped, a feature off, a dimension halved), largest steps first."""
    for index in range(len(spec.blocks)):
        if len(spec.blocks) > 1:
            yield dataclasses.replace(spec, blocks=spec.blocks[:index] + spec.blocks[index + 1 :])
    if spec.outputs > 1:
        yield dataclasses.replace(spec, outputs=1)
    for field, default in (("opset", 20), ("value_info", True), ("domain", ""), ("subgraph", False)):
        if getattr(spec, field) != default:
            yield dataclasses.replace(spec, **{field: default})
    if spec.vocab:
        yield dataclasses.replace(spec, vocab=0)
    if len(spec.batch) > 1:
        yield dataclasses.replace(spec, batch=spec.batch[:1])
    for index, size in enumerate(spec.batch):
        if size > 1:
            yield dataclasses.replace(spec, batch=spec.batch[:index] + (size // 2,) + spec.batch[index + 1 :])
    if spec.width > 1:
        yield dataclasses.replace(spec, width=spec.width // 2)
    for index, block in enumerate(spec.blocks):
        if block.width > 1:
            halved = dataclasses.replace(block, width=block.width // 2)
            yield dataclasses.replace(spec, blocks=spec.blocks[:index] + (halved,) + spec.blocks[index + 1 :])
        if block.share >= 0:
            unshared = dataclasses.replace(block, share=-1)
            yield dataclasses.replace(spec, blocks=spec.blocks[:index] + (unshared,) + spec.blocks[index + 1 :])


def build(spec: Spec) -> ir.Model:
    """The ONNX model (``spec.opset``, typed and shaped unless ``spec.value_info`` is off) of ``spec``."""
    model = _Builder(spec).model()
    if not spec.value_info:
        graph = model.graph
        keep = {id(value) for value in (*graph.inputs, *graph.outputs, *graph.initializers.values())}
        for node in graph:
            for output in node.outputs:
                if id(output) not in keep:
                    output.type, output.shape = None, None
    if spec.domain:
        version = model.opset_imports.pop("")
        model.opset_imports[spec.domain] = version
        for node in model.graph:
            if node.domain == "":
                node.domain = spec.domain
    return model


class _Builder:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.linears: list[ir.Value | None] = []  # per linear block: its plain [K, N] weight, if any
        self.stack: list[tuple[ir.Value, tuple[int, ...]]] = []
        self.table: ir.Value | None = None

    # -- helpers -------------------------------------------------------------------------------------

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        value = factories.constant(name, array)
        self.initializers.append(value)
        return value

    def normal(self, name: str, shape: tuple[int, ...], scale: float = 1.0) -> ir.Value:
        return self.constant(name, (scale * self.rng.standard_normal(shape)).astype(np.float32))

    def op(self, op: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
        node = factories.node(op, inputs, name, **attributes)
        self.nodes.append(node)
        return node.outputs[0]

    # -- the graph -----------------------------------------------------------------------------------

    def model(self) -> ir.Model:
        spec = self.spec
        if spec.vocab:
            ids = factories.graph_input("ids", list(spec.batch), ir.DataType.INT64)
            self.table = self.normal("embed", (spec.vocab, spec.width))
            inputs = [ids]
            current = self.op("Gather", [self.table, ids], "embed_tokens")
        else:
            inputs = [factories.graph_input("x", [*spec.batch, spec.width])]
            current = inputs[0]
        shape = (*spec.batch, spec.width)
        outputs = []
        for index, block in enumerate(spec.blocks):
            name = f"layers.{index // 4}.m{index // 2 % 2}.{block.kind}{index}"
            current, shape = getattr(self, block.kind)(block, name, current, shape)
            if index == 0 and spec.outputs > 1 and current is not inputs[0]:
                outputs.append(current)
        if spec.subgraph:
            current = self.branch(current)
        if current is inputs[0] or current in outputs:
            current = self.op("Identity", [current], "result")
        return factories.model(inputs, [current, *outputs], self.nodes, self.initializers, opset=spec.opset)

    def branch(self, x: ir.Value) -> ir.Value:
        """If(True) whose branches name their values like the quantizer names a layer's (SSA trap)."""
        layers = [
            f"layers.{i // 4}.m{i // 2 % 2}.{b.kind}{i}" for i, b in enumerate(self.spec.blocks) if b.kind == "linear"
        ]
        base = layers[0] if layers else "branch"
        then_nodes = [factories.node("Relu", [x], "branch.then_relu", output=f"{base}.dequantized")]
        then_nodes.append(
            factories.node("Identity", [then_nodes[0].outputs[0]], "branch.then_id", output=f"{base}.scales")
        )
        else_nodes = [factories.node("Identity", [x], f"{base}.DequantizeLinear", output=f"{base}.qweight")]
        for nodes in (then_nodes, else_nodes):
            nodes[-1].outputs[0].type, nodes[-1].outputs[0].shape = x.type, x.shape
        then_graph = ir.Graph([], [then_nodes[-1].outputs[0]], nodes=then_nodes, name="then")
        else_graph = ir.Graph([], [else_nodes[-1].outputs[0]], nodes=else_nodes, name="else")
        condition = self.constant("branch.cond", np.array(True))
        node = ir.node(
            "If", [condition], attributes={"then_branch": then_graph, "else_branch": else_graph}, name="branch"
        )
        node.outputs[0].name = "branch_out"
        self.nodes.append(node)
        return node.outputs[0]

    def linear(self, block: Block, name: str, x: ir.Value, shape: tuple[int, ...]):
        k, n = shape[-1], block.width
        variant = block.variant
        if variant in ("gemm", "gemm_t") and len(shape) != 2:
            variant = "bias"  # Gemm takes 2-D inputs only
        if variant == "tied" and (self.table is None or k != self.spec.width):
            variant = "matmul"
        scale = 1 / np.sqrt(k)  # keeps activations O(1) through deep stacks
        if variant == "tied":
            weight = self.op("Transpose", [self.table], f"{name}.tie", perm=[1, 0])
            n = self.spec.vocab
            self.linears.append(None)
        elif variant in ("gemm", "gemm_t"):
            trans_b = variant == "gemm_t"
            weight = self.normal(f"{name}.weight", (n, k) if trans_b else (k, n), scale)
            bias = self.normal(f"{name}.bias", (n,), 0.1)
            self.linears.append(None)
            alpha, beta = (0.5, 2.0) if trans_b else (1.0, 1.0)
            return self.op("Gemm", [x, weight, bias], name, transB=int(trans_b), alpha=alpha, beta=beta), (shape[0], n)
        elif variant == "transposed":
            weight = self.op("Transpose", [self.normal(f"{name}.weight_t", (n, k), scale)], f"{name}.t", perm=[1, 0])
            self.linears.append(None)
        elif variant == "fp16":
            half = self.constant(f"{name}.weight_fp16", (scale * self.rng.standard_normal((k, n))).astype(np.float16))
            weight = self.op("Cast", [half], f"{name}.cast", to=ir.DataType.FLOAT)
            self.linears.append(None)
        elif variant == "constant":
            array = (scale * self.rng.standard_normal((k, n))).astype(np.float32)
            weight = self.op("Constant", [], f"{name}.weight_constant", value=ir.tensor(array))
            self.linears.append(None)
        elif variant in ("bf16", "f64"):  # a weight stored in that type, cast to float32
            import ml_dtypes

            dtype = ml_dtypes.bfloat16 if variant == "bf16" else np.float64
            array = (scale * self.rng.standard_normal((k, n))).astype(dtype)
            weight = self.op(
                "Cast", [self.constant(f"{name}.weight_{variant}", array)], f"{name}.cast", to=ir.DataType.FLOAT
            )
            self.linears.append(None)
        elif variant == "f16_native":  # the MatMul itself in float16, between Casts
            # (a float64 MatMul here crashes ONNX Runtime 1.32's session creation after a 3-D Transpose:
            # Transpose -> Cast(double) -> MatMul -> Cast segfaults; double weights are tested in tests/passes)
            dtype, elem = np.float16, ir.DataType.FLOAT16
            weight = self.constant(f"{name}.weight_{variant}", (scale * self.rng.standard_normal((k, n))).astype(dtype))
            self.linears.append(None)
            cast = self.op("Cast", [x], f"{name}.cast_in", to=elem)
            y = self.op("MatMul", [cast, weight], name)
            return self.op("Cast", [y], f"{name}.cast_out", to=ir.DataType.FLOAT), (*shape[:-1], n)
        elif variant == "scaled":
            factor = self.constant(f"{name}.factor", np.array(self.rng.uniform(0.5, 2.0), np.float32))
            weight = self.op("Mul", [self.normal(f"{name}.weight_s", (k, n), scale), factor], f"{name}.scale")
            self.linears.append(None)
        else:
            weight = self._shared(block, k, n) or self.normal(f"{name}.weight", (k, n), scale)
            self.linears.append(weight)
        y = self.op("MatMul", [x, weight], name)
        if variant == "bias":
            y = self.op("Add", [y, self.normal(f"{name}.bias", (n,), 0.1)], f"{name}.add")
        return y, (*shape[:-1], n)

    def _shared(self, block: Block, k: int, n: int) -> ir.Value | None:
        if 0 <= block.share < len(self.linears):
            weight = self.linears[block.share]
            if weight is not None and tuple(weight.shape) == (k, n):
                return weight
        return None

    def act(self, block: Block, name: str, x: ir.Value, shape):
        if block.variant == "Gelu" and self.spec.opset < 20:
            return self.op("Tanh", [x], name), shape
        if block.variant == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x], f"{name}.sigmoid")], name), shape
        return self.op(block.variant, [x], name), shape

    def norm(self, block: Block, name: str, x: ir.Value, shape):
        width = shape[-1]
        gamma = self.constant(f"{name}.gamma", self.rng.uniform(0.5, 1.5, width).astype(np.float32))
        if block.variant == "layer" and self.spec.opset >= 17:
            beta = self.normal(f"{name}.beta", (width,), 0.1)
            return self.op("LayerNormalization", [x, gamma, beta], name, axis=-1), shape
        # RMSNorm as exporters decompose it: x / sqrt(mean(x^2) + eps) * gamma
        eps = self.constant(f"{name}.eps", np.array(1e-5, np.float32))
        square = self.op("Mul", [x, x], f"{name}.square")
        if self.spec.opset >= 18:
            axes = self.constant(f"{name}.axes", np.array([-1], np.int64))
            mean = self.op("ReduceMean", [square, axes], f"{name}.mean", keepdims=1)
        else:  # axes is an attribute before opset 18
            mean = self.op("ReduceMean", [square], f"{name}.mean", keepdims=1, axes=[-1])
        root = self.op("Sqrt", [self.op("Add", [mean, eps], f"{name}.eps_add")], f"{name}.sqrt")
        return self.op("Mul", [self.op("Div", [x, root], f"{name}.div"), gamma], name), shape

    def affine(self, block: Block, name: str, x: ir.Value, shape):
        op = "Mul" if block.variant == "mul" else "Add"
        constant = self.constant(f"{name}.{block.variant}", self.rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32))
        return self.op(op, [x, constant], name), shape

    def transpose(self, block: Block, name: str, x: ir.Value, shape):
        perm = [1, 0, 2] if len(shape) == 3 else [1, 0]
        return self.op("Transpose", [x], name, perm=perm), tuple(shape[axis] for axis in perm)

    def reshape(self, block: Block, name: str, x: ir.Value, shape):
        new_shape = (shape[0] * shape[1], shape[2]) if len(shape) == 3 else (shape[0], 1, shape[1])
        target = self.constant(f"{name}.shape", np.array(new_shape, np.int64))
        return self.op("Reshape", [x, target], name), new_shape

    def fork(self, block: Block, name: str, x: ir.Value, shape):
        self.stack.append((x, shape))
        return x, shape

    def merge(self, block: Block, name: str, x: ir.Value, shape):
        if not self.stack:
            return x, shape
        other, other_shape = self.stack.pop()
        if other_shape[:-1] != shape[:-1]:
            return x, shape  # the branches went different ways: nothing to merge
        if other_shape != shape:  # project the kept branch to the current width
            weight = self.normal(f"{name}.proj", (other_shape[-1], shape[-1]), 1 / np.sqrt(other_shape[-1]))
            other = self.op("MatMul", [other, weight], f"{name}.proj")
        return self.op("Add" if block.variant == "add" else "Mul", [x, other], name), shape


def minimize(spec: Spec, still_fails: Callable[[Spec], bool], budget: int = 400) -> Spec:
    """Greedy delta debugging: move to the first ``smaller`` spec that still fails, until none does
    (or ``budget`` candidates were tried)."""
    tried = 0
    while True:
        for candidate in smaller(spec):
            tried += 1
            if tried > budget:
                return spec
            if still_fails(candidate):
                spec = candidate
                break
        else:
            return spec
