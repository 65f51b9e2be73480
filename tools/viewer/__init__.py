"""The graph viewer: one self-contained HTML page per model (no network at view time).

    from lowbit.tools.viewer import write_view
    write_view("model.w4.onnx", "view.html", compare="model.onnx", report="report.json")

The page shows the graph collapsed by module path and expandable, quantization overlays coloured by
error, a side-by-side diff with ``compare``, node details, a sortable per-layer table and plots.
"""

from lowbit.tools.viewer.build import build_view_data, write_view

__all__ = ["build_view_data", "write_view"]
