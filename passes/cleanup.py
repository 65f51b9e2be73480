"""CleanupPass: dead nodes and unused initializers out, duplicate constants merged, nodes in
topological order. Built from onnx_ir's own passes; lossless."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from lowbit.ir.analysis import normalize_default_domain
from lowbit.passes.base import LowbitPass


class CleanupPass(LowbitPass):
    """Remove unused nodes/initializers/opsets, deduplicate equal initializers, sort topologically."""

    def __init__(self) -> None:
        super().__init__()
        self._steps = ir.passes.Sequential(
            common.RemoveUnusedNodesPass(),
            common.DeduplicateHashedInitializersPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before, initializers_before = len(model.graph), len(model.graph.initializers)
        # onnx_ir drops an "ai.onnx" opset import as unused when the nodes say "": spell it "" first.
        respelled = normalize_default_domain(model)
        result = self._steps(model)
        self.details = {
            "removed_nodes": nodes_before - len(model.graph),
            "removed_initializers": initializers_before - len(model.graph.initializers),
        }
        return ir.passes.PassResult(model, modified=result.modified or respelled)
