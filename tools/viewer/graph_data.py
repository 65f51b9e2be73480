"""One model as the page sees it: nodes (with graph input/output markers), values, initializer
statistics, edges and the collapsible hierarchy.

``GraphIndex`` keeps references to the onnx_ir objects for the overlay and diff steps; ``payload``
turns it into the JSON-ready dict the page reads (value rows are lists, see ``VALUE_COLUMNS``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import onnx_ir as ir

from lowbit.ir.analysis import module_path
from lowbit.tools.viewer.hierarchy import Hierarchy, build_hierarchy
from lowbit.tools.viewer.stats import tensor_stats

#: Columns of a row of ``payload()["values"]``.
VALUE_COLUMNS = ("name", "dtype", "shape", "producer", "initializer")
INPUT_OP, OUTPUT_OP = "Input", "Output"
_TEXT_LIMIT = 120
_SMALL_TENSOR = 8  # tensor attributes up to this many elements are shown in full
_TOP_OPS = 4


@dataclasses.dataclass
class NodeEntry:
    """A node of the graph, or a marker for a graph input (op ``Input``) or output (op ``Output``)."""

    name: str
    op: str
    domain: str
    path: str  # module path (torch.onnx metadata), else the name's prefix; "" at the top
    inputs: list[ir.Value | None]
    outputs: list[ir.Value]
    node: ir.Node | None  # None for markers

    @property
    def key(self) -> str:
        """Identity across two versions of a model: kind and name."""
        kind = "node" if self.node is not None else self.op.lower()
        return f"{kind}:{self.name}"


@dataclasses.dataclass
class GraphIndex:
    model: ir.Model
    label: str  # how the page names this model (its file name)
    entries: list[NodeEntry]
    producer: dict[int, int]  # id(value) -> index of the entry that produces it
    edges: list[tuple[int, int]]
    hierarchy: Hierarchy

    @functools.cached_property
    def number_by_key(self) -> dict[str, int]:
        """Entry index by ``NodeEntry.key``."""
        return {entry.key: number for number, entry in enumerate(self.entries)}


def node_path(node: ir.Node) -> str:
    """The module path from torch.onnx metadata; for nodes without it, the name minus its last part.

    ``/model/layers.0/attn/MatMul`` and ``model.layers.0.attn.MatMul`` both give ``model.layers.0.attn``.
    """
    path = module_path(node)
    if path != (node.name or "<unnamed>"):
        return path
    parts = [part for part in re.split(r"[/.]", node.name or "") if part]
    return ".".join(parts[:-1])


def index_graph(model: ir.Model, label: str) -> GraphIndex:
    """Index the main graph of ``model`` in graph order, with input markers first and output markers last."""
    graph = model.graph
    inputs = [value for value in graph.inputs if not value.is_initializer()]  # IR < 4 lists weights as inputs
    entries = [NodeEntry(value.name or "", INPUT_OP, "", "", [], [value], None) for value in inputs]
    for node in graph:
        path = node_path(node)
        entries.append(
            NodeEntry(node.name or "", node.op_type, node.domain, path, list(node.inputs), list(node.outputs), node)
        )
    entries += [NodeEntry(value.name or "", OUTPUT_OP, "", "", [value], [], None) for value in graph.outputs]
    producer = {id(value): index for index, entry in enumerate(entries) for value in entry.outputs}
    edges = [
        (producer[id(value)], index)
        for index, entry in enumerate(entries)
        for value in entry.inputs
        if value is not None and id(value) in producer
    ]
    paths = [tuple(entry.path.split(".")) if entry.path else () for entry in entries]
    return GraphIndex(model, label, entries, producer, edges, build_hierarchy(paths, edges))


def payload(index: GraphIndex, node_extras: list[dict], quant: list[dict]) -> dict:
    """The page's data for one model.

    ``node_extras[i]`` (diff status, index of a quantized weight in ``quant``) is merged into node i.
    A node's ``path`` is left out where it equals its group's id.
    """
    values: list[list] = []
    value_ids: dict[int, int] = {}
    initializers = index.model.graph.initializers
    initializer_ids = {id(value): number for number, value in enumerate(initializers.values())}

    def value_id(value: ir.Value | None) -> int:
        if value is None:
            return -1
        if id(value) not in value_ids:
            value_ids[id(value)] = len(values)
            values.append(
                [
                    value.name or "",
                    value.dtype.name if value.dtype is not None else "?",
                    shape_text(value.shape),
                    index.producer.get(id(value), -1),
                    initializer_ids.get(id(value), -1),
                ]
            )
        return value_ids[id(value)]

    nodes = []
    for number, (entry, extra) in enumerate(zip(index.entries, node_extras)):
        group = index.hierarchy.node_group[number]
        record = {"name": entry.name, "op": entry.op, "group": group}
        if entry.path != index.hierarchy.groups[group].id:
            record["path"] = entry.path
        record["inputs"] = [value_id(value) for value in entry.inputs]
        record["outputs"] = [value_id(value) for value in entry.outputs]
        if entry.domain:
            record["domain"] = entry.domain
        if entry.node is not None and entry.node.attributes:
            record["attributes"] = [[name, attribute_text(attr)] for name, attr in entry.node.attributes.items()]
        record.update(extra)
        nodes.append(record)
    return {
        "label": index.label,
        "opset": {domain or "ai.onnx": version for domain, version in index.model.opset_imports.items()},
        "irVersion": index.model.ir_version,
        "producer": " ".join(filter(None, [index.model.producer_name, index.model.producer_version])),
        "nodes": nodes,
        "valueColumns": list(VALUE_COLUMNS),
        "values": values,
        "initializers": [
            {
                "name": value.name,
                "dtype": value.dtype.name if value.dtype is not None else "?",
                "shape": shape_text(value.shape),
                "bytes": value.const_value.nbytes if value.const_value is not None else 0,
                "stats": tensor_stats(value.const_value) if value.const_value is not None else None,
            }
            for value in initializers.values()
        ],
        "quant": quant,
        "groups": _group_payload(index, nodes, quant),
    }


def _group_payload(index: GraphIndex, nodes: list[dict], quant: list[dict]) -> list[dict]:
    """Groups with what a collapsed box shows: node count, main ops, quantization and diff summaries."""
    hierarchy = index.hierarchy
    num_nodes = hierarchy.num_nodes
    result = [
        {"id": g.id, "name": g.name, "kind": g.kind, "parent": g.parent, "children": g.children, "ranks": g.ranks}
        for g in hierarchy.groups
    ]
    ops: list[collections.Counter] = [collections.Counter() for _ in hierarchy.groups]
    statuses: list[collections.Counter] = [collections.Counter() for _ in hierarchy.groups]
    weights: list[list[dict]] = [[] for _ in hierarchy.groups]

    def visit(group: int) -> None:  # post-order: children first
        for child in hierarchy.groups[group].children:
            if child >= num_nodes:
                visit(child - num_nodes)
                ops[group] += ops[child - num_nodes]
                statuses[group] += statuses[child - num_nodes]
                weights[group] += weights[child - num_nodes]
            else:
                node = nodes[child]
                ops[group][node["op"]] += 1
                if "diff" in node:
                    statuses[group][node["diff"]] += 1
                if "quant" in node and node["op"] == "DequantizeLinear":
                    weights[group].append(quant[node["quant"]])
        record = result[group]
        record["nodes"] = sum(ops[group].values())
        record["ops"] = [[op, count] for op, count in ops[group].most_common(_TOP_OPS)]
        if statuses[group]:
            record["diff"] = dict(statuses[group])
        if weights[group]:
            record["quant"] = _quant_summary(weights[group])

    visit(0)
    return result


def _quant_summary(weights: list[dict]) -> dict:
    errors = [w["relative_error"] for w in weights if w.get("relative_error") is not None]
    summary = {
        "count": len(weights),
        "bits": sorted({w["bits"] for w in weights}),
        "axes": sorted({w["axis"] for w in weights}),
        "bytes": sum(w["bytes"] for w in weights),
    }
    if errors:
        summary["maxError"] = float(f"{max(errors):.6g}")
        summary["meanError"] = float(f"{sum(errors) / len(errors):.6g}")
    return summary


def shape_text(shape: ir.Shape | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


def attribute_text(attr: ir.Attr) -> str:
    """A short, readable summary of an attribute value (tensors and graphs by type and size)."""
    kind, value = attr.type, attr.value
    if kind == ir.AttributeType.TENSOR:
        text = f"tensor {value.dtype.name} {shape_text(value.shape)}"
        if value.size <= _SMALL_TENSOR:
            text += f" = {value.numpy().reshape(-1).tolist()}"
    elif kind == ir.AttributeType.GRAPH:
        text = f"graph {value.name or ''} ({len(value)} nodes)"
    elif kind in (ir.AttributeType.GRAPHS, ir.AttributeType.TENSORS, ir.AttributeType.SPARSE_TENSORS):
        text = f"{len(value)} {kind.name.lower()}"
    elif isinstance(value, (tuple, list)):
        text = "[" + ", ".join(map(str, value)) + "]"
    else:
        text = str(value)
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1] + "…"
