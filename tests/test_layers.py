"""Dependencies point one way: quant <- ir <- kernels <- runtime <- passes <- api <- tools <- cli.

Every ``lowbit`` import of every product module (function-level imports too) must name a module of its
own layer or of a layer below it. The pure quantization math (``passes/quant``) is the bottom: it imports
no other part of lowbit, so it is tested and reused without graphs, sessions or the command line.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Bottom to top; a module belongs to the layer of the longest prefix that names it.
LAYERS = (
    ("quant", ("lowbit.passes.quant",)),
    ("ir", ("lowbit.ir",)),
    ("kernels", ("lowbit.kernels",)),
    ("runtime", ("lowbit.runtime",)),
    ("passes", ("lowbit.passes",)),
    ("api", ("lowbit", "lowbit.api")),
    ("tools", ("lowbit.tools",)),
    ("cli", ("lowbit.cli",)),
)
SOURCE_FOLDERS = ("ir", "passes", "runtime", "kernels", "tools", "lowbit")


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not matches:
        raise ValueError(f"{module} is in no layer")
    return max(matches)[1]


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] != "lowbit":
        parts.insert(0, "lowbit")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> list[pathlib.Path]:
    files = []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            inside_link = folder == "lowbit" and path.relative_to(ROOT / "lowbit").parts[0] in SOURCE_FOLDERS
            if not inside_link and "dev" not in path.relative_to(ROOT).parts:
                files.append(path)
    return files


def lowbit_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a lowbit module in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from package import module" imports that module; "from module import name" the module
            found += [(node.lineno, _imported_module(node.module, alias.name)) for alias in node.names]
    return [(line, name) for line, name in found if name == "lowbit" or name.startswith("lowbit.")]


def _imported_module(module: str, name: str) -> str:
    if not module.startswith("lowbit"):
        return module
    try:
        return f"{module}.{name}" if importlib.util.find_spec(f"{module}.{name}") is not None else module
    except ModuleNotFoundError:  # "module" is a module, not a package: "name" is a name in it
        return module


def upward_imports(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    own = layer_of(module_name(path, root))
    return [
        f"{path.relative_to(root)}:{line} ({LAYERS[own][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
        for line, name in lowbit_imports(path)
        if layer_of(name) > own
    ]


def test_no_module_imports_upward():
    violations = [line for path in product_modules() for line in upward_imports(path)]
    assert not violations, "\n".join(violations)


def test_the_quantization_core_imports_only_itself():
    core = [path for path in product_modules() if layer_of(module_name(path)) == 0]
    assert {path.stem for path in core} >= {"scheme", "rtn", "gptq", "hessian", "adadim", "outliers"}
    for path in core:
        for line, name in lowbit_imports(path):
            assert layer_of(name) == 0, f"{path.relative_to(ROOT)}:{line} imports {name}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from lowbit.passes.pipelines import run_pipeline\n", ["(ir) imports lowbit.passes.pipelines (passes)"]),
        ("import lowbit.cli\n", ["(ir) imports lowbit.cli (cli)"]),
        ("def f():\n    from lowbit.runtime import session\n", ["(ir) imports lowbit.runtime.session (runtime)"]),
        ("from lowbit.passes.quant import rtn\nimport numpy\n", []),
    ],
)
def test_the_check_sees_upward_imports_at_any_depth(tmp_path, source, expected):
    folder = tmp_path / "ir"
    folder.mkdir()
    (folder / "probe.py").write_text(source)
    found = upward_imports(folder / "probe.py", tmp_path)
    assert [line.split(" ", 1)[1] for line in found] == expected
