"""CleanupPass: dead nodes and unused initializers out, duplicate constants merged, nodes in
topological order, the exporter's record of the export (``files.EXPORT_PROVENANCE_KEYS``: stack traces
naming the exporting machine's paths, about 2 % of a quantized SmolLM2 file) dropped from the nodes. Built
from onnx_ir's own passes; lossless."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from lowbit.ir import files
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
        provenance = files.export_provenance_bytes(model)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for key in files.EXPORT_PROVENANCE_KEYS & node.metadata_props.keys():
                del node.metadata_props[key]
        self.details = {
            "removed_nodes": nodes_before - len(model.graph),
            "removed_initializers": initializers_before - len(model.graph.initializers),
            "dropped_export_metadata_bytes": provenance,
        }
        return ir.passes.PassResult(model, modified=result.modified or respelled or provenance > 0)
