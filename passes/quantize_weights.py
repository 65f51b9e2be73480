"""QuantizeWeightsPass: replace float weights by low-bit codes + blocked ``DequantizeLinear`` (portable
QDQ form that stock ONNX Runtime runs).

Which weights: every weight MatMul/Gemm that ``lowbit.ir.analysis.weight_uses`` finds. The LM head and
embedding tables stay in float unless opted in (``include_lm_head``, ``include_embeddings``); the report
lists every weight left in float and why. Embedding tables ``[V, D]`` are grouped along D (each token's
row on its own), whatever the scheme's axis, because a Gather reads whole rows.

A weight shared by several MatMuls is quantized once and its DequantizeLinear output feeds them all.
The model's default-domain opset is raised to what the storage types need (21, or 25 for 2-bit) with
onnxscript's version converter, and its IR version to 10 (11 for 2-bit).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import onnxscript.version_converter
from tqdm.auto import tqdm

from lowbit.ir import analysis, builders
from lowbit.ir.scheme import QuantScheme
from lowbit.passes.quant.rtn import quantize_rtn, relative_error
from lowbit.passes.report import SkippedWeight, WeightRecord


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """RTN-quantize weights to ``scheme`` and write them as blocked DequantizeLinear + MatMul."""

    def __init__(self, scheme: QuantScheme, *, include_lm_head: bool = False, include_embeddings: bool = False):
        super().__init__()
        if scheme.method != "rtn":
            raise NotImplementedError(
                f"QuantizeWeightsPass implements method='rtn' only; {scheme.method!r} needs calibration "
                "statistics, which arrive with the calibration work (issue 8)"
            )
        self.scheme = scheme
        self.include_lm_head = include_lm_head
        self.include_embeddings = include_embeddings
        self.weight_records: list[WeightRecord] = []
        self.skipped: list[SkippedWeight] = []
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.weight_records, self.skipped = [], []
        graph = model.graph
        groups: dict[tuple[int, bool], list[analysis.WeightUse]] = {}
        for use in analysis.weight_uses(graph):
            groups.setdefault((id(use.weight), use.kind == "embedding"), []).append(use)
        names = _NameAllocator(graph)
        for uses in tqdm(list(groups.values()), desc="quantize weights", unit="weight", leave=False):
            skip = self._skip_reason(uses)
            if skip is not None:
                culprit, reason = skip
                self.skipped.append(SkippedWeight(culprit.weight.name or "", culprit.layer, culprit.kind, reason))
                continue
            self._quantize(graph, uses, names)
        modified = bool(self.weight_records)
        if modified:
            _require_storage_support(model, self.scheme.bits)
        self.details = {"quantized": len(self.weight_records), "skipped": len(self.skipped)}
        return ir.passes.PassResult(model, modified=modified)

    def _skip_reason(self, uses: list[analysis.WeightUse]) -> tuple[analysis.WeightUse, str] | None:
        """The use that keeps this weight in float and why, or None to quantize it."""
        for use in uses:
            if use.kind == "lm_head" and not self.include_lm_head:
                return use, "output head (LM head) left in float by default (Recipe(include_lm_head=True) quantizes it)"
            if use.kind == "embedding" and not self.include_embeddings:
                return use, "embedding table left in float by default (Recipe(include_embeddings=True) quantizes it)"
        layouts = {_weight_layout(use.node) for use in uses}
        if len(layouts) > 1:
            return uses[0], f"shared by nodes that read it in different layouts {sorted(layouts)}"
        for use in uses:
            if use.node.op_type == "Gemm":
                if use.node.attributes.get_int("transA", 0):
                    return use, f"Gemm {use.node.name!r} with transA=1 is not supported"
                bias = use.node.inputs[2] if len(use.node.inputs) > 2 else None
                if bias is not None and bias.const_value is None and use.node.attributes.get_float("beta", 1.0) != 1.0:
                    return use, f"Gemm {use.node.name!r} with a non-constant bias and beta != 1 is not supported"
        return None

    def _quantize(self, graph: ir.Graph, uses: list[analysis.WeightUse], names: _NameAllocator) -> None:
        first = uses[0]
        weight = np.asarray(analysis.weight_value_array(first), dtype=np.float32)
        if first.node.op_type == "Gemm":
            weight = _gemm_weight(first.node, weight)
        if not np.isfinite(weight).all():
            raise ValueError(
                f"weight {first.weight.name!r} of {first.layer!r} contains NaN or Inf; fix the model before quantizing"
            )
        if weight.size == 0:
            raise ValueError(f"weight {first.weight.name!r} of {first.layer!r} is empty")
        scheme = self.scheme
        if first.kind == "embedding":
            scheme = QuantScheme(scheme.bits, scheme.group_size, "ic", scheme.symmetric, scheme.method)
        quantized = quantize_rtn(weight, scheme)
        float_dtype = first.weight.dtype
        qdq = builders.dequantize_linear(names.allocate(first.layer, first.weight.name), quantized, float_dtype)
        for initializer in qdq.initializers:
            graph.register_initializer(initializer)
        graph.insert_before(min((use.node for use in uses), key=_position(graph)), qdq.node)
        layouts = {_weight_layout(use.node) for use in uses}
        if len(layouts) > 1:
            return f"shared by nodes that read it in different layouts {sorted(layouts)}"
        for use in uses:
            if use.node.op_type == "Gemm":
                _replace_gemm(graph, use.node, qdq.output)
            else:
                use.node.replace_input_with(use.input_index, qdq.output)
        if first.weight.is_initializer() and not first.weight.uses() and not first.weight.is_graph_output():
            graph.initializers.pop(first.weight.name)
        self.weight_records.append(
            WeightRecord(
                name=first.weight.name or "",
                layer=first.layer,
                kind=first.kind,
                shape=list(weight.shape),
                bits=scheme.bits,
                axis=scheme.axis,
                group_size=quantized.block_size,
                symmetric=scheme.symmetric,
                method=scheme.method,
                bytes_before=int(weight.size * float_dtype.itemsize),
                bytes_after=qdq.nbytes,
                relative_error=relative_error(weight, quantized.dequantize()),
            )
        )


class _NameAllocator:
    """Readable, unique base names for new initializers (module path, else the weight's name)."""

    def __init__(self, graph: ir.Graph):
        self.taken = {value.name for value in graph.initializers.values()}
        self.taken |= {output.name for node in graph for output in node.outputs}
        self.taken |= {value.name for value in graph.inputs}

    def allocate(self, layer: str, weight_name: str | None) -> str:
        base = re.sub(r"[^A-Za-z0-9_.]", "_", layer or weight_name or "weight")
        candidate, suffix = base, 1
        while any(f"{candidate}{tail}" in self.taken for tail in (".qweight", ".scales", ".zero_points", ".dequantized")):
            suffix += 1
            candidate = f"{base}_{suffix}"
        self.taken |= {f"{candidate}{tail}" for tail in (".qweight", ".scales", ".zero_points", ".dequantized")}
        return candidate


def _position(graph: ir.Graph):
    order = {id(node): index for index, node in enumerate(graph)}
    return lambda node: order[id(node)]


def _weight_layout(node: ir.Node) -> tuple:
    """How a node reads its weight: op, transB and alpha (a shared weight must be read one way)."""
    if node.op_type != "Gemm":
        return (node.op_type, 0, 1.0)
    return ("Gemm", node.attributes.get_int("transB", 0), node.attributes.get_float("alpha", 1.0))


def _gemm_weight(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """Gemm's B as the [K, N] operand of an equivalent MatMul, with alpha folded in."""
    if node.attributes.get_int("transB", 0):
        weight = weight.T
    return weight * np.float32(node.attributes.get_float("alpha", 1.0))


def _replace_gemm(graph: ir.Graph, gemm: ir.Node, weight: ir.Value) -> None:
    """Gemm(A, B, C) -> MatMul(A, DQ(B')) [+ Add(beta * C)], keeping the output's name."""
    activation = gemm.inputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    matmul = ir.node("MatMul", [activation, weight], name=f"{gemm.name}.MatMul")
    new_nodes = [matmul]
    result = matmul.outputs[0]
    if bias is not None:
        beta = gemm.attributes.get_float("beta", 1.0)
        if beta != 1.0:
            scaled = ir.tensor(bias.const_value.numpy() * np.asarray(beta, dtype=bias.dtype.numpy()))
            bias = ir.Value(name=f"{gemm.name}.bias", shape=bias.shape, type=bias.type, const_value=scaled)
            graph.register_initializer(bias)
        add = ir.node("Add", [result, bias], name=f"{gemm.name}.Add")
        new_nodes.append(add)
        result = add.outputs[0]
    old_output = gemm.outputs[0]
    result.type, result.shape = old_output.type, old_output.shape
    graph.insert_before(gemm, new_nodes)
    ir.convenience.replace_all_uses_with(old_output, result, replace_graph_outputs=True)
    output_name = old_output.name
    graph.remove(gemm, safe=True)
    result.name = output_name


def _require_storage_support(model: ir.Model, bits: int) -> None:
    """Raise the default-domain opset and IR version to what the quantized storage types need."""
    target = builders.required_opset(bits)
    current = model.opset_imports.get("", None)
    if current is None or current < target:
        try:
            onnxscript.version_converter.convert_version(model, target)
        except Exception as error:  # the converter raises many types; name the cause
            raise RuntimeError(f"could not convert the model from opset {current} to {target}: {error}") from error
        model.opset_imports[""] = max(model.opset_imports.get("", target), target)
    model.ir_version = max(model.ir_version or 0, builders.required_ir_version(bits))
