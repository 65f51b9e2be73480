"""Declared pipelines (plain lists of passes) and the runner that times them and fills the report.

``LOWBIT_DUMP_DIR=dir`` saves the model after every pass as ``dir/NN_PassName.onnx``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time

import onnx_ir as ir

from lowbit.ir import files
from lowbit.kernels import clip_search
from lowbit.passes.base import LowbitPass
from lowbit.passes.capture_calibration import CaptureCalibrationPass
from lowbit.passes.cleanup import CleanupPass
from lowbit.passes.fold_norm_scales import FoldNormScalesPass
from lowbit.passes.fold_weights import FoldWeightsPass
from lowbit.passes.fuse_qdq import FuseQDQPass
from lowbit.passes.quant.allocate import parse_budget
from lowbit.passes.quantize_plan import SizeBudget
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.recipe import Recipe
from lowbit.passes.reorder_channels import ReorderChannelsPass
from lowbit.passes.report import OptimizeReport, PassRecord
from lowbit.passes.rotate_residual import RotateResidualPass
from lowbit.passes.split_outliers import SplitOutliersPass
from lowbit.runtime.calibration import CalibrationStats
from lowbit.runtime.memory import map_large_allocations, peak_rss_mb, release_free_memory

DUMP_DIR_VARIABLE = "LOWBIT_DUMP_DIR"


def portable_pipeline(recipe: Recipe, *, calibration=None) -> list[LowbitPass]:
    """Fold weights, [calibrate,] quantize to blocked DequantizeLinear + MatMul, clean up: stock ONNX Runtime.

    ``recipe.fused`` adds FuseQDQPass: the quantized MatMuls become lowbit's fused ops (lowbit's op library
    needed at run time).
    ``outlier_fraction > 0`` / ``split`` add SplitOutliersPass before quantization (dense-and-sparse
    outliers ranked by ``outlier_criterion``; layer split into three value clusters).
    ``fold_norms`` adds FoldNormScalesPass before calibration, ``rotate`` adds it and RotateResidualPass;
    ``reorder`` (a criterion of ReorderChannelsPass: ``"absmax"`` or ``"hessian"``; needs calibration) adds it
    after calibration.
    With calibration feeds (not statistics), in parallel mode, the
    decoder layers are calibrated, quantized and written one layer at a time on the float model
    (``QuantizeWeightsPass(calibrate_by_layer=True)``: the same statistics, one layer's Hessians in memory at a
    time; under a budget the layers are swept once to measure every width and once to write the chosen ones);
    the calibration pass keeps the feeds and collects only the other weights' statistics, and the diagonal of H
    (with abs-max) of the layer weights' inputs that outliers ranked by sensitivity or a channel sort read (the
    sweep then runs on the split, permuted model); the layer split sweeps the float model's layers for their
    full H itself (SplitOutliersPass), one layer's at a time.
    ``calibration_mode="sequential"``: decoder layers quantized one after another on statistics of the
    partially-quantized model (``lowbit.passes.sequential``); the calibration pass then keeps the feeds and,
    unless reordering or outliers read them, collects only the statistics the sweep does not measure
    (none by default: the float model is then not run at all).
    """
    if recipe.reorder is not None and calibration is None:
        raise ValueError(f"reorder={recipe.reorder!r} sorts channels by calibration statistics: pass calibration data")
    if (recipe.fold_norms or recipe.rotate) and isinstance(calibration, CalibrationStats):
        option = "rotate" if recipe.rotate else "fold_norms"
        raise ValueError(
            f"{option}=True changes the activations that weight MatMuls read (norm scales move into the weights, "
            "the residual stream is rotated), so statistics collected on the unchanged graph would be wrong: pass "
            "calibration feeds instead"
        )
    scheme = recipe.scheme()
    sequential = recipe.calibration_mode == "sequential"
    splits = recipe.outlier_fraction > 0 or recipe.split
    owns_statistics = calibration is not None and not isinstance(calibration, CalibrationStats)
    # The decoder layers are calibrated as they are quantized (sequentially, or layer by layer on the float model);
    # outliers are ranked, channels sorted, on diag(H) and abs-max alone, and the layer split sweeps the layers for
    # their full H itself.
    by_layer = owns_statistics
    calibrate_by_layer = by_layer and not sequential
    quantize = QuantizeWeightsPass(
        scheme,
        candidate_axes=recipe.candidate_axes,
        selector=recipe.selector,
        include_lm_head=recipe.include_lm_head,
        include_embeddings=recipe.include_embeddings,
        head_bits=recipe.head_bits,
        calibration_mode=recipe.calibration_mode,
        choice_method=recipe.choice_method,
        gptq_damp=recipe.gptq_damping,
        budget=None
        if recipe.budget is None
        else SizeBudget(parse_budget(recipe.budget), fused=recipe.fused, sensitivity=recipe.budget_sensitivity),
        owns_statistics=not isinstance(calibration, CalibrationStats),  # collected here: nobody else holds them
        calibrate_by_layer=calibrate_by_layer,
    )
    sweeps = (by_layer and sequential) or calibrate_by_layer
    activations = quantize.parallel_activations if sweeps else None
    outliers = []
    if splits:
        outliers = [
            SplitOutliersPass(
                outlier_fraction=recipe.outlier_fraction,
                criterion=recipe.outlier_criterion,
                split=recipe.split,
                scheme=scheme,
                candidate_axes=recipe.candidate_axes,
                include_lm_head=recipe.include_lm_head,
            )
        ]
    reorder_channels = [ReorderChannelsPass(recipe.reorder)] if recipe.reorder is not None else []
    rankers = [*reorder_channels, *outliers]  # they read diag(H) or abs-max of layer weights' inputs before the sweep
    calibrate = (
        [
            CaptureCalibrationPass(
                calibration,
                keep_feeds=sequential or calibrate_by_layer,
                activations=activations,
                diagonals=functools.partial(_ranked_inputs, rankers) if sweeps and rankers else None,
            )
        ]
        if calibration is not None
        else []
    )
    fuse = [FuseQDQPass(int8_activations=recipe.int8_activations)] if recipe.fused else []
    fold_norm_scales = [FoldNormScalesPass()] if recipe.fold_norms or recipe.rotate else []
    rotate_residual = [RotateResidualPass()] if recipe.rotate else []
    return [
        FoldWeightsPass(),
        *fold_norm_scales,
        *rotate_residual,
        *calibrate,
        *reorder_channels,
        *outliers,
        quantize,
        *fuse,
        CleanupPass(),
    ]


def _ranked_inputs(rankers: list[LowbitPass], graph: ir.Graph) -> set[str]:
    """The activations whose ``diag(H)`` and abs-max any of ``rankers`` reads."""
    return set().union(*(ranker.ranked_inputs(graph) for ranker in rankers))


#: The outlier setting kept on in ``outlier_pipeline``: the one that paid for its bytes and time in the
#: measurements of ``python -m lowbit.tools.dev.bench_passes`` (README, "Passes"); norm folding, reordering
#: and layer splitting did not.
OUTLIER_DEFAULTS = {"outlier_fraction": 0.005, "outlier_criterion": "sensitivity"}


def outlier_pipeline(recipe: Recipe, *, calibration) -> list[LowbitPass]:
    """``portable_pipeline`` with ``recipe``'s outlier options set to ``OUTLIER_DEFAULTS``; the sensitivity
    ranking needs calibration data."""
    if calibration is None:
        raise ValueError("outlier_pipeline ranks outliers by H_kk * w**2: pass calibration data")
    return portable_pipeline(dataclasses.replace(recipe, **OUTLIER_DEFAULTS), calibration=calibration)


def run_pipeline(model: ir.Model, passes: list[LowbitPass], report: OptimizeReport) -> ir.Model:
    """Run ``passes`` in order on ``model`` (in place), recording each in ``report`` (what every
    ``LowbitPass`` reports: ``details``, ``weight_records``, ``skipped``). Large allocations get their own
    mappings from here on (``memory.map_large_allocations``), so that what the passes' threads free is handed
    back at once; the clip search runs its compiled loops where the op library is built (``kernels.clip_search``)."""
    map_large_allocations()
    clip_search.install()
    dump_dir = os.environ.get(DUMP_DIR_VARIABLE)
    for index, pass_ in enumerate(passes):
        start = time.perf_counter()
        result = pass_(model)
        model = result.model
        name = type(pass_).__name__
        seconds = time.perf_counter() - start
        release_free_memory()  # what the pass freed (its sessions, temporaries) is not carried into the next one
        report.passes.append(PassRecord(name, result.modified, seconds, peak_rss_mb(), dict(pass_.details)))
        report.weights.extend(pass_.weight_records)
        report.skipped.extend(pass_.skipped)
        if dump_dir:
            path = pathlib.Path(dump_dir)
            path.mkdir(parents=True, exist_ok=True)
            dump = path / f"{index:02d}_{name}.onnx"
            files.refuse_input_files([dump], files.files_read(model), f"{DUMP_DIR_VARIABLE} dump")
            ir.save(model, dump)
    return model
