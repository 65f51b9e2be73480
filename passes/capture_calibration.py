"""CaptureCalibrationPass: run the float model on calibration batches and keep the statistics.

An analysis pass: the graph is not changed (``modified=False``). The statistics are kept with
the model (``lowbit.runtime.calibration.set_calibration``: in memory, never serialized), where the later
passes read them (``calibration_of``).
Run it after FoldWeightsPass, so that the graph it measures is the one that gets quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Set

import numpy as np
import onnx_ir as ir

from lowbit.passes.base import LowbitPass
from lowbit.runtime.calibration import CalibrationStats, collect, set_calibration, weight_activations
from lowbit.runtime.session import ORT_ERRORS


class CaptureCalibrationPass(LowbitPass):
    """Collect ``H = X^T X`` and channel magnitudes of every weight's input over ``batches``
    (or keep statistics collected beforehand)."""

    def __init__(
        self,
        batches: Iterable[Mapping[str, np.ndarray]] | CalibrationStats,
        *,
        keep_feeds: bool = False,
        activations: Callable[[ir.Graph], Set[str]] | None = None,
        diagonals: Callable[[ir.Graph], Set[str]] | None = None,
    ):
        """``keep_feeds``: keep every feed dict (the sequential mode runs them again); ``activations``: which
        activations of the graph to collect (default: every weight's input; none: the model is not run);
        ``diagonals``: more activations of which only ``diag(H)`` is collected (what the outlier ranking reads
        before a layer sweep collects the full statistics)."""
        super().__init__()
        self.batches = batches
        self.keep_feeds = keep_feeds
        self.activations = activations
        self.diagonals = diagonals

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        collected = False
        if isinstance(self.batches, CalibrationStats):
            stats = self.batches
            _check_statistics_fit(stats, weight_activations(model))
        elif not weight_activations(model):  # no weight left to calibrate (e.g. all quantized): nothing to run
            stats = CalibrationStats({}, feeds=list(self.batches) if self.keep_feeds else None)
        else:
            total = len(self.batches) if hasattr(self.batches, "__len__") else None
            only = self.activations(model.graph) if self.activations is not None else None
            diagonals = self.diagonals(model.graph) if self.diagonals is not None else frozenset()
            try:
                stats = collect(
                    model, self.batches, total=total, keep_feeds=self.keep_feeds, only=only, diagonals=diagonals
                )
                collected = True
            except ORT_ERRORS as error:  # an op it lacks, feeds of the wrong names or shapes
                raise ValueError(f"calibration: ONNX Runtime cannot run the model on the batches: {error}") from error
        set_calibration(model, stats)
        tokens = {accumulator.tokens for accumulator in stats.by_activation.values()}
        self.details = {
            "batches": stats.batches,
            "activations": sum(not accumulator.diagonal_only for accumulator in stats.by_activation.values()),
            "diagonals_only": sum(accumulator.diagonal_only for accumulator in stats.by_activation.values()),
            "tokens": max(tokens, default=0),
        }
        if stats.feeds is not None:
            self.details["feeds_kept"] = len(stats.feeds)
        if collected:  # where this pass ran the model: how long it ran and how long the statistics took
            self.details.update({f"seconds_{part}": seconds for part, seconds in stats.seconds.items()})
        return ir.passes.PassResult(model, modified=False)


def _check_statistics_fit(stats: CalibrationStats, activations: dict[str, int]) -> None:
    """Statistics collected on another model (other widths) must be refused here, by name, not fail later
    inside NumPy."""
    for name, channels in activations.items():
        accumulator = stats.by_activation.get(name)
        if accumulator is not None and accumulator.channels != channels:
            raise ValueError(
                f"the calibration statistics do not fit this model: activation {name!r} has {channels} channels here "
                f"and {accumulator.channels} in the statistics (collected on another model?)"
            )
