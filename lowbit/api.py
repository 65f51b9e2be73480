"""The public API: load, export, optimize, save, and the Recipe that says how to quantize."""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.ir import analysis
from lowbit.ir.scheme import GROUP_AXES, METHODS, QuantScheme
from lowbit.passes import pipelines
from lowbit.passes.axis_selectors import SELECTORS
from lowbit.passes.quant import outliers, reorder
from lowbit.passes.sequential import CALIBRATION_MODES
from lowbit.passes.report import OptimizeReport
from lowbit.runtime.calibration import CalibrationStats

#: Above this many bytes of tensors, ``save`` writes them to an external data file (protobuf's 2 GB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_SOURCE_KEY = "lowbit.source_files"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How ``optimize`` quantizes a model.

    ``axis="oc"``: classic groups of ``group_size`` input channels per output channel; ``axis="ic"``:
    the AdaDim paper's groups of ``group_size`` output channels per input channel; ``axis="adadim"``:
    per weight, the one of the two with the lower output error on calibration data, judged by
    ``selector``: ``matrix`` (the weight's own output), ``block`` (its attention/MLP module's output, the
    paper's) or ``layer`` (the decoder layer's output); see ``lowbit.passes.axis_selectors``.
    ``method="gptq"`` and ``axis="adadim"`` need calibration data. ``group_size=-1``: one group over the
    whole axis. The LM head and embedding tables stay in float unless opted in. ``fused=True`` writes fused
    ops (``lowbit::QuantMatMul``) that run fast but need lowbit's op
    library (``lowbit.runtime.session``); the default is the portable QDQ form for stock ONNX Runtime.
    ``outlier_fraction``: keep that fraction of each weight's entries (ranked by ``outlier_criterion``:
    ``"magnitude"`` or ``"sensitivity"`` = ``H_kk * w**2``, which needs calibration) exact in a sparse
    float32 side branch and quantize the rest; ``split=True``: split weights into three value clusters
    quantized apart where that lowers their error enough. Both off by default; measured on SmolLM2 in
    ``lowbit.passes.split_outliers``. ``fold_norms=True`` folds norm scales into the weights
    that read the norm (``lowbit.passes.fold_norm_scales``); ``reorder`` (``"absmax"`` or ``"hessian"``,
    needs calibration) sorts input channels by that statistic where the permutation folds into the
    producing weights (``lowbit.passes.reorder_channels``). Both off by default.
    ``calibration_mode="sequential"`` (needs calibration) quantizes decoder layers one after another, each
    on statistics of the model whose earlier layers are already quantized (GPTQ's order; the AdaDim
    selectors then judge a layer on those inputs too); ``"parallel"`` (the default) calibrates the float
    model once. See ``lowbit.passes.sequential``. ``choice_method="rtn"`` (with ``axis="adadim"``): the
    selector compares RTN candidates and the recipe's method then quantizes the chosen axis only (the
    AdaDim paper's way; with GPTQ, half the GPTQ work); None compares candidates made by ``method``.
    ``clip_search=True``: each group's range is its min-max range shrunk by the ratio (1.0 down to 0.5)
    with the lowest squared error, input channels weighted by ``diag(H)`` where calibration exists
    (``lowbit.passes.quant.rtn.search_group_params``; with GPTQ, wherever GPTQ makes group parameters).
    Off by default (uncalibrated, it can hurt: README); on SmolLM2 W3 g128 GPTQ AdaDim it takes perplexity
    from 70.0 to 56.9.
    """

    bits: int = 4
    group_size: int = 128
    axis: str = "oc"
    method: str = "rtn"
    symmetric: bool = False
    selector: str = "block"  # best held-out perplexity at W3 g128; "layer" was 0.4 % better at W4 (bench_quality)
    include_lm_head: bool = False
    include_embeddings: bool = False
    fused: bool = False
    outlier_fraction: float = 0.0
    outlier_criterion: str = "magnitude"
    split: bool = False
    fold_norms: bool = False
    reorder: str | None = None
    calibration_mode: str = "parallel"
    choice_method: str | None = None
    clip_search: bool = False

    def __post_init__(self) -> None:
        if self.axis not in (*GROUP_AXES, "adadim"):
            raise ValueError(f"axis must be one of {(*GROUP_AXES, 'adadim')}, got {self.axis!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if self.outlier_criterion not in outliers.CRITERIA:
            raise ValueError(f"outlier_criterion must be one of {outliers.CRITERIA}, got {self.outlier_criterion!r}")
        outliers.outlier_count(1, self.outlier_fraction)  # validates the fraction: [0, 1)
        if self.reorder is not None and self.reorder not in reorder.CRITERIA:
            raise ValueError(f"reorder must be None or one of {reorder.CRITERIA}, got {self.reorder!r}")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration_mode must be one of {CALIBRATION_MODES}, got {self.calibration_mode!r}")
        if self.choice_method not in (None, *METHODS):
            raise ValueError(f"choice_method must be None or one of {METHODS}, got {self.choice_method!r}")
        self.scheme()  # validates bits, group_size, method

    @property
    def candidate_axes(self) -> tuple[str, ...]:
        return GROUP_AXES if self.axis == "adadim" else (self.axis,)

    @property
    def needs_calibration(self) -> bool:
        sensitivity = self.outlier_fraction > 0 and self.outlier_criterion == "sensitivity"
        sequential = self.calibration_mode == "sequential"
        return self.method == "gptq" or self.axis == "adadim" or sensitivity or self.reorder is not None or sequential

    def scheme(self) -> QuantScheme:
        """The scheme of one weight (for ``adadim``, the first candidate axis; the pass picks per weight)."""
        return QuantScheme(self.bits, self.group_size, self.candidate_axes[0], self.symmetric, self.method, self.clip_search)


@dataclasses.dataclass
class OptimizeResult:
    model: ir.Model
    report: OptimizeReport


def _tensors(model: ir.Model):
    """(name, tensor) of every initializer and tensor attribute, in the main graph and its subgraphs."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            yield value.name, value.const_value
        for node in graph:
            for attribute in node.attributes.values():
                if attribute.type == ir.AttributeType.TENSOR:
                    yield f"{node.name}.{attribute.name}", attribute.value


def _external_files(model: ir.Model, base_dir: pathlib.Path) -> set[str]:
    """Check every external-data reference stays inside ``base_dir`` and its file holds the data; return the files."""
    files: set[str] = set()
    root = base_dir.resolve()
    for name, tensor in _tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = pathlib.Path(tensor.location)
        if location.is_absolute():
            raise ValueError(f"tensor {name!r} points to an absolute external-data path {tensor.location!r}")
        target = (root / location).resolve()  # resolves '..' and symlinks
        if not target.is_relative_to(root):
            raise ValueError(f"tensor {name!r} points outside the model's folder: {tensor.location!r} -> {target}")
        if not target.is_file():
            raise FileNotFoundError(f"external data file {str(target)!r} of tensor {name!r} is missing")
        if target.stat().st_nlink > 1:  # onnx_ir and the ONNX checker refuse to read such files
            raise ValueError(f"external data file {str(target)!r} of tensor {name!r} is a hard link; copy the file instead")
        end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if target.stat().st_size < end:
            raise ValueError(
                f"external data file {str(target)!r} holds {target.stat().st_size} bytes; tensor {name!r} needs bytes up to {end}"
            )
        files.add(str(target))
    return files


def _checker_complaint(path: pathlib.Path) -> str | None:
    """What ``onnx.checker`` (with strict shape inference) finds wrong with the file, or None.

    Run on the path, before the model is parsed, so that its copy and ours are not in memory together.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return str(error).strip()
    return None


def _check_opsets_and_names(model: ir.Model, path: pathlib.Path) -> None:
    """What the checker lets through but ONNX Runtime refuses: unknown default opsets, repeated node names."""
    newest = onnx.defs.onnx_opset_version()
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is not None and version > newest:
        raise ValueError(f"{str(path)!r} declares opset {version}; the newest this onnx knows is {newest}")
    for graph in model.graphs():
        names = collections.Counter(node.name for node in graph if node.name)
        repeated = sorted(name for name, count in names.items() if count > 1)
        if repeated:
            raise ValueError(f"{str(path)!r}: node names {repeated[:5]} are used more than once (ONNX Runtime refuses that)")


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an ``onnx_ir.Model``, checked: it must pass ``onnx.checker`` (strict shape
    inference), and its external data must lie inside the model's folder and hold the tensors' bytes."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
    complaint = _checker_complaint(path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning subclasses, ...
        raise ValueError(f"{str(path)!r} is not a readable ONNX model: {error}") from error
    if not proto.opset_import or not proto.graph.output:
        raise ValueError(f"{str(path)!r} is not a usable ONNX model: it has no opset import or no graph outputs")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # onnx_ir's message names the graph only; the checker's says what is wrong
        raise ValueError(f"{str(path)!r} is not a valid ONNX model: {complaint or error}") from error
    ir.external_data.set_base_dir(model.graph, path.parent)
    sources = _external_files(model, path.parent) | {str(path.resolve())}  # before the checker: clearer messages
    if complaint:
        raise ValueError(f"{str(path)!r} is not a valid ONNX model: {complaint}")
    _check_opsets_and_names(model, path)
    model.meta[_SOURCE_KEY] = sources
    return model


def export(module, example_args: tuple, **kwargs) -> ir.Model:
    """Export a ``torch.nn.Module`` with the torch.onnx dynamo exporter (see ``lowbit.ir.export``)."""
    from lowbit.ir.export import export as export_module

    return export_module(module, example_args, **kwargs)


def optimize(
    model: ir.Model,
    recipe: Recipe | None = None,
    calibration: Iterable[Mapping[str, np.ndarray]] | CalibrationStats | None = None,
) -> OptimizeResult:
    """Run the portable pipeline for ``recipe`` on ``model``.

    ``calibration``: feed dicts for the float model (e.g. token windows), or statistics already
    collected with ``lowbit.runtime.calibration.collect`` on the same graph. Needed by
    ``method="gptq"`` and ``axis="adadim"``; with RTN it adds each weight's output error to the report.
    The passes work **in place**: ``result.model`` is ``model``, transformed (load the file again to
    keep a float copy). ``result.report`` lists per-pass and per-weight statistics.
    """
    if not isinstance(model, ir.Model):
        raise TypeError(f"optimize() takes an onnx_ir.Model (see lowbit.load), got {type(model).__name__}")
    recipe = recipe or Recipe()
    if recipe.needs_calibration and calibration is None:
        raise ValueError(
            f"method={recipe.method!r}, axis={recipe.axis!r}, outlier_criterion={recipe.outlier_criterion!r}, "
            f"reorder={recipe.reorder!r}, calibration_mode={recipe.calibration_mode!r} needs calibration data: "
            "optimize(model, recipe, calibration=[{input_name: array}, ...])"
        )
    report = OptimizeReport(recipe=dataclasses.asdict(recipe))
    passes = pipelines.portable_pipeline(
        recipe.scheme(),
        candidate_axes=recipe.candidate_axes,
        selector=recipe.selector,
        calibration=calibration,
        include_lm_head=recipe.include_lm_head,
        include_embeddings=recipe.include_embeddings,
        fused=recipe.fused,
        outlier_fraction=recipe.outlier_fraction,
        outlier_criterion=recipe.outlier_criterion,
        split=recipe.split,
        fold_norms=recipe.fold_norms,
        reorder=recipe.reorder,
        calibration_mode=recipe.calibration_mode,
        choice_method=recipe.choice_method,
    )
    model = pipelines.run_pipeline(model, passes, report)
    return OptimizeResult(model, report)


def save(model: ir.Model, path: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` atomically to ``path``; tensors go to ``<name>.data`` beside it past ~1.8 GB.

    Refuses to write over the file the model was loaded from or any external data it reads.
    """
    path = pathlib.Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"output path {str(path)!r} must end in .onnx")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"output path {str(path)!r} is a folder")
    external = f"{path.name}.data" if analysis.initializer_bytes(model.graph) > EXTERNAL_DATA_THRESHOLD else None
    protected = model.meta.get(_SOURCE_KEY, set())
    for target in [path] + ([path.parent / external] if external else []):
        if str(target.resolve()) in protected:
            raise ValueError(f"refusing to overwrite {str(target)!r}: the model was loaded from it")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ir.save(model, temporary, external_data=external)
        os.replace(temporary, path)
    except OSError as error:  # name the output, not the temporary file (errno keeps the subclass)
        raise OSError(error.errno, f"cannot write {str(path)!r}: {error.strerror}") from error
    finally:
        temporary.unlink(missing_ok=True)
    return path
