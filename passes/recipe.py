"""Recipe: how ``optimize`` quantizes a model. The one definition of every option.

Each field carries its help text (and its choices) in its metadata: ``lowbit optimize`` builds one flag
per field from them, ``pipelines.portable_pipeline`` reads the recipe itself, and the report records it.
Adding an option is one field here plus the pass that acts on it. This module imports only the scheme
vocabulary, so the command line can read it without loading ONNX Runtime or torch.
"""

from __future__ import annotations

import dataclasses
import numbers

from lowbit.passes.quant.allocate import parse_budget
from lowbit.passes.quant.scheme import (
    CALIBRATION_MODES,
    GROUP_AXES,
    METHODS,
    OUTLIER_CRITERIA,
    REORDER_CRITERIA,
    SCALE_DTYPES,
    SELECTORS,
    SUPPORTED_BITS,
    QuantScheme,
)

AXES = (*GROUP_AXES, "adadim")


def _option(default, help: str, choices: tuple | None = None, kind: type | None = None):
    """A recipe field: its default, the help text the CLI shows, its allowed values and its Python type."""
    kind = kind or type(default)
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "kind": kind})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How ``optimize`` quantizes a model; every field's meaning is its ``help`` metadata (``lowbit optimize
    --help`` prints them). ``method="gptq"``, ``axis="adadim"``, sensitivity outliers, ``reorder`` and the
    sequential mode need calibration data (``needs_calibration``)."""

    bits: int = _option(4, "bits per weight code", SUPPORTED_BITS)
    group_size: int = _option(128, "weights per quantization group; -1 = one group over the whole axis")
    axis: str = _option(
        "oc",
        "group layout: oc = groups of input channels per output channel (classic); ic = groups of output "
        "channels per input channel (AdaDim's per-IC, isolates activation outliers); adadim = per weight, the "
        "one with the lower output error on calibration data (judged by --selector)",
        AXES,
    )
    method: str = _option(
        "rtn",
        "rtn = round to nearest; gptq = error-compensating GPTQ (dampening 1 %, act-order; needs calibration)",
        METHODS,
    )
    symmetric: bool = _option(False, "symmetric codes without zero points (default: asymmetric)")
    selector: str = _option(
        "block",
        "how AdaDim judges an axis: matrix = the weight's own output error; block = its attention/MLP module's "
        "output (the paper's); layer = the decoder layer's output",
        SELECTORS,
    )
    include_lm_head: bool = _option(False, "also quantize the LM head (kept in float by default)")
    include_embeddings: bool = _option(False, "also quantize embedding tables (kept in float by default)")
    head_bits: int | None = _option(
        None,
        "bits of the LM head and the embedding tables, where included (default: bits): every token's logits and "
        "inputs go through them whole, so they may deserve more bits than the body",
        SUPPORTED_BITS,
        kind=int,
    )
    fused: bool = _option(
        False,
        "write lowbit's fused ops (lowbit::QuantMatMul: codes packed at their width, fast per-IC and 2/3-bit; "
        "run with lowbit.runtime.session) instead of the portable DequantizeLinear + MatMul form that stock "
        "ONNX Runtime runs",
    )
    int8_activations: bool = _option(
        False,
        "quantize activations to int8 at run time in the fused kernel (faster, less accurate; like MatMulNBits "
        "accuracy_level=4); needs --fused",
    )
    scale_dtype: str | None = _option(
        None,
        "the values group scales take: float16 rounds them to float16 values before the codes are chosen, and the "
        "fused ops store them in float16 (half the scale bytes: 0.125 instead of 0.25 bits per weight at g128); the "
        "portable form keeps them in the model's float type (float16 there makes it compute what the fused file "
        "computes); default: float16 with --fused, float32 otherwise",
        SCALE_DTYPES,
        kind=str,
    )
    outlier_fraction: float = _option(
        0.0,
        "keep this fraction of each weight's entries exact in a sparse float32 branch (e.g. 0.005)",
        kind=float,
    )
    outlier_criterion: str = _option(
        "magnitude",
        "rank outliers by |w| (magnitude) or by H_kk * w^2 (sensitivity: needs calibration)",
        OUTLIER_CRITERIA,
    )
    split: bool = _option(
        False, "split each weight into three value clusters quantized apart, where that lowers its error"
    )
    fold_norms: bool = _option(False, "fold RMSNorm/LayerNorm scales into the weights that read the norm")
    rotate: bool = _option(
        False,
        "carry the residual stream rotated by a random orthogonal matrix folded into the weights (norm scales "
        "folded first), so that no input channel of the weights reading it stands out; float MatMuls by the "
        "rotation are added where the stream meets a tied table or an unfolded norm",
    )
    reorder: str | None = _option(
        None,
        "sort input channels by this calibration statistic where the permutation folds into the producing "
        "weights (needs calibration)",
        REORDER_CRITERIA,
        kind=str,
    )
    calibration_mode: str = _option(
        "parallel",
        "parallel = calibrate the float model once; sequential = quantize decoder layers one after another, each "
        "calibrated on the model whose earlier layers are already quantized (needs calibration)",
        CALIBRATION_MODES,
    )
    choice_method: str | None = _option(
        None,
        "with axis adadim: compare candidates made by this method (rtn: choose by RTN error, then run the "
        "recipe's method on the chosen axis only); default: the recipe's method",
        METHODS,
        kind=str,
    )
    clip_search: bool = _option(
        False,
        "shrink each group's range (1.0 down to 0.5) where that lowers its squared error, input channels "
        "weighted by diag(H) where calibration exists",
    )
    gptq_damping: float = _option(
        0.01,
        "GPTQ's dampening: this fraction of mean(diag(H)) is added to H's diagonal (multiplied by 10 while H "
        "stays singular)",
    )
    budget: str | None = _option(
        None,
        "a size budget: average bits per quantized weight, scales and zero points included (e.g. 3.5), or "
        "megabytes of the written file, graph and metadata included (e.g. 180MB); every weight is quantized at "
        "2, 3, 4, 5, 6 and 8 bits, its output error measured on calibration data, and the widths with the "
        "lowest total error that fit are kept (bits then applies only to embedding tables; needs calibration)",
        kind=str,
    )
    budget_sensitivity: str = _option(
        "kl",
        "with a budget, the error the widths minimise: kl = the model's output with only that weight quantized, "
        "run once per weight and width on 2 calibration samples (KL of the logits for an LM, else the relative "
        "squared error of the first output; weights an input feed cannot replace keep bits); output = each "
        "weight's own output error trace(dW^T H dW) on calibration data (no extra runs, but a poor predictor of "
        "the model's quality)",
        ("output", "kl"),
    )

    def __post_init__(self) -> None:
        if isinstance(self.budget, numbers.Real) and not isinstance(self.budget, bool):  # 3.5 as "3.5"
            object.__setattr__(self, "budget", repr(float(self.budget)))
        for field in dataclasses.fields(self):  # frozen: normalise through object.__setattr__
            object.__setattr__(self, field.name, _checked(field, getattr(self, field.name)))
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"outlier_fraction must be in [0, 1), got {self.outlier_fraction!r}")
        if not self.gptq_damping > 0.0:  # the retry on a singular H multiplies it: 0 would never grow
            raise ValueError(f"gptq_damping must be > 0, got {self.gptq_damping!r}")
        if self.int8_activations and not self.fused:
            raise ValueError(
                "Recipe.int8_activations is an option of lowbit's fused kernel: it needs fused=True (--fused); the "
                "portable DequantizeLinear + MatMul form has no int8-activation setting"
            )
        if self.budget is not None:
            parse_budget(self.budget)  # a clear error now rather than after calibration
        if self.head_bits is not None and not (self.include_lm_head or self.include_embeddings):
            raise ValueError("Recipe.head_bits applies to the LM head and embedding tables: include one of them")
        if self.head_bits is not None and self.budget is not None:
            raise ValueError(
                "Recipe.head_bits and Recipe.budget exclude each other: a budget chooses the head's width too"
            )
        self.scheme()  # validates group_size

    @property
    def candidate_axes(self) -> tuple[str, ...]:
        return GROUP_AXES if self.axis == "adadim" else (self.axis,)

    @property
    def needs_calibration(self) -> bool:
        sensitivity = self.outlier_fraction > 0 and self.outlier_criterion == "sensitivity"
        sequential = self.calibration_mode == "sequential"
        budget = self.budget is not None
        return (
            self.method == "gptq"
            or self.axis == "adadim"
            or sensitivity
            or self.reorder is not None
            or sequential
            or budget
        )

    @property
    def calibration_reasons(self) -> list[str]:
        """The options that make this recipe need calibration data, as ``name=value`` (empty if none)."""
        reasons = []
        if self.method == "gptq":
            reasons.append("method='gptq'")
        if self.axis == "adadim":
            reasons.append("axis='adadim'")
        if self.outlier_fraction > 0 and self.outlier_criterion == "sensitivity":
            reasons.append("outlier_criterion='sensitivity'")
        if self.reorder is not None:
            reasons.append(f"reorder={self.reorder!r}")
        if self.calibration_mode == "sequential":
            reasons.append("calibration_mode='sequential'")
        if self.budget is not None:
            reasons.append(f"budget={self.budget!r}")
        return reasons

    def scheme(self) -> QuantScheme:
        """The scheme of one weight (for ``adadim``, the first candidate axis; the pass picks per weight)."""
        return QuantScheme(
            self.bits,
            self.group_size,
            self.candidate_axes[0],
            self.symmetric,
            self.method,
            self.clip_search,
            self.stored_scale_dtype,
        )

    @property
    def stored_scale_dtype(self) -> str:
        """``scale_dtype``, or its default: float16 in the fused form, float32 in the portable one."""
        return self.scale_dtype or ("float16" if self.fused else "float32")


def _checked(field: dataclasses.Field, value):
    """``value`` checked against the field's type and allowed values (a message that names the field), as
    a plain Python value (NumPy numbers become int / float)."""
    kind, choices = field.metadata["kind"], field.metadata["choices"]
    if value is None and field.default is None:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = kind.__name__ + (" or None" if field.default is None else "")
        raise TypeError(f"Recipe.{field.name} must be a {expected}, got {value!r} ({type(value).__name__})")
    if choices is not None and value not in choices:
        none = " or None" if field.default is None else ""
        raise ValueError(f"Recipe.{field.name} must be one of {choices}{none}, got {value!r}")
    return kind(value) if kind in (int, float) else value
