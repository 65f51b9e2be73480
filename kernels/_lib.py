"""Locate the built custom-op library (``kernels/build.py`` builds it; ``pip install -e .`` runs that)."""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY_NAME = "liblowbit_ops.so"
BUILD_COMMAND = "python kernels/build.py"


class KernelsNotBuiltError(RuntimeError):
    """The lowbit op library is not built, so models with ``lowbit::`` ops cannot run."""


def _candidate() -> Path:
    override = os.environ.get("LOWBIT_OPS_LIBRARY")
    return Path(override) if override else Path(__file__).resolve().parent / LIBRARY_NAME


def is_built() -> bool:
    return _candidate().is_file()


def not_built_error() -> KernelsNotBuiltError:
    return KernelsNotBuiltError(
        f"lowbit's custom-op library is not built (no {_candidate()}). Build it from the repository root with "
        f"`{BUILD_COMMAND}` (it fetches the ONNX Runtime headers from Debian's libonnxruntime-dev; or set "
        "ORT_INCLUDE_DIR to an onnxruntime include directory), then retry."
    )


def library_path() -> Path:
    """The op library: ``$LOWBIT_OPS_LIBRARY`` if set, else the one next to this module."""
    if not is_built():
        raise not_built_error()
    return _candidate()
