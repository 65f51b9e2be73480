"""The protocol of lowbit's passes: what a pass reports and what it needs before it runs.

Every pass of ``passes/`` is a ``LowbitPass`` (an in-place onnx_ir pass). What it **reports** is three
attributes, reset before each run and read by ``pipelines.run_pipeline`` into the ``OptimizeReport``:

* ``details``: a dict of the pass's own counts and lists (``PassRecord.details``);
* ``weight_records``: one ``WeightRecord`` per weight it quantized;
* ``skipped``: one ``SkippedWeight`` per weight it left in float, with why.

What it **needs** it declares: ``needs_calibration`` (the statistics of CaptureCalibrationPass, reached
with ``lowbit.runtime.calibration.calibration_of``). onnx_ir calls ``requires(model)`` before ``call``;
a missing requirement raises ``PassRequirementError`` naming the pass and what is missing. Shape
information is not a precondition: the passes that read shapes infer them where the file has none
(QuantizeWeightsPass, only when it cuts subgraphs, so that a model it leaves alone keeps its bytes) or
leave the weight whose shapes are unknown as it is, with the reason (ReorderChannelsPass).
"""

from __future__ import annotations

import onnx_ir as ir

from lowbit.passes.report import SkippedWeight, WeightRecord
from lowbit.runtime.calibration import calibration_of


class PassRequirementError(ir.passes.PreconditionError, ValueError):
    """A pass was run on a model that lacks what it needs (a ``ValueError`` too, as lowbit's other refusals)."""


class LowbitPass(ir.passes.InPlacePass):
    """An in-place pass with lowbit's report attributes and declared requirements."""

    def __init__(self) -> None:
        super().__init__()
        self.details: dict = {}
        self.weight_records: list[WeightRecord] = []
        self.skipped: list[SkippedWeight] = []

    @property
    def needs_calibration(self) -> bool:
        """Whether this pass, as configured, reads calibration statistics (default: no)."""
        return False

    def calibration_use(self) -> str:
        """What the statistics are for, in the refusal's words (override to be specific)."""
        return "it reads them"

    def requires(self, model: ir.Model) -> None:
        if self.needs_calibration and calibration_of(model) is None:
            raise PassRequirementError(
                f"{type(self).__name__} needs calibration statistics ({self.calibration_use()}): run "
                "CaptureCalibrationPass first (lowbit.optimize(..., calibration=batches) does)"
            )

    def __call__(self, model_or_result, /) -> ir.passes.PassResult:
        self.details, self.weight_records, self.skipped = {}, [], []  # each run reports only itself
        return super().__call__(model_or_result)
