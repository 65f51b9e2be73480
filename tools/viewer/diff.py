"""What changed between two versions of a model, keyed by node names and module paths.

Nodes are matched by name (graph inputs and outputs by their value's name). A matched pair whose op,
attributes or inputs differ is *rewritten* (a MatMul whose weight now comes from a DequantizeLinear);
the rest are *added* (only in ``after``) or *removed* (only in ``before``). Unmatched nodes of the same
op in the same module path are then paired in order as rewritten, with the old name in the note, so a
pass that renames nodes does not read as remove + add.
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from lowbit.tools.viewer.graph_data import GraphIndex, NodeEntry, attribute_text, shape_text

ADDED, REMOVED, REWRITTEN = "added", "removed", "rewritten"


@dataclasses.dataclass
class GraphDiff:
    before: list[dict]  # per entry of ``before``: {"diff": status, "diffNote": ...} or {}
    after: list[dict]
    summary: dict  # counts per status and op, and initializer changes


def diff_graphs(before: GraphIndex, after: GraphIndex) -> GraphDiff:
    """Mark every node of both graphs added, removed, rewritten or (no mark) unchanged."""
    marks_before: list[dict] = [{} for _ in before.entries]
    marks_after: list[dict] = [{} for _ in after.entries]
    matched_before = set()
    unmatched_after = []
    for number, entry in enumerate(after.entries):
        old_number = before.number_by_key.get(entry.key)
        if old_number is None:
            unmatched_after.append(number)
            continue
        matched_before.add(old_number)
        _mark_pair(marks_before, old_number, marks_after, number, _changes(before.entries[old_number], entry))
    leftovers = collections.defaultdict(collections.deque)
    for number, entry in enumerate(before.entries):
        if number not in matched_before:
            leftovers[(entry.path, entry.domain, entry.op)].append(number)
    for number in unmatched_after:
        entry = after.entries[number]
        candidates = leftovers.get((entry.path, entry.domain, entry.op))
        if candidates:
            old_number = candidates.popleft()
            old = before.entries[old_number]
            changes = [f"renamed from {old.name!r}"] + _changes(old, entry)
            _mark_pair(marks_before, old_number, marks_after, number, changes)
        else:
            marks_after[number] = {"diff": ADDED}
    for numbers in leftovers.values():
        for number in numbers:
            marks_before[number] = {"diff": REMOVED}
    return GraphDiff(marks_before, marks_after, _summary(before, after, marks_before, marks_after))


def _mark_pair(marks_before: list[dict], old: int, marks_after: list[dict], new: int, changes: list[str]) -> None:
    if changes:
        mark = {"diff": REWRITTEN, "diffNote": "; ".join(changes)}
        marks_before[old] = marks_after[new] = mark


def _changes(old: NodeEntry, new: NodeEntry) -> list[str]:
    """What differs between two versions of a node: op, attributes, inputs, outputs."""
    changes = []
    if (old.domain, old.op) != (new.domain, new.op):
        changes.append(f"op {old.op} -> {new.op}")
    old_attributes = _attributes(old)
    new_attributes = _attributes(new)
    for name in sorted(old_attributes.keys() | new_attributes.keys()):
        if old_attributes.get(name) != new_attributes.get(name):
            changes.append(f"attribute {name}: {old_attributes.get(name, '-')} -> {new_attributes.get(name, '-')}")
    for kind, old_values, new_values in (("input", old.inputs, new.inputs), ("output", old.outputs, new.outputs)):
        for position in range(max(len(old_values), len(new_values))):
            a = old_values[position] if position < len(old_values) else None
            b = new_values[position] if position < len(new_values) else None
            if _value_name(a) != _value_name(b):
                changes.append(f"{kind} {position}: {_describe(a)} -> {_describe(b)}")
    return changes


def _attributes(entry: NodeEntry) -> dict[str, str]:
    return {name: attribute_text(attr) for name, attr in entry.node.attributes.items()} if entry.node else {}


def _value_name(value: ir.Value | None) -> str | None:
    return None if value is None else value.name


def _describe(value: ir.Value | None) -> str:
    if value is None:
        return "-"
    dtype = value.dtype.name if value.dtype is not None else "?"
    if value.is_initializer():
        origin = "initializer"
    elif value.producer() is not None:
        origin = f"from {value.producer().op_type}"
    else:
        origin = "graph input"
    return f"{value.name!r} ({origin}, {dtype} {shape_text(value.shape)})"


def _summary(before: GraphIndex, after: GraphIndex, marks_before: list[dict], marks_after: list[dict]) -> dict:
    """Counts per status and op, and initializers added and removed (by name) with their bytes."""
    counts: dict[str, collections.Counter] = {status: collections.Counter() for status in (ADDED, REMOVED, REWRITTEN)}
    for entry, mark in zip(after.entries, marks_after):
        if mark.get("diff") in (ADDED, REWRITTEN):
            counts[mark["diff"]][entry.op] += 1
    for entry, mark in zip(before.entries, marks_before):
        if mark.get("diff") == REMOVED:
            counts[REMOVED][entry.op] += 1
    old_initializers = before.model.graph.initializers
    new_initializers = after.model.graph.initializers
    added = [v for name, v in new_initializers.items() if name not in old_initializers]
    removed = [v for name, v in old_initializers.items() if name not in new_initializers]
    return {
        "nodes": {status: dict(counter.most_common()) for status, counter in counts.items()},
        "initializers": {
            "added": len(added),
            "addedBytes": sum(v.const_value.nbytes for v in added if v.const_value is not None),
            "removed": len(removed),
            "removedBytes": sum(v.const_value.nbytes for v in removed if v.const_value is not None),
        },
        "bytes": {"before": _tensor_bytes(before), "after": _tensor_bytes(after)},
    }


def _tensor_bytes(index: GraphIndex) -> int:
    return sum(v.const_value.nbytes for v in index.model.graph.initializers.values() if v.const_value is not None)
