"""The source tree must not shadow installed distributions.

``python -m pytest`` (and any ``python -m`` / ``python -c`` run from the repository root) puts the root
first on ``sys.path``, so a root folder that is a regular package (has an ``__init__.py``) hides an
installed distribution of the same top-level name: PyPI's ``kernels``, which transformers imports, broke
a fresh install that way. The subpackages are namespace folders reached as ``lowbit.<name>``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Folders at the root that are importable as top-level names when Python runs from the root.
ROOT_FOLDERS = sorted(
    path.name
    for path in ROOT.iterdir()
    if path.is_dir() and path.name.isidentifier() and not path.name.startswith((".", "_")) and path.name != "lowbit"
)
SUBPACKAGES = ("ir", "passes", "runtime", "kernels", "tools")


def _import_from_root(statement: str) -> subprocess.CompletedProcess:
    """Run ``statement`` in a fresh interpreter whose working directory (first on sys.path) is the root."""
    return subprocess.run(
        [sys.executable, "-c", statement],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackages_are_namespace_folders_reached_through_lowbit(name):
    assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow a distribution named {name!r}"
    link = ROOT / "lowbit" / name
    assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()
    spec = importlib.util.find_spec(f"lowbit.{name}")
    assert spec is not None and spec.origin in (None, "namespace")


def test_every_distribution_named_like_a_root_folder_imports_from_the_root():
    owners = importlib.metadata.packages_distributions()
    shared = [name for name in ROOT_FOLDERS if name in owners]
    for name in shared:
        result = _import_from_root(f"import {name}; print({name}.__file__)")
        assert result.returncode == 0, f"import {name} from the root failed:\n{result.stderr[-2000:]}"
        origin = result.stdout.strip()
        # a virtual environment inside the checkout (.venv/) is fine: our own folder is what must not be found
        assert origin != "None" and not pathlib.Path(origin).resolve().is_relative_to(ROOT / name), (
            f"import {name} from the root found our folder ({origin}), not distribution {owners[name]}"
        )


def test_transformers_hub_kernels_imports_from_the_root():
    """The regression itself: transformers imports PyPI's ``kernels``; it must not find ``kernels/``."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (pip extra 'models')")
    result = _import_from_root("import transformers.integrations.hub_kernels")
    assert result.returncode == 0, result.stderr[-2000:]


def test_lowbit_imports_from_the_root_and_elsewhere(tmp_path):
    for cwd in (ROOT, tmp_path):
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import lowbit.kernels._lib, lowbit.tools.text; print(lowbit.kernels._lib.__file__)",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]


def test_the_wheel_ships_the_product_and_not_the_development_scripts(tmp_path):
    """The links in lowbit/ carry the subpackages into the wheel; tools/dev (benchmarks, fuzzer) stays out.
    Built from a copy of the tracked tree, so that setuptools' build/ folder lands there, not in the checkout."""
    import os
    import shutil
    import zipfile

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("needs a git checkout to know the tracked files")
    source = tmp_path / "source"
    for name in tracked.stdout.splitlines():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            target.symlink_to(os.readlink(ROOT / name))
        else:
            shutil.copy2(ROOT / name, target)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LOWBIT_BUILD_KERNELS": "0"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    (wheel,) = tmp_path.glob("lowbit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "lowbit/cli.py",
        "lowbit/passes/quant/scheme.py",
        "lowbit/ir/builders.py",
        "lowbit/runtime/session.py",
        "lowbit/kernels/packing.py",
        "lowbit/tools/demo.py",
        "lowbit/tools/viewer/viewer.js",
    ):
        assert module in names
    assert not [name for name in names if name.startswith("lowbit/tools/dev/")]
