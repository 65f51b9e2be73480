"""lowbit: low-bit weight quantization of transformer graphs for ONNX Runtime.

    model = lowbit.load("model.onnx")
    result = lowbit.optimize(model, lowbit.Recipe(bits=4, group_size=128, axis="ic"))
    lowbit.save(result.model, "model.w4.onnx")

The names below load on first use (PEP 562), so ``import lowbit.cli`` and ``lowbit --help`` do not pay
for ONNX, ONNX Runtime and torch.
"""

import importlib

_EXPORTS = {
    "OptimizeReport": "lowbit.passes.report",
    "OptimizeResult": "lowbit.api",
    "Recipe": "lowbit.passes.recipe",
    "export": "lowbit.api",
    "load": "lowbit.api",
    "optimize": "lowbit.api",
    "save": "lowbit.api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
