"""QuantScheme: how one weight is quantized (bits, grouping, symmetry, method, clipping).

A weight is the ONNX ``MatMul`` right operand ``B`` of shape ``[K, N]`` (K input channels, N output
channels). The two group layouts of the AdaDim paper map onto ONNX blocked quantization axes:

* ``"oc"`` (classic per-OC groups): g consecutive *input* channels of one output channel share a scale,
  i.e. blocks run along axis 0 of ``B``.
* ``"ic"`` (per-IC groups): g consecutive *output* channels of one input channel share a scale, i.e.
  blocks run along axis 1 of ``B``.
"""

from __future__ import annotations

import dataclasses

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
GROUP_AXES = ("oc", "ic")
METHODS = ("rtn", "gptq")
#: How group scales are stored: float32, or float16 (half the bytes; scales are rounded to float16 values
#: when they are computed, so the codes are chosen against the scales the file keeps).
SCALE_DTYPES = ("float32", "float16")
#: The recipe's other vocabularies, kept here at the bottom so that the recipe, the CLI and the passes
#: that act on them read one list each without importing the passes' heavy modules.
SELECTORS = ("matrix", "block", "layer")
CALIBRATION_MODES = ("parallel", "sequential")
OUTLIER_CRITERIA = ("magnitude", "sensitivity")
REORDER_CRITERIA = ("absmax", "hessian")

#: The ``B[K, N]`` axis along which the groups of each layout run.
BLOCK_AXIS = {"oc": 0, "ic": 1}


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """Quantization of one weight. ``group_size=-1`` means one group over the whole axis."""

    bits: int = 4
    group_size: int = 128
    #: The group layout, ``"oc"`` or ``"ic"`` (the recipe's ``axis``); ``block_axis`` is its ONNX axis.
    group_axis: str = "oc"
    symmetric: bool = False
    method: str = "rtn"
    #: Search each group's clipping range (``rtn.search_group_params``) instead of taking its min-max range.
    clip_search: bool = False
    #: The type the scales are written in (``SCALE_DTYPES``); ``rtn.round_scales`` makes them its values.
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise ValueError(f"group_size must be an int, got {self.group_size!r}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive int or -1 (whole axis), got {self.group_size}")
        if self.group_axis not in GROUP_AXES:
            raise ValueError(f"group_axis must be one of {GROUP_AXES}, got {self.group_axis!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")

    @property
    def block_axis(self) -> int:
        """Axis of ``B[K, N]`` along which groups run (0 for per-OC, 1 for per-IC)."""
        return BLOCK_AXIS[self.group_axis]

    def block_size(self, shape: tuple[int, int]) -> int:
        """Effective group length for a ``[K, N]`` weight (the whole axis when ``group_size=-1``)."""
        length = shape[self.block_axis]
        return length if self.group_size == -1 else min(self.group_size, length)
