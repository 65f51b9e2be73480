"""Fixtures for the op-library tests: CPU ISAs (the built library, ``ops_library``, is in tests/conftest.py)."""

from pathlib import Path

import pytest

ISAS = ("scalar", "avx2", "avx512", "avx512vnni")
_CPU_FLAGS = {
    "avx2": {"avx2", "fma"},
    "avx512": {"avx2", "fma", "avx512f", "avx512bw"},
    "avx512vnni": {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"},
}


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    """Caps the kernels at one instruction set (LOWBIT_CPU_ISA, read when a session creates the kernel)."""
    missing = _CPU_FLAGS.get(request.param, set()) - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}")
    monkeypatch.setenv("LOWBIT_CPU_ISA", request.param)
    return request.param
