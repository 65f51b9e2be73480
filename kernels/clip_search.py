"""The clip search's candidate errors in compiled loops (``cpu/clip_search.cpp``, in the op library), bit for bit
NumPy's (``passes.quant.rtn._rounding_error``), installed into ``rtn`` by ``install``: the quantization math stays
NumPy (the bottom layer imports nothing of lowbit) and runs the loops where the library is built."""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from lowbit.kernels import _lib
from lowbit.passes.quant import rtn

_INT64, _FLOAT, _POINTER = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


@functools.cache
def _functions() -> tuple | None:
    """The library's two entry points (contiguous and strided members), or None where it is not built."""
    if not _lib.is_built():
        return None
    library = ctypes.CDLL(str(_lib.library_path()))
    contiguous, strided = library.lowbit_rounding_errors_contiguous, library.lowbit_rounding_errors_strided
    contiguous.argtypes = [_POINTER, _INT64, _INT64, _POINTER, _POINTER, _INT64, _POINTER, _FLOAT, _POINTER]
    strided.argtypes = [_POINTER, _INT64, _INT64, _INT64, _POINTER, _POINTER, _INT64, _POINTER, _FLOAT, _POINTER]
    contiguous.restype = strided.restype = None
    return contiguous, strided


def install() -> bool:
    """Have ``rtn``'s clip search evaluate its candidates here where the op library is built (the same errors,
    faster); returns whether it could (else NumPy goes on doing it)."""
    if _functions() is None:
        return False
    rtn.use_compiled_rounding_errors(rounding_errors)
    return True


def rounding_errors(grouped: np.ndarray, grids: rtn.Grids, element_weights: np.ndarray | None, axis: int) -> np.ndarray:
    """``rtn._rounding_error`` of every candidate (the grids' leading axis) on ``grouped`` as ``rtn._grouped_layout``
    lays it out along ``axis`` (``[K, G, g]`` for 1, ``[G, g, N]`` for 0): float64 ``[R, K, G]`` or ``[R, G, N]``."""
    contiguous, strided = _functions()
    candidates = grids.scales.shape[0]
    values = np.ascontiguousarray(grouped, dtype=np.float32)
    if axis == 1:
        rows, groups, members = values.shape
        columns = 1
        shape, weights_shape = (candidates, rows, groups, 1), (rows, groups, members)
        out = np.empty((candidates, rows, groups))
    else:
        groups, members, columns = values.shape
        shape, weights_shape = (candidates, groups, 1, columns), (groups, members, 1)
        out = np.empty((candidates, groups, columns))
    scales, offsets = _full(grids.scales, shape, np.float32), _full(grids.offsets, shape, np.float32)
    weights = None if element_weights is None else _full(element_weights, weights_shape, np.float64)
    pointers = (_address(scales), _address(offsets), candidates, None if weights is None else _address(weights))
    if columns == 1:  # members along rows, or a single column, whose members NumPy also sums as contiguous (pairwise)
        contiguous(_address(values), out.size // candidates, members, *pointers, grids.max_code, _address(out))
    else:
        strided(_address(values), groups, members, columns, *pointers, grids.max_code, _address(out))
    return out


def _full(array: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
    """``array`` broadcast to ``shape``, C-contiguous, of ``dtype`` (no copy where it is already that)."""
    if array.shape != shape:
        array = np.broadcast_to(array, shape)
    return np.ascontiguousarray(array, dtype=dtype)


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]
