"""CaptureCalibrationPass: run the float model on calibration batches and keep the statistics.

An analysis pass: the graph is not changed (``modified=False``). The statistics go to
``model.meta[CALIBRATION_KEY]`` (in memory, never serialized), where QuantizeWeightsPass reads them.
Run it after FoldWeightsPass, so that the graph it measures is the one that gets quantized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from lowbit.runtime.calibration import CalibrationStats, collect

CALIBRATION_KEY = "lowbit.calibration"


class CaptureCalibrationPass(ir.passes.InPlacePass):
    """Collect ``H = X^T X`` and channel magnitudes of every weight's input over ``batches``
    (or keep statistics collected beforehand)."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]] | CalibrationStats):
        super().__init__()
        self.batches = batches
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if isinstance(self.batches, CalibrationStats):
            stats = self.batches
        else:
            total = len(self.batches) if hasattr(self.batches, "__len__") else None
            stats = collect(model, self.batches, total=total)
        model.meta[CALIBRATION_KEY] = stats
        tokens = {accumulator.tokens for accumulator in stats.by_activation.values()}
        self.details = {"batches": stats.batches, "activations": len(stats.by_activation), "tokens": max(tokens)}
        return ir.passes.PassResult(model, modified=False)
