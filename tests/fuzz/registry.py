"""The passes the fuzzer runs and the recipes it tries: a new pass joins ``PASSES`` with one line.

An entry says how to make the pass for one graph (``Context``: a seeded generator and calibration
feeds) and what it must keep: ``lossless`` passes keep ONNX Runtime's outputs (fp32 round-off),
``analysis`` passes change nothing, ``quantize`` passes keep the graph valid and, with
``rtn_reference``, write exactly the NumPy RTN reference's weights, within half a step of the float ones.
``needs_calibration``: a CaptureCalibrationPass runs right before it (statistics of the graph it quantizes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

import lowbit
from lowbit.passes.axis_selectors import SELECTORS
from lowbit.passes.capture_calibration import CaptureCalibrationPass
from lowbit.passes.cleanup import CleanupPass
from lowbit.passes.fold_norm_scales import FoldNormScalesPass
from lowbit.passes.fold_weights import FoldWeightsPass
from lowbit.passes.fuse_qdq import FuseQDQPass
from lowbit.passes.quant.outliers import CRITERIA as OUTLIER_CRITERIA
from lowbit.passes.quant.scheme import GROUP_AXES, SUPPORTED_BITS, QuantScheme
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.reorder_channels import ReorderChannelsPass
from lowbit.passes.rotate_residual import RotateResidualPass
from lowbit.passes.split_outliers import SplitOutliersPass

LOSSLESS, ANALYSIS, QUANTIZE = "lossless", "analysis", "quantize"
GROUP_SIZES = (-1, 1, 4, 7, 8, 16, 32)


@dataclasses.dataclass
class Context:
    rng: np.random.Generator
    batches: list[dict[str, np.ndarray]]  # calibration feeds for the graph

    def flag(self, probability: float = 0.5) -> bool:
        return bool(self.rng.random() < probability)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def scheme(self, method: str = "rtn") -> QuantScheme:
        return QuantScheme(
            self.pick(SUPPORTED_BITS), self.pick(GROUP_SIZES), self.pick(GROUP_AXES), self.flag(), method
        )

    def quantize(self, method: str = "rtn", adadim: bool = False) -> QuantizeWeightsPass:
        return QuantizeWeightsPass(
            self.scheme(method),
            candidate_axes=GROUP_AXES if adadim else None,
            selector=self.pick(SELECTORS),
            include_lm_head=self.flag(),
            include_embeddings=self.flag(),
        )


@dataclasses.dataclass(frozen=True)
class Entry:
    make: Callable[[Context], ir.passes.PassBase]
    kind: str  # LOSSLESS | ANALYSIS | QUANTIZE
    needs_calibration: bool = False
    rtn_reference: bool = False


PASSES: dict[str, Entry] = {
    "fold_weights": Entry(lambda context: FoldWeightsPass(), LOSSLESS),
    "capture_calibration": Entry(lambda context: CaptureCalibrationPass(context.batches), ANALYSIS),
    "fold_norm_scales": Entry(lambda context: FoldNormScalesPass(), LOSSLESS),
    "rotate_residual": Entry(lambda context: RotateResidualPass(int(context.rng.integers(2**31))), LOSSLESS),
    "reorder_channels": Entry(lambda context: ReorderChannelsPass(context.pick(("absmax", "hessian"))), LOSSLESS, True),
    "split_outliers": Entry(
        lambda context: SplitOutliersPass(
            outlier_fraction=context.pick((0.0, 0.001, 0.05, 0.3)),
            criterion=context.pick(OUTLIER_CRITERIA),
            split=context.flag(),
            scheme=context.scheme(),
            include_lm_head=context.flag(),
        ),
        LOSSLESS,
        True,
    ),
    "quantize_rtn": Entry(lambda context: context.quantize("rtn"), QUANTIZE, rtn_reference=True),
    "quantize_rtn_adadim": Entry(
        lambda context: context.quantize("rtn", adadim=True), QUANTIZE, True, rtn_reference=True
    ),
    "quantize_gptq": Entry(lambda context: context.quantize("gptq", adadim=context.flag()), QUANTIZE, True),
    "fuse_qdq": Entry(lambda context: FuseQDQPass(), LOSSLESS),
    "cleanup": Entry(lambda context: CleanupPass(), LOSSLESS),
}


def random_recipe(context: Context) -> lowbit.Recipe:
    """A recipe for ``lowbit.optimize`` over every option the pipelines take."""
    return lowbit.Recipe(
        bits=context.pick(SUPPORTED_BITS),
        group_size=context.pick(GROUP_SIZES),
        axis=context.pick((*GROUP_AXES, "adadim")),
        method=context.pick(("rtn", "gptq")),
        symmetric=context.flag(),
        selector=context.pick(SELECTORS),
        include_lm_head=context.flag(),
        include_embeddings=context.flag(),
        fused=context.flag(),
        outlier_fraction=context.pick((0.0, 0.0, 0.01, 0.2)),
        outlier_criterion=context.pick(OUTLIER_CRITERIA),
        split=context.flag(0.2),
        fold_norms=context.flag(0.3),
        rotate=context.flag(0.3),
        reorder=context.pick((None, None, "absmax", "hessian")),
        calibration_mode=context.pick(("parallel", "parallel", "sequential")),
        choice_method=context.pick((None, None, "rtn")),
        clip_search=context.flag(),
        gptq_damping=context.pick((0.01, 0.01, 0.001, 0.1)),
    )
