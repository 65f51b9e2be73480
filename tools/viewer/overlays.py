"""Quantization overlays and the per-layer table.

The graph says how each weight is stored: a ``DequantizeLinear`` reading constant integer codes gives
bits (from the codes' type), group size (``block_size``), group axis (``axis=0``: per-OC groups,
``axis=1``: per-IC groups, on the ``[K, N]`` weight) and bytes. The OptimizeReport, when given, adds
what the graph cannot say: the relative weight and output errors, 3 bits stored in 4, the bytes before,
the method, and AdaDim's choice (the record's axis, when the recipe's axis is "adadim" or the record
has per-axis errors). Report records are matched to DequantizeLinear nodes by layer: the module path
of the node that reads the dequantized weight.
"""

from __future__ import annotations

import collections
import json
import os

import onnx_ir as ir

from lowbit.ir import analysis
from lowbit.tools.viewer.graph_data import GraphIndex

#: WeightRecord fields the page shows when a report has them.
REPORT_FIELDS = ("relative_error", "output_error", "axis_errors", "width_options", "bytes_before", "method", "kind")
#: Overlay fields copied into a quantized layer's table row.
_ROW_FIELDS = (
    "bits",
    "group_size",
    "axis",
    "symmetric",
    "method",
    "relative_error",
    "output_error",
    "adadim_choice",
    "axis_errors",
    "width_options",
)
_DEFAULT_DOMAINS = ("", "ai.onnx")


def read_report(path: str | os.PathLike) -> dict:
    """An OptimizeReport JSON file as a dict (unknown fields kept, for reports of newer versions)."""
    try:
        with open(path, encoding="utf-8") as file:
            report = json.load(file, parse_constant=lambda _: None)  # NaN and Infinity: unknown
    except FileNotFoundError:
        raise FileNotFoundError(f"no report file at {str(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"report {str(path)!r} is not JSON: {error}") from error
    if not isinstance(report, dict) or not isinstance(report.get("weights", []), list):
        raise ValueError(f"report {str(path)!r} is not an OptimizeReport (expected an object with a 'weights' list)")
    return report


def quantized_weights(index: GraphIndex) -> list[dict]:
    """One overlay per DequantizeLinear of constant integer codes, in graph order.

    Each overlay is JSON-ready; its private keys ``_dq`` and ``_consumers`` are entry indices.
    """
    entry_of = {id(entry.node): number for number, entry in enumerate(index.entries) if entry.node is not None}
    overlays = []
    for number, entry in enumerate(index.entries):
        node = entry.node
        if node is None or node.op_type != "DequantizeLinear" or node.domain not in _DEFAULT_DOMAINS:
            continue
        codes = node.inputs[0]
        if codes is None or codes.const_value is None or not codes.dtype.is_integer():
            continue
        consumers = [entry_of[id(use.node)] for use in node.outputs[0].uses() if id(use.node) in entry_of]
        layer_node = index.entries[consumers[0]].node if consumers else node
        axis, group_size = _grouping(node, codes.const_value.shape)
        overlays.append(
            {
                "layer": analysis.module_path(layer_node),
                "weight": codes.name or "",
                "shape": list(codes.const_value.shape),
                "bits": codes.dtype.bitwidth,
                "group_size": group_size,
                "axis": axis,
                "symmetric": len(node.inputs) < 3 or node.inputs[2] is None,
                "bytes": sum(v.const_value.nbytes for v in node.inputs if v is not None and v.const_value is not None),
                "_dq": number,
                "_consumers": consumers,
            }
        )
    return overlays


def _grouping(node: ir.Node, shape: ir.Shape) -> tuple[str, int]:
    """(group axis, group size) of a DequantizeLinear; ``oc``/``ic`` name the axes of a ``[K, N]`` weight."""
    scales = node.inputs[1]  # required by DequantizeLinear
    scale_shape = scales.const_value.shape if scales.const_value is not None else scales.shape
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    if scale_shape is None or all(d == 1 for d in scale_shape):  # one scale for the whole tensor
        return "tensor", -1
    if len(shape) != 2:
        return f"axis {axis}", block or -1
    axis %= 2
    if block > 0:  # blocked: groups of `block` consecutive elements along `axis`
        return ("oc" if axis == 0 else "ic"), block
    # per-axis: one scale per slice along `axis`, i.e. one group spanning the other axis
    return ("oc", shape[0]) if axis == 1 else ("ic", shape[1])


def apply_report(overlays: list[dict], index: GraphIndex, report: dict, report_label: str) -> list[str]:
    """Copy report fields into the overlays they describe; return warnings for records left over."""
    records: dict[str, collections.deque] = collections.defaultdict(collections.deque)
    for record in report.get("weights", []):
        records[record.get("layer", "")].append(record)
    adadim = report.get("recipe", {}).get("axis") == "adadim"
    for overlay in overlays:
        layers = [analysis.module_path(index.entries[c].node) for c in overlay["_consumers"]] or [overlay["layer"]]
        layer = next((name for name in layers if records.get(name)), None)
        if layer is None:
            continue
        record = records[layer].popleft()
        overlay["source_weight"] = record.get("name", "")
        overlay["bits"] = record.get("bits", overlay["bits"])  # 3-bit codes are stored in 4-bit types
        overlay.update({field: record[field] for field in REPORT_FIELDS if record.get(field) is not None})
        if adadim or record.get("axis_errors"):  # AdaDim chose this weight's axis
            overlay["adadim_choice"] = record.get("axis")
    return [
        f"{report_label}: weight {record.get('name')!r} of layer {layer!r} has no DequantizeLinear in {index.label}"
        for layer, left in records.items()
        for record in left
    ]


def layer_rows(index: GraphIndex, overlays: list[dict], report: dict | None, baseline: GraphIndex | None) -> list[dict]:
    """One row per weight layer, in graph order: quantized weights, then those left in float (and why)."""
    rows = []
    for overlay in overlays:
        node = overlay["_consumers"][0] if overlay["_consumers"] else overlay["_dq"]
        row = {
            "node": node,
            "layer": overlay["layer"],
            "weight": overlay.get("source_weight", overlay["weight"]),
            "kind": overlay.get("kind", index.entries[node].op),
            "shape": overlay["shape"],
            "status": "quantized",
            "bytes_after": overlay["bytes"],
            "bytes_before": overlay.get("bytes_before") or _baseline_bytes(index, overlay, baseline),
        }
        for field in _ROW_FIELDS:
            if overlay.get(field) is not None:
                row[field] = overlay[field]
        rows.append(row)
    reasons = {(s.get("layer"), s.get("name")): s.get("reason", "") for s in (report or {}).get("skipped", [])}
    entry_of = {id(entry.node): number for number, entry in enumerate(index.entries) if entry.node is not None}
    for use in analysis.weight_uses(index.model.graph):
        table = use.weight if use.weight.const_value is not None else use.weight.producer().inputs[0]
        size = table.const_value.nbytes
        row = {
            "node": entry_of[id(use.node)],
            "layer": use.layer,
            "weight": use.weight.name or "",
            "kind": use.kind,
            "shape": list(table.const_value.shape),
            "status": "float",
            "bytes_before": size,
            "bytes_after": size,
        }
        if (use.layer, use.weight.name) in reasons:
            row["reason"] = reasons[(use.layer, use.weight.name)]
        rows.append(row)
    return sorted(rows, key=lambda row: row["node"])


def _baseline_bytes(index: GraphIndex, overlay: dict, baseline: GraphIndex | None) -> int | None:
    """Bytes of the float weight the same node read in the baseline model, if it read a constant there."""
    if baseline is None or not overlay["_consumers"]:
        return None
    consumer = index.entries[overlay["_consumers"][0]]
    dequantized = index.entries[overlay["_dq"]].outputs[0]
    position = next(i for i, value in enumerate(consumer.inputs) if value is dequantized)
    if consumer.key not in baseline.number_by_key:
        return None
    before = baseline.entries[baseline.number_by_key[consumer.key]]
    if position >= len(before.inputs) or before.inputs[position] is None:
        return None
    value = before.inputs[position]
    if value.const_value is None and value.producer() is not None and value.producer().op_type == "Transpose":
        value = value.producer().inputs[0]  # a tied head reads Transpose(table)
    return value.const_value.nbytes if value is not None and value.const_value is not None else None
