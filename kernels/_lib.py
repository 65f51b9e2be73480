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


def _newer_sources() -> list[str]:
    """Sources changed since the library next to them was built (none for ``$LOWBIT_OPS_LIBRARY``, or where no
    sources were installed): such a library runs the old kernels and ignores attributes added since."""
    if os.environ.get("LOWBIT_OPS_LIBRARY"):
        return []
    from lowbit.kernels import build

    return build.newer_sources(_candidate()) if build.CPU_DIR.is_dir() else []


def is_built() -> bool:
    """The library exists and is not older than its sources."""
    return _candidate().is_file() and not _newer_sources()


def not_built_error() -> KernelsNotBuiltError:
    if _candidate().is_file():
        changed = _newer_sources()
        state = f"is older than its sources ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})"
    else:
        state = f"is not built (no {_candidate()})"
    return KernelsNotBuiltError(
        f"lowbit's custom-op library {state}. Build it from the repository root with `{BUILD_COMMAND}` (it fetches "
        "the ONNX Runtime headers from Debian's libonnxruntime-dev; or set ORT_INCLUDE_DIR to an onnxruntime "
        "include directory), then retry."
    )


def library_path() -> Path:
    """The op library: ``$LOWBIT_OPS_LIBRARY`` if set, else the one next to this module (refused when older
    than its sources)."""
    if not is_built():
        raise not_built_error()
    return _candidate()
