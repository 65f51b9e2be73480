"""The public API: load, export, optimize, save, and the Recipe that says how to quantize."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from lowbit.ir.scheme import GROUP_AXES, QuantScheme
from lowbit.passes import pipelines
from lowbit.passes.axis_selectors import SELECTORS
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
    ops (``lowbit::QuantMatMul``, or ``MatMulNBits`` for per-OC 4-bit) that run fast but need lowbit's op
    library (``lowbit.runtime.session``); the default is the portable QDQ form for stock ONNX Runtime.
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

    def __post_init__(self) -> None:
        if self.axis not in (*GROUP_AXES, "adadim"):
            raise ValueError(f"axis must be one of {(*GROUP_AXES, 'adadim')}, got {self.axis!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        self.scheme()  # validates bits, group_size, method

    @property
    def candidate_axes(self) -> tuple[str, ...]:
        return GROUP_AXES if self.axis == "adadim" else (self.axis,)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.axis == "adadim"

    def scheme(self) -> QuantScheme:
        """The scheme of one weight (for ``adadim``, the first candidate axis; the pass picks per weight)."""
        return QuantScheme(self.bits, self.group_size, self.candidate_axes[0], self.symmetric, self.method)


@dataclasses.dataclass
class OptimizeResult:
    model: ir.Model
    report: OptimizeReport


def _external_files(model: ir.Model, base_dir: pathlib.Path) -> set[str]:
    """Check every external-data reference stays inside ``base_dir`` and exists; return the files."""
    files: set[str] = set()
    root = base_dir.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = pathlib.Path(tensor.location)
        if location.is_absolute():
            raise ValueError(f"tensor {value.name!r} points to an absolute external-data path {tensor.location!r}")
        target = (root / location).resolve()  # resolves '..' and symlinks
        if not target.is_relative_to(root):
            raise ValueError(
                f"tensor {value.name!r} points outside the model's folder: {tensor.location!r} -> {target}"
            )
        if not target.is_file():
            raise FileNotFoundError(f"external data file {str(target)!r} of tensor {value.name!r} is missing")
        files.add(str(target))
    return files


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an ``onnx_ir.Model``; external data must lie inside the model's folder."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning subclasses, ...
        raise ValueError(f"{str(path)!r} is not a readable ONNX model: {error}") from error
    if not model.opset_imports or not model.graph.outputs:
        raise ValueError(f"{str(path)!r} is not a usable ONNX model: it has no opset import or no graph outputs")
    sources = _external_files(model, path.parent) | {str(path.resolve())}
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
            f"method={recipe.method!r}, axis={recipe.axis!r} needs calibration data: "
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
    )
    model = pipelines.run_pipeline(model, passes, report)
    return OptimizeResult(model, report)


def _tensor_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)


def save(model: ir.Model, path: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` atomically to ``path``; tensors go to ``<name>.data`` beside it past ~1.8 GB.

    Refuses to write over the file the model was loaded from or any external data it reads.
    """
    path = pathlib.Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"output path {str(path)!r} must end in .onnx")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    external = f"{path.name}.data" if _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD else None
    protected = model.meta.get(_SOURCE_KEY, set())
    for target in [path] + ([path.parent / external] if external else []):
        if str(target.resolve()) in protected:
            raise ValueError(f"refusing to overwrite {str(target)!r}: the model was loaded from it")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ir.save(model, temporary, external_data=external)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
