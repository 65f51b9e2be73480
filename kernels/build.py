"""Build lowbit's ONNX Runtime custom-op library, ``kernels/liblowbit_ops.so``.

    python kernels/build.py             # find or fetch the ORT headers, compile, link
    python kernels/build.py --no-fetch  # use headers already present only
    python kernels/build.py --force     # rebuild even when the library is newer than its sources

``pip install -e .`` runs the same build through ``setup.py``; when it cannot build (no headers, no
compiler) the install still succeeds and using the op raises an error naming this command.

ONNX Runtime's pip wheel ships no C/C++ headers. They are looked up in ``$ORT_INCLUDE_DIR``, the cache
``build/ort-headers``, and ``/usr/include/onnxruntime`` (Debian/Ubuntu ``libonnxruntime-dev``), and else
fetched into the cache from Debian trixie's ``libonnxruntime-dev`` (1.21, ORT_API_VERSION 21, which the
pip runtime >= 1.21 accepts) with ``apt-get download`` and a temporary source list (design.md section 6).

The CPU kernels are compiled for scalar, AVX2+FMA, AVX-512 and AVX-512 VNNI and chosen at run time. When
``nvcc`` is found the CUDA kernel is added (sm_80/86/89/90 + PTX, static cudart).

Standard library only: ``setup.py`` imports this file before ``lowbit`` is installed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
CPU_DIR = KERNELS / "cpu"
CUDA_DIR = KERNELS / "cuda"
LIBRARY = KERNELS / "liblowbit_ops.so"
HEADER_CACHE = REPO / "build" / "ort-headers"
OBJECT_DIR = REPO / "build" / "lowbit-kernels"
HEADER_SUBDIR = Path("usr/include/onnxruntime")
REQUIRED_HEADERS = ("onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h")

CXX_FLAGS = [
    "-std=c++17",
    "-O3",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wall",
    "-Wextra",
    "-DORT_API_MANUAL_INIT",
]  # Ort::InitApi in RegisterCustomOps sets the API table
#: (source in kernels/cpu, extra flags, needs the ORT headers)
CPU_SOURCES = [
    ("isa_scalar.cpp", [], False),
    ("isa_avx2.cpp", ["-mavx2", "-mfma"], False),
    # GCC 12 warns falsely about _mm512_undefined_* inside the AVX-512 intrinsics
    ("isa_avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx2", "-mfma", "-Wno-maybe-uninitialized"], False),
    (
        "isa_avx512_vnni.cpp",
        ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx2", "-mfma", "-Wno-maybe-uninitialized"],
        False,
    ),
    ("int8.cpp", [], False),
    ("int8_scalar.cpp", [], False),
    ("int8_avx2.cpp", ["-mavx2", "-mfma"], False),
    (
        "int8_avx512_vnni.cpp",
        ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx2", "-mfma", "-Wno-maybe-uninitialized"],
        False,
    ),
    # the clip search's loops, bit for bit NumPy's: every operation rounded on its own (no FMA contraction)
    ("clip_search.cpp", ["-ffp-contract=off", "-fno-math-errno"], False),
    ("op_io.cpp", [], True),
    ("quant_matmul.cpp", [], True),
    ("quant_gather.cpp", [], True),
    ("register.cpp", [], True),
]
CUDA_ARCHS = ("80", "86", "89", "90")


class BuildError(RuntimeError):
    """The library could not be built; the message says why and what to do."""


def _has_headers(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_HEADERS)


def find_ort_headers() -> Path | None:
    """The ORT include directory from ``$ORT_INCLUDE_DIR``, the cache or the system, or None."""
    override = os.environ.get("ORT_INCLUDE_DIR")
    if override:
        if not _has_headers(Path(override)):
            raise BuildError(f"ORT_INCLUDE_DIR={override} does not contain {', '.join(REQUIRED_HEADERS)}")
        return Path(override)
    for candidate in (HEADER_CACHE / HEADER_SUBDIR, Path("/usr/include/onnxruntime")):
        if _has_headers(candidate):
            return candidate
    return None


def fetch_ort_headers() -> Path:
    """Download Debian trixie's ``libonnxruntime-dev`` and unpack it into the cache (no system change)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    if not (shutil.which("apt-get") and shutil.which("dpkg") and keyring.is_file()):
        raise BuildError("no ORT headers found and this is not a Debian machine with apt-get to fetch them")
    mirror = "http://deb.debian.org/debian"
    if sources.is_file():
        uris = [line.split()[1] for line in sources.read_text().splitlines() if line.startswith("URIs:")]
        mirror = uris[0] if uris else mirror
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-headers-") as tmp:
        work = Path(tmp)
        for sub in ("lists/partial", "archives/partial"):
            (work / sub).mkdir(parents=True)
        (work / "sources.list").write_text(f"deb [signed-by={keyring}] {mirror} trixie main\n")
        options = [
            f"-oDir::Etc::SourceList={work / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={work / 'lists'}",
            f"-oDir::Cache={work}",
            f"-oDir::Cache::Archives={work / 'archives'}",
            "-oAPT::Sandbox::User=root",
            "-q",  # root: skip the _apt sandbox, which cannot write here
        ]
        _run(["apt-get", *options, "update"], "apt-get update (trixie source list)", timeout=600)
        _run(
            ["apt-get", *options, "download", "libonnxruntime-dev"],
            "apt-get download libonnxruntime-dev",
            cwd=work,
            timeout=600,
        )
        debs = sorted(work.glob("libonnxruntime-dev_*.deb"))
        if not debs:
            raise BuildError("apt-get download libonnxruntime-dev produced no .deb")
        unpacked = work / "x"
        _run(["dpkg", "-x", str(debs[-1]), str(unpacked)], "dpkg -x")
        if not _has_headers(unpacked / HEADER_SUBDIR):
            raise BuildError(f"{debs[-1].name} does not contain the ORT C++ headers")
        shutil.rmtree(HEADER_CACHE, ignore_errors=True)
        (HEADER_CACHE / HEADER_SUBDIR).parent.mkdir(parents=True)
        shutil.copytree(unpacked / HEADER_SUBDIR, HEADER_CACHE / HEADER_SUBDIR)
        (HEADER_CACHE / "SOURCE").write_text(f"{debs[-1].name} from {mirror} trixie\n")
    return HEADER_CACHE / HEADER_SUBDIR


def _run(command: list[str], what: str, cwd: Path | None = None, timeout: float | None = None) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{what} failed: {error}") from error
    if result.returncode != 0:
        raise BuildError(f"{what} failed (exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-4000:]}")


def find_nvcc() -> Path | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def find_cuda_lib(nvcc: Path) -> Path:
    """The directory with libcudart_static.a (nvcc may be a wrapper script outside the CUDA tree)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc.resolve().parents[1], "/usr/local/cuda"]
    for home in filter(None, homes):
        for lib in (Path(home) / "lib64", Path(home) / "targets" / "x86_64-linux" / "lib"):
            if (lib / "libcudart_static.a").is_file():
                return lib
    raise BuildError(f"nvcc found ({nvcc}) but no libcudart_static.a; set CUDA_HOME, or build with --no-cuda")


def _sources() -> list[Path]:
    return [p for d in (CPU_DIR, CUDA_DIR) if d.is_dir() for p in d.iterdir() if p.is_file()] + [Path(__file__)]


def newer_sources(library: Path = LIBRARY) -> list[str]:
    """The sources (and this build script) changed after ``library`` was built: it would run old kernels."""
    built = library.stat().st_mtime
    return [p.name for p in _sources() if p.stat().st_mtime > built]


def is_stale() -> bool:
    return not LIBRARY.is_file() or bool(newer_sources())


def build(*, fetch: bool = True, cuda: bool | None = None, force: bool = False, log=print) -> Path:
    """Build (when stale) and return the library path; raises BuildError with the reason otherwise.

    ``cuda=None`` builds the CUDA kernel when ``nvcc`` is found.
    """
    if not force and not is_stale():
        log(f"lowbit kernels: {LIBRARY} is up to date")
        return LIBRARY
    include = find_ort_headers()
    if include is None:
        if not fetch:
            raise BuildError(
                "no ONNX Runtime headers (set ORT_INCLUDE_DIR, or let `python kernels/build.py` fetch them)"
            )
        log("lowbit kernels: fetching ONNX Runtime headers from Debian trixie's libonnxruntime-dev ...")
        include = fetch_ort_headers()
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        raise BuildError(f"no C++ compiler ({cxx!r} not found; install g++ or set CXX)")
    nvcc = find_nvcc() if cuda is not False else None
    if cuda and nvcc is None:
        raise BuildError("CUDA requested but nvcc is missing")

    OBJECT_DIR.mkdir(parents=True, exist_ok=True)
    defines = ["-DLOWBIT_WITH_CUDA"] if nvcc else []
    host_sources = [(CPU_DIR / name, flags, needs_ort) for name, flags, needs_ort in CPU_SOURCES]
    if nvcc:
        host_sources.append((CUDA_DIR / "quant_matmul_cuda.cpp", [], True))  # the CUDA op's ORT side
    jobs = []
    for source, flags, needs_ort in host_sources:
        includes = [f"-I{CPU_DIR}", f"-I{CUDA_DIR}"] + ([f"-I{include}"] if needs_ort else [])
        obj = OBJECT_DIR / (source.name + ".o")
        jobs.append(([cxx, *CXX_FLAGS, *flags, *defines, *includes, "-c", str(source), "-o", str(obj)], obj))
    link_extra = []
    if nvcc:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")  # PTX for newer GPUs
        for cu in sorted(CUDA_DIR.glob("*.cu")):
            obj = OBJECT_DIR / (cu.name + ".o")
            command = [
                str(nvcc),
                "-std=c++17",
                "-O3",
                *gencode,
                "-Xcompiler=-fPIC,-fvisibility=hidden",
                f"-I{CPU_DIR}",
                f"-I{CUDA_DIR}",
                "-c",
                str(cu),
                "-o",
                str(obj),
            ]
            jobs.append((command, obj))
        # static cudart: the library loads where libcudart.so is absent
        link_extra = [f"-L{find_cuda_lib(nvcc)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]

    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_run, command, f"compiling {Path(command[-3]).name}") for command, _ in jobs]
        for future in futures:
            future.result()
    tmp_library = OBJECT_DIR / LIBRARY.name
    _run(
        [
            cxx,
            "-shared",
            "-o",
            str(tmp_library),
            *(str(obj) for _, obj in jobs),
            *link_extra,
            f"-Wl,--version-script={CPU_DIR / 'exports.map'}",
            "-Wl,--no-undefined",
            "-Wl,-O1",
        ],
        "linking",
    )
    os.replace(tmp_library, LIBRARY)  # atomic: a running process never sees a half-written library
    log(
        f"lowbit kernels: built {LIBRARY} (CPU: scalar, AVX2, AVX-512, AVX-512 VNNI chosen at run time; "
        f"CUDA: {'sm_' + '/'.join(CUDA_ARCHS) + ' + PTX' if nvcc else 'not built (no nvcc)'}; ORT headers {include})"
    )
    return LIBRARY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-fetch", action="store_true", help="do not download the ORT headers")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernel even when nvcc is present")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        build(fetch=not args.no_fetch, cuda=False if args.no_cuda else None, force=args.force)
    except BuildError as error:
        print(f"lowbit kernels NOT built: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
