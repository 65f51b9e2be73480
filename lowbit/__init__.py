"""lowbit: low-bit weight quantization of transformer graphs for ONNX Runtime.

    model = lowbit.load("model.onnx")
    result = lowbit.optimize(model, lowbit.Recipe(bits=4, group_size=128, axis="ic"))
    lowbit.save(result.model, "model.w4.onnx")
"""

from lowbit.api import OptimizeResult, Recipe, export, load, optimize, save
from lowbit.passes.report import OptimizeReport

__all__ = ["OptimizeReport", "OptimizeResult", "Recipe", "export", "load", "optimize", "save"]
