"""torch -> onnx_ir: export a ``torch.nn.Module`` with the torch.onnx dynamo exporter.

The exporter keeps, on every node, where it came from (metadata ``pkg.torch.onnx.name_scopes``: the
module path, e.g. ``model.layers.0.self_attn.q_proj``), which the passes and the viewer use.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch


class ExportError(RuntimeError):
    """torch.onnx could not export a module; the cause is chained as ``__cause__``."""


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what the user cannot act on: torch.onnx's notes that torchvision's ops are not registered
    (we export no vision ops) and torch's own deprecation warnings about its pytree internals."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _root_cause(error: BaseException) -> str:
    """First line of the innermost chained exception: torch.onnx's own message is a generic wrapper."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def export(
    module: torch.nn.Module,
    example_args: tuple,
    *,
    dynamic_shapes: dict[str, Any] | tuple[Any, ...] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ir.Model:
    """Export ``module`` called on ``example_args`` to an ``onnx_ir.Model`` (``torch.onnx.export(dynamo=True)``).

    ``dynamic_shapes`` follows ``torch.export`` (e.g. ``{"input_ids": {0: "batch", 1: "seq"}}``). A dim
    whose example size is 1 is specialised to 1 by ``torch.export`` even when marked dynamic, so give
    example inputs of size >= 2 on every dynamic dim.
    """
    if not isinstance(example_args, tuple):
        raise TypeError(f"example_args must be a tuple of the module's inputs, got {type(example_args).__name__}")
    name = type(module).__name__
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                example_args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
            )
    except Exception as error:  # torch.export and the ONNX translation raise many unrelated types
        raise ExportError(f"torch.onnx could not export {name}: {_root_cause(error)}") from error
    _make_initializers_contiguous(program.model)
    return program.model


def _make_initializers_contiguous(model: ir.Model) -> None:
    """The exporter's constant folding leaves transposed NumPy *views* as initializers; onnx_ir passes that
    hash tensor bytes (initializer deduplication) reject those, so store them C-contiguous."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray) and not tensor.raw.flags.c_contiguous:
            value.const_value = ir.Tensor(np.ascontiguousarray(tensor.raw), dtype=tensor.dtype, name=tensor.name)
