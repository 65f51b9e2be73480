"""From ONNX files (and an optional report) to the page's data, and to the HTML file."""

from __future__ import annotations

import os
import pathlib

from lowbit.api import load
from lowbit.tools.viewer.diff import diff_graphs
from lowbit.tools.viewer.graph_data import GraphIndex, index_graph, payload
from lowbit.tools.viewer.overlays import apply_report, layer_rows, quantized_weights, read_report
from lowbit.tools.viewer.page import render_page

PathLike = str | os.PathLike


def build_view_data(model_path: PathLike, compare: PathLike | None = None, report: PathLike | None = None) -> dict:
    """Everything the page shows, JSON-ready.

    With ``compare``, the page shows two panes, ``compare`` (left, the baseline) and ``model_path``
    (right), with nodes marked added / removed / rewritten from the baseline to the model. The report
    and the per-layer table belong to the quantized one of the two (the model, unless only the
    baseline has quantized weights).
    """
    report_data = read_report(report) if report else None
    model_path = pathlib.Path(model_path)
    labels = _labels(model_path, pathlib.Path(compare) if compare else None)
    model = index_graph(load(model_path), labels[0])
    baseline = index_graph(load(compare), labels[1]) if compare else None
    overlays = quantized_weights(model)
    baseline_overlays = quantized_weights(baseline) if baseline else []
    quantized, quantized_overlays, reference = model, overlays, baseline
    if baseline is not None and baseline_overlays and not overlays:
        quantized, quantized_overlays, reference = baseline, baseline_overlays, model
    warnings = (
        apply_report(quantized_overlays, quantized, report_data, pathlib.Path(report).name) if report_data else []
    )
    diff = diff_graphs(baseline, model) if baseline else None
    panes = []
    if baseline is not None:
        panes.append(_pane(baseline, baseline_overlays, diff.before, f"--compare {baseline.label}"))
    panes.append(_pane(model, overlays, diff.after if diff else None, model.label))
    return {
        "title": f"lowbit view: {model.label}" + (f" vs {baseline.label}" if baseline else ""),
        "subtitle": " · ".join(
            [f"{len(model.model.graph)} nodes"]
            + ([f"compared with {baseline.label}"] if baseline else [])
            + ([f"report {pathlib.Path(report).name}"] if report else [])
        ),
        "panes": panes,
        "mainPane": len(panes) - 1,
        "layers": {
            "pane": len(panes) - 1 if quantized is model else 0,
            "rows": layer_rows(quantized, quantized_overlays, report_data, reference),
        },
        "diff": {"before": baseline.label, "after": model.label, "summary": diff.summary} if diff else None,
        "report": _report_summary(report_data, pathlib.Path(report).name) if report_data else None,
        "warnings": warnings,
    }


def write_view(
    model_path: PathLike, output_path: PathLike, compare: PathLike | None = None, report: PathLike | None = None
) -> pathlib.Path:
    """Write the self-contained HTML view of ``model_path`` to ``output_path`` (never over an input)."""
    output = pathlib.Path(output_path)
    for source in filter(None, (model_path, compare, report)):
        if pathlib.Path(source).resolve() == output.resolve():
            raise ValueError(f"output {str(output)!r} would overwrite the input {str(source)!r}")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(output.parent)!r} does not exist")
    page = render_page(build_view_data(model_path, compare, report))
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


def _labels(model_path: pathlib.Path, compare: pathlib.Path | None) -> tuple[str, str | None]:
    """File names, or full paths when the two files share a name."""
    if compare is None:
        return model_path.name, None
    if model_path.name == compare.name:
        return str(model_path), str(compare)
    return model_path.name, compare.name


def _pane(index: GraphIndex, overlays: list[dict], marks: list[dict] | None, title: str) -> dict:
    """One pane's data; nodes refer to their quantized weight by its index in ``quant``."""
    extras: list[dict] = [dict(mark) for mark in marks] if marks else [{} for _ in index.entries]
    for number, overlay in enumerate(overlays):
        for entry in [overlay["_dq"], *overlay["_consumers"]]:
            extras[entry]["quant"] = number
    data = payload(index, extras, [{k: v for k, v in overlay.items() if not k.startswith("_")} for overlay in overlays])
    data["title"] = title
    return data


def _report_summary(report: dict, label: str) -> dict:
    return {"label": label, "recipe": report.get("recipe", {}), "passes": report.get("passes", [])}
