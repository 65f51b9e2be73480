"""The collapsible hierarchy of a graph and the layered layout of every level of it.

Nodes are grouped by their path (module path or name prefix, one tuple of components per node). The
tree is simplified so that every box the page draws means something: a group holding one node is
replaced by the node, a group holding one group is merged into it (``model`` + ``layers`` ->
``model.layers``), long runs of a module's own nodes between its submodules (a causal-mask computation
beside the layers) become one box, and a group with too many children is cut into synthetic *parts* of
consecutive children, so the page never lays out or draws more than ``max_children`` boxes for one
expanded group.

Layout is computed here once per group, independent of what is expanded: each child of a group gets a
rank (row, top-down) and the children come sorted by (rank, position in the row). The page only turns
ranks into coordinates, which depend on the sizes of the expanded children. Cost: O(edges x depth).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

#: A group with more children than this is cut into parts of at most ``PART_SIZE`` consecutive children.
MAX_CHILDREN = 150
PART_SIZE = 100
#: In a group that also has subgroups, this many consecutive nodes of its own become one box.
OPS_RUN = 8
_BARYCENTER_SWEEPS = 2


@dataclasses.dataclass
class Group:
    """One box of the hierarchy. ``children`` are item ids: a node index, or ``num_nodes + group index``."""

    id: str  # dotted path ("" for the root); parts are "<parent id>#<level>.<first child>"
    name: str  # label of the box
    parent: int  # index of the parent group, -1 for the root
    kind: str = "module"  # module | ops (a run of a module's own nodes) | part (of a too-large group)
    children: list[int] = dataclasses.field(default_factory=list)
    ranks: list[int] = dataclasses.field(default_factory=list)  # row of each child, same order


@dataclasses.dataclass
class Hierarchy:
    groups: list[Group]  # groups[0] is the root
    node_group: list[int]  # the group each node sits in directly
    num_nodes: int

    def ancestors(self, node: int) -> list[int]:
        """Group indices from the root down to the node's own group."""
        chain = []
        group = self.node_group[node]
        while group != -1:
            chain.append(group)
            group = self.groups[group].parent
        return chain[::-1]


def build_hierarchy(
    paths: Sequence[tuple[str, ...]],
    edges: Sequence[tuple[int, int]],
    max_children: int = MAX_CHILDREN,
    part_size: int = PART_SIZE,
) -> Hierarchy:
    """Group nodes (in graph order) by ``paths`` and lay out every group; ``edges`` are node index pairs."""
    if part_size < 2 or max_children < part_size:
        raise ValueError(f"need 2 <= part_size <= max_children, got {part_size}, {max_children}")
    num_nodes = len(paths)
    groups = _simplify(_group_tree(paths, num_nodes), num_nodes)
    _gather_own_runs(groups, paths, num_nodes)
    _split_large_groups(groups, num_nodes, max_children, part_size)
    node_group = [-1] * num_nodes
    for index, group in enumerate(groups):
        for child in group.children:
            if child < num_nodes:
                node_group[child] = index
            else:
                groups[child - num_nodes].parent = index
    hierarchy = Hierarchy(groups, node_group, num_nodes)
    _layout(hierarchy, edges)
    return hierarchy


def _group_tree(paths: Sequence[tuple[str, ...]], num_nodes: int) -> list[Group]:
    """One group per distinct path prefix; children in order of first appearance."""
    groups = [Group(id="", name="", parent=-1)]
    index_of: dict[tuple[str, ...], int] = {(): 0}
    for node, path in enumerate(paths):
        parent = 0
        for depth in range(1, len(path) + 1):
            prefix = path[:depth]
            group = index_of.get(prefix)
            if group is None:
                group = index_of[prefix] = len(groups)
                name = path[depth - 1]
                if name.isdigit() and depth > 1:  # "layers.3", not a bare "3"
                    name = f"{path[depth - 2]}.{name}"
                groups.append(Group(id=".".join(prefix), name=name, parent=parent))
                groups[parent].children.append(num_nodes + group)
            parent = group
        groups[parent].children.append(node)
    return groups


def _simplify(groups: list[Group], num_nodes: int) -> list[Group]:
    """Replace one-node groups by their node, merge one-group groups into their child; reindex."""

    def simplify(index: int) -> int:
        group = groups[index]
        group.children = [simplify(c - num_nodes) if c >= num_nodes else c for c in group.children]
        if index == 0 or len(group.children) != 1:
            return num_nodes + index
        only = group.children[0]
        if only >= num_nodes:
            child = groups[only - num_nodes]
            if not child.name.startswith(f"{group.name}."):  # "layers" + "layers.0" stays "layers.0"
                child.name = f"{group.name}.{child.name}"
        return only

    simplify(0)
    kept, order = [], {}
    stack = [0]
    while stack:  # depth-first from the root: every group still referenced
        index = stack.pop()
        order[index] = len(kept)
        kept.append(groups[index])
        stack.extend(c - num_nodes for c in reversed(groups[index].children) if c >= num_nodes)
    for group in kept:
        group.children = [num_nodes + order[c - num_nodes] if c >= num_nodes else c for c in group.children]
    return kept


def _gather_own_runs(groups: list[Group], paths: Sequence[tuple[str, ...]], num_nodes: int) -> None:
    """In groups with subgroups, put each run of ``OPS_RUN`` or more consecutive own nodes in a box."""
    for index in range(len(groups)):  # the boxes appended below hold nodes only: no visit needed
        group = groups[index]
        if not any(child >= num_nodes for child in group.children):
            continue
        own = [child < num_nodes and ".".join(paths[child]) == group.id for child in group.children]
        children, start = [], 0
        for position in range(len(group.children) + 1):
            if position < len(group.children) and own[position]:
                continue
            run = group.children[start:position]
            if len(run) >= OPS_RUN:
                children.append(num_nodes + len(groups))
                label = group.name or "graph"
                groups.append(Group(f"{group.id}#ops.{start + 1}", f"{label}: {len(run)} ops", index, "ops", run))
            else:
                children += run
            if position < len(group.children):
                children.append(group.children[position])
            start = position + 1
        group.children = children


def _split_large_groups(groups: list[Group], num_nodes: int, max_children: int, part_size: int) -> None:
    """Cut every group with more than ``max_children`` children into parts (repeatedly, for huge ones).

    A part is labelled with the span of the group's original children it holds: ``layers [1-100 of 240]``.
    """
    for index in range(len(groups)):  # the parts appended below are small enough: no visit needed
        group = groups[index]
        total = len(group.children)
        spans = [(i, i) for i in range(total)]
        level = 0
        while len(group.children) > max_children:
            level += 1
            parts, part_spans = [], []
            count = -(-len(group.children) // part_size)  # as few parts as fit, of even sizes
            bounds = [round(i * len(group.children) / count) for i in range(count + 1)]
            for start, stop in zip(bounds, bounds[1:]):
                run, run_spans = group.children[start:stop], spans[start:stop]
                span = (run_spans[0][0], run_spans[-1][1])
                parts.append(num_nodes + len(groups))
                part_spans.append(span)
                name = f"{group.name or 'graph'} [{span[0] + 1}-{span[1] + 1} of {total}]"
                groups.append(Group(f"{group.id}#{level}.{span[0] + 1}", name, index, "part", run))
            group.children, spans = parts, part_spans


def _layout(hierarchy: Hierarchy, edges: Sequence[tuple[int, int]]) -> None:
    """Rank and order the children of every group from the edges between them."""
    child_edges: list[set[tuple[int, int]]] = [set() for _ in hierarchy.groups]
    chains = [hierarchy.ancestors(node) for node in range(hierarchy.num_nodes)]
    for source, target in edges:
        if source == target:
            continue
        upper, lower = chains[source], chains[target]
        common = 0
        while common < len(upper) and common < len(lower) and upper[common] == lower[common]:
            common += 1
        owner = upper[common - 1]  # the root is always shared
        a = hierarchy.num_nodes + upper[common] if common < len(upper) else source
        b = hierarchy.num_nodes + lower[common] if common < len(lower) else target
        child_edges[owner].add((a, b))
    for group, pairs in zip(hierarchy.groups, child_edges):
        group.children, group.ranks = layered_order(group.children, pairs)


def layered_order(items: list[int], pairs: set[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Top-down layering of ``items`` (given in graph order) under the edges ``pairs``.

    Edges against graph order are ignored (they close cycles between groups); ranks are longest
    paths from the sources, with sources pulled down next to their first consumer; rows are ordered
    by a few barycenter sweeps. Returns the items sorted by (rank, row position) and their ranks.
    """
    position = {item: index for index, item in enumerate(items)}
    predecessors: dict[int, list[int]] = {item: [] for item in items}
    successors: dict[int, list[int]] = {item: [] for item in items}
    for a, b in pairs:
        if position[a] < position[b]:
            predecessors[b].append(a)
            successors[a].append(b)
    rank = {}
    for item in items:
        rank[item] = max((rank[p] + 1 for p in predecessors[item]), default=0)
    for item in items:
        if not predecessors[item] and successors[item]:
            rank[item] = min(rank[s] for s in successors[item]) - 1
    rows: dict[int, list[int]] = {}
    for item in items:
        rows.setdefault(rank[item], []).append(item)
    ordered_rows = [rows[r] for r in sorted(rows)]
    x = {}

    def place(row: list[int]) -> None:
        middle = (len(row) - 1) / 2
        for index, item in enumerate(row):
            x[item] = index - middle

    for row in ordered_rows:
        place(row)
    for _ in range(_BARYCENTER_SWEEPS):
        for sweep, neighbours in ((ordered_rows[1:], predecessors), (ordered_rows[-2::-1], successors)):
            for row in sweep:
                row.sort(key=lambda item: _barycenter(item, neighbours[item], x))
                place(row)
    children = [item for row in ordered_rows for item in row]
    return children, [rank[item] for item in children]


def _barycenter(item: int, neighbours: list[int], x: dict[int, float]) -> float:
    return sum(x[n] for n in neighbours) / len(neighbours) if neighbours else x[item]
