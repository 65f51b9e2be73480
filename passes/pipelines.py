"""Declared pipelines (plain lists of passes) and the runner that times them and fills the report.

``LOWBIT_DUMP_DIR=dir`` saves the model after every pass as ``dir/NN_PassName.onnx``.
"""

from __future__ import annotations

import os
import pathlib
import resource
import sys
import time

import onnx_ir as ir

from lowbit.ir.scheme import QuantScheme
from lowbit.passes.capture_calibration import CaptureCalibrationPass
from lowbit.passes.cleanup import CleanupPass
from lowbit.passes.fold_weights import FoldWeightsPass
from lowbit.passes.fuse_qdq import FuseQDQPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.report import OptimizeReport, PassRecord

DUMP_DIR_VARIABLE = "LOWBIT_DUMP_DIR"


def portable_pipeline(
    scheme: QuantScheme,
    *,
    candidate_axes: tuple[str, ...] | None = None,
    selector: str = "block",
    calibration=None,
    include_lm_head: bool = False,
    include_embeddings: bool = False,
    fused: bool = False,
) -> list[ir.passes.PassBase]:
    """Fold weights, [calibrate,] quantize to blocked DequantizeLinear + MatMul, clean up: stock ONNX Runtime.

    ``fused=True`` adds FuseQDQPass: the quantized MatMuls become lowbit's fused ops (lowbit's op library
    needed at run time), or ONNX Runtime's MatMulNBits where that is the faster exact choice.
    """
    quantize = QuantizeWeightsPass(
        scheme,
        candidate_axes=candidate_axes,
        selector=selector,
        include_lm_head=include_lm_head,
        include_embeddings=include_embeddings,
    )
    calibrate = [CaptureCalibrationPass(calibration)] if calibration is not None else []
    fuse = [FuseQDQPass()] if fused else []
    return [FoldWeightsPass(), *calibrate, quantize, *fuse, CleanupPass()]


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_pipeline(model: ir.Model, passes: list[ir.passes.PassBase], report: OptimizeReport) -> ir.Model:
    """Run ``passes`` in order on ``model`` (in place), recording each in ``report``."""
    dump_dir = os.environ.get(DUMP_DIR_VARIABLE)
    for index, pass_ in enumerate(passes):
        start = time.perf_counter()
        result = pass_(model)
        model = result.model
        name = type(pass_).__name__
        seconds = time.perf_counter() - start
        details = dict(getattr(pass_, "details", {}))
        report.passes.append(PassRecord(name, result.modified, seconds, _peak_rss_mb(), details))
        report.weights.extend(getattr(pass_, "weight_records", []))
        report.skipped.extend(getattr(pass_, "skipped", []))
        if dump_dir:
            path = pathlib.Path(dump_dir)
            path.mkdir(parents=True, exist_ok=True)
            ir.save(model, path / f"{index:02d}_{name}.onnx")
    return model
