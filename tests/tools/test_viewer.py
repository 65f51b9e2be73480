"""The viewer's data (hierarchy, layout, overlays, diff, statistics) and the page it writes."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit.cli import main
from lowbit.tools.dev.bench_viewer import generated_model
from lowbit.tools.viewer import build_view_data, write_view
from lowbit.tools.viewer.graph_data import index_graph, node_path
from lowbit.tools.viewer.hierarchy import MAX_CHILDREN, build_hierarchy
from lowbit.tools.viewer.page import render_page
from lowbit.tools.viewer.stats import tensor_stats
from tests import factories

# An external reference: a URL scheme, a protocol-relative or CDN address, or a fetching attribute.
EXTERNAL = re.compile(
    r"(?:https?|ftp|wss?)://|//cdn|\b(?:src|href|action|poster)\s*=|url\(\s*['\"]?(?!#|data:)|@import|\bimport\s*\(",
    re.IGNORECASE,
)


def chain(count: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(count - 1)]


def group_named(hierarchy, group_id: str):
    return next(g for g in hierarchy.groups if g.id == group_id)


@pytest.fixture
def quantized_mlp(tmp_path):
    """mlp.onnx, its 3-bit per-IC quantization and the optimizer's report, as files."""
    original, quantized, report = tmp_path / "mlp.onnx", tmp_path / "mlp.w3.onnx", tmp_path / "report.json"
    lowbit.save(factories.mlp(), original)
    result = lowbit.optimize(lowbit.load(original), lowbit.Recipe(bits=3, group_size=8, axis="ic"))
    lowbit.save(result.model, quantized)
    report.write_text(result.report.to_json())
    return original, quantized, report


def nodes_by_name(pane: dict) -> dict[str, dict]:
    return {node["name"]: node for node in pane["nodes"]}


# ---- paths and hierarchy ----------------------------------------------------------------------------


def test_node_path_prefers_torch_metadata_then_name_prefix():
    x = factories.graph_input("x", [2, 2])
    exported = ir.node("Relu", [x], name="node_relu_3")
    exported.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'model', 'model.layers.0.mlp', 'relu']"
    assert node_path(exported) == "model.layers.0.mlp"
    assert node_path(ir.node("Relu", [x], name="/model/layers.0/attn/MatMul")) == "model.layers.0.attn"
    assert node_path(ir.node("Relu", [x], name="model.norm.Mul")) == "model.norm"
    assert node_path(ir.node("Relu", [x], name="node_Relu_7")) == ""


def test_hierarchy_inlines_single_nodes_merges_chains_and_ranks_children():
    paths = [
        (),
        ("model", "layers", "0", "attn"),
        ("model", "layers", "0", "attn"),
        ("model", "layers", "0", "mlp"),  # alone in its group: drawn as a node of layers.0
        ("model", "layers", "1", "attn"),
        ("model", "layers", "1", "attn"),
        ("model", "layers", "1", "mlp"),
        ("model", "norm"),
        ("head", "proj", "inner"),  # head > proj > inner holds two nodes: one box "head.proj.inner"
        ("head", "proj", "inner"),
        (),
    ]
    hierarchy = build_hierarchy(paths, chain(len(paths)))
    root = hierarchy.groups[0]
    n = hierarchy.num_nodes
    assert [hierarchy.groups[c - n].id if c >= n else c for c in root.children] == [0, "model", "head.proj.inner", 10]
    assert root.ranks == [0, 1, 2, 3]
    merged = group_named(hierarchy, "head.proj.inner")
    assert merged.name == "head.proj.inner" and merged.children == [8, 9]
    layer = group_named(hierarchy, "model.layers.0")
    assert layer.name == "layers.0"  # numbered modules keep their list's name
    assert [hierarchy.groups[c - n].id if c >= n else c for c in layer.children] == ["model.layers.0.attn", 3]
    assert hierarchy.node_group[7] == hierarchy.groups.index(group_named(hierarchy, "model"))
    assert all(g.id not in ("model.layers.0.mlp", "head", "head.proj") for g in hierarchy.groups)


def test_edges_against_graph_order_do_not_break_ranking():
    # Group "a" holds nodes 0 and 2; node 1 sits between them at the top level: a -> 1 -> a.
    hierarchy = build_hierarchy([("a",), (), ("a",)], [(0, 1), (1, 2)])
    root = hierarchy.groups[0]
    assert root.children[0] >= hierarchy.num_nodes and root.children[1] == 1
    assert root.ranks == [0, 1]


def test_sources_sit_next_to_their_consumer():
    # 1 -> 2 -> 3 -> 4, and 0 (a constant, say, first in graph order) feeds 4 only: the row above 4.
    hierarchy = build_hierarchy([()] * 5, [(1, 2), (2, 3), (3, 4), (0, 4)])
    root = hierarchy.groups[0]
    ranks = dict(zip(root.children, root.ranks))
    assert ranks == {1: 0, 2: 1, 3: 2, 0: 2, 4: 3}


def test_barycenter_keeps_branches_apart():
    # Two independent chains a0 -> a1 and b0 -> b1: each child stays under its own parent.
    hierarchy = build_hierarchy([()] * 4, [(0, 2), (1, 3)])
    root = hierarchy.groups[0]
    assert root.children == [0, 1, 2, 3] and root.ranks == [0, 0, 1, 1]


def test_large_flat_groups_are_cut_into_labelled_parts():
    hierarchy = build_hierarchy([()] * 400, chain(400))
    root = hierarchy.groups[0]
    parts = [hierarchy.groups[c - hierarchy.num_nodes] for c in root.children]
    assert [p.name for p in parts] == [f"graph [{a}-{a + 99} of 400]" for a in (1, 101, 201, 301)]
    assert root.ranks == [0, 1, 2, 3] and all(len(p.children) == 100 and p.kind == "part" for p in parts)
    nested = build_hierarchy([()] * 60, chain(60), max_children=10, part_size=5)
    top = [nested.groups[c - nested.num_nodes] for c in nested.groups[0].children]
    assert [p.name for p in top] == ["graph [1-20 of 60]", "graph [21-40 of 60]", "graph [41-60 of 60]"]


def test_long_runs_of_a_modules_own_nodes_become_one_box():
    paths = [("model",)] * 10 + [("model", "layers", "0"), ("model", "layers", "0"), ("model",)]
    hierarchy = build_hierarchy(paths, chain(len(paths)))
    model = group_named(hierarchy, "model")
    n = hierarchy.num_nodes
    labels = [hierarchy.groups[c - n].name if c >= n else c for c in model.children]
    assert labels == ["model: 10 ops", "layers.0", 12]
    assert [hierarchy.groups[c - n].kind for c in model.children[:2]] == ["ops", "module"]


def test_generated_graph_hierarchy_is_a_tree_of_bounded_groups():
    index = index_graph(generated_model(3000, seed=1), "generated")
    hierarchy = index.hierarchy
    seen = []
    for group in hierarchy.groups:
        assert len(group.children) <= MAX_CHILDREN
        assert len(group.ranks) == len(group.children) and group.ranks == sorted(group.ranks)
        seen += [c for c in group.children if c < hierarchy.num_nodes]
    assert sorted(seen) == list(range(len(index.entries)))  # every node exactly once
    assert len(index.entries) == 3000 + 2  # plus the input and output markers


# ---- statistics ---------------------------------------------------------------------------------------


def test_tensor_stats_skip_non_finite_values():
    stats = tensor_stats(ir.tensor(np.array([1.0, 2.0, 3.0, 4.0, np.nan, np.inf], dtype=np.float32)))
    assert (stats["min"], stats["max"], stats["mean"], stats["nonfinite"]) == (1.0, 4.0, 2.5, 2)
    assert stats["std"] == pytest.approx(np.std([1, 2, 3, 4]), rel=1e-5)
    assert sum(stats["hist"]) == 4 and len(stats["hist"]) == 32


def test_tensor_stats_of_codes_and_constants():
    codes = ir.Tensor(np.arange(16, dtype=np.uint8).repeat(3), dtype=ir.DataType.UINT4)
    assert tensor_stats(codes)["hist"] == [3] * 16  # one bin per code
    assert tensor_stats(ir.tensor(np.full(5, 7.0, dtype=np.float32)))["hist"] == [5]
    assert tensor_stats(ir.tensor(np.zeros(0, dtype=np.float32))) is None


# ---- overlays, report, diff --------------------------------------------------------------------------


def test_quantized_weights_carry_graph_and_report_facts(quantized_mlp):
    original, quantized, report = quantized_mlp
    data = build_view_data(quantized, compare=original, report=report)
    records = {r["layer"]: r for r in json.loads(report.read_text())["weights"]}
    before, after = data["panes"]
    assert (before["title"], after["title"]) == ("--compare mlp.onnx", "mlp.w3.onnx") and data["mainPane"] == 1
    nodes = nodes_by_name(after)
    for layer in ("fc1", "fc2"):
        quant = after["quant"][nodes[f"{layer}.DequantizeLinear"]["quant"]]
        assert nodes[layer]["quant"] == nodes[f"{layer}.DequantizeLinear"]["quant"]  # the MatMul shows it too
        assert (quant["bits"], quant["axis"], quant["group_size"], quant["symmetric"]) == (3, "ic", 8, False)
        assert quant["relative_error"] == records[layer]["relative_error"]
        assert quant["bytes"] == records[layer]["bytes_after"] and quant["source_weight"] == records[layer]["name"]
    assert after["groups"][0]["quant"]["count"] == 2
    assert after["groups"][0]["quant"]["maxError"] == pytest.approx(
        max(r["relative_error"] for r in records.values()), rel=1e-5
    )
    rows = data["layers"]["rows"]
    assert [(r["layer"], r["status"]) for r in rows] == [("fc1", "quantized"), ("fc2", "quantized")]
    assert [r["bytes_before"] for r in rows] == [records["fc1"]["bytes_before"], records["fc2"]["bytes_before"]]
    assert data["layers"]["pane"] == 1 and data["warnings"] == []
    assert data["report"]["passes"] and data["report"]["recipe"]["bits"] == 3


def test_overlays_without_report_come_from_the_graph(quantized_mlp, tmp_path):
    original, _, _ = quantized_mlp
    per_oc = tmp_path / "mlp.w4oc.onnx"
    lowbit.save(lowbit.optimize(lowbit.load(original), lowbit.Recipe(bits=4, group_size=16, axis="oc")).model, per_oc)
    data = build_view_data(per_oc, compare=original)
    after = data["panes"][1]
    quant = after["quant"][nodes_by_name(after)["fc1"]["quant"]]
    assert (quant["bits"], quant["axis"], quant["group_size"]) == (4, "oc", 16)
    assert "relative_error" not in quant and data["report"] is None
    w1_bytes = 40 * 72 * 4
    assert data["layers"]["rows"][0]["bytes_before"] == w1_bytes  # the baseline's float weight


def test_report_records_missing_from_the_graph_are_warned(quantized_mlp, tmp_path):
    original, _, report = quantized_mlp
    data = build_view_data(original, report=report)  # the float model: no DequantizeLinear to match
    assert len(data["warnings"]) == 2 and "has no DequantizeLinear in mlp.onnx" in data["warnings"][0]
    assert [r["status"] for r in data["layers"]["rows"]] == ["float", "float"]


def test_adadim_choice_and_output_errors_from_the_report(tmp_path):
    recipe = lowbit.Recipe(bits=3, group_size=8, axis="adadim")
    original, chosen, report, result = factories.calibrated_mlp_files(tmp_path, recipe)
    records = {r["layer"]: r for r in result.report.to_dict()["weights"]}
    data = build_view_data(chosen, compare=original, report=report)
    quant = {q["layer"]: q for q in data["panes"][1]["quant"]}
    for layer in ("fc1", "fc2"):
        assert quant[layer]["adadim_choice"] == quant[layer]["axis"] == records[layer]["axis"]  # the graph agrees
        assert quant[layer]["axis_errors"] == records[layer]["axis_errors"] and len(quant[layer]["axis_errors"]) == 2
        assert quant[layer]["output_error"] == records[layer]["output_error"] is not None
    assert [row["adadim_choice"] for row in data["layers"]["rows"]] == [records["fc1"]["axis"], records["fc2"]["axis"]]


def test_diff_marks_added_rewritten_and_removed_nodes(quantized_mlp):
    original, quantized, _ = quantized_mlp
    data = build_view_data(quantized, compare=original)
    before, after = (nodes_by_name(pane) for pane in data["panes"])
    assert [name for name, node in after.items() if node.get("diff") == "added"] == [
        "fc1.DequantizeLinear",
        "fc2.DequantizeLinear",
    ]
    assert after["fc1"]["diff"] == before["fc1"]["diff"] == "rewritten"
    assert after["fc1"]["diffNote"].startswith(
        "input 1: 'w1' (initializer, FLOAT [40, 72]) -> 'fc1.dequantized' (from DequantizeLinear"
    )
    assert "diff" not in after["act"] and "diff" not in after["x"] and after["x"]["op"] == "Input"
    summary = data["diff"]["summary"]
    assert summary["nodes"] == {"added": {"DequantizeLinear": 2}, "removed": {}, "rewritten": {"MatMul": 2}}
    assert summary["initializers"]["removed"] == 2 and summary["initializers"]["added"] == 6
    reverse = build_view_data(original, compare=quantized)  # the other way round, DequantizeLinear is gone
    assert nodes_by_name(reverse["panes"][0])["fc2.DequantizeLinear"]["diff"] == "removed"
    assert reverse["diff"]["summary"]["nodes"]["removed"] == {"DequantizeLinear": 2}
    assert reverse["layers"]["pane"] == 0  # the table follows the quantized model


def test_diff_pairs_renamed_nodes_by_module_path_and_op(tmp_path):
    paths = []
    for number, name in enumerate(("act", "activation")):
        x = factories.graph_input("x", [2, 3])
        relu = factories.node("Relu", [x], f"block.{name}", output="y")
        paths.append(tmp_path / f"m{number}.onnx")
        lowbit.save(factories.model([x], [relu.outputs[0]], [relu], []), paths[-1])
    after = nodes_by_name(build_view_data(paths[1], compare=paths[0])["panes"][1])
    assert after["block.activation"]["diff"] == "rewritten"
    assert after["block.activation"]["diffNote"] == "renamed from 'block.act'"


# ---- the page ----------------------------------------------------------------------------------------


def test_page_is_self_contained_and_escapes_names(tmp_path):
    x = factories.graph_input("x", [2, 3])
    evil = factories.node("Relu", [x], "</script><script>alert('https://example.com/x.js')</script>", output="y")
    path = tmp_path / "evil.onnx"
    lowbit.save(factories.model([x], [evil.outputs[0]], [evil], []), path)
    page = render_page(build_view_data(path))
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the code, nothing injected
    assert not EXTERNAL.findall(page)
    data = page.split('<script type="application/json" id="lowbit-data">')[1].split("</script>")[0]
    assert json.loads(data)["panes"][0]["nodes"][1]["name"] == evil.name


def test_written_page_has_no_external_reference(quantized_mlp, tmp_path):
    original, quantized, report = quantized_mlp
    page = write_view(quantized, tmp_path / "view.html", compare=original, report=report).read_text()
    assert page.startswith("<!DOCTYPE html>") and not EXTERNAL.findall(page)


def test_write_view_refuses_to_overwrite_an_input_and_names_bad_files(quantized_mlp, tmp_path):
    original, quantized, report = quantized_mlp
    with pytest.raises(ValueError, match="would overwrite the input"):
        write_view(quantized, report, report=report)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        write_view(tmp_path / "missing.onnx", tmp_path / "view.html")
    with pytest.raises(ValueError, match="mlp.onnx.*is not JSON"):
        write_view(quantized, tmp_path / "view.html", report=original)
    with pytest.raises(FileNotFoundError, match="no report file"):
        write_view(quantized, tmp_path / "view.html", report=tmp_path / "nothing.json")


def test_cli_view(quantized_mlp, tmp_path, capsys):
    original, quantized, report = quantized_mlp
    output = tmp_path / "view.html"
    assert main(["view", str(quantized), "--compare", str(original), "--report", str(report), "-o", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out and output.stat().st_size > 10_000
    assert main(["view", str(tmp_path / "missing.onnx"), "-o", str(output)]) == 2
    assert "missing.onnx" in capsys.readouterr().err


def test_budget_width_options_from_the_report(tmp_path):
    """Under a size budget every layer row carries each width's error and bytes."""
    _, chosen, report, result = factories.calibrated_mlp_files(
        tmp_path, lowbit.Recipe(bits=3, group_size=8, budget="8")
    )
    records = {r["layer"]: r for r in result.report.to_dict()["weights"]}
    data = build_view_data(chosen, report=report)
    rows = {row["layer"]: row for row in data["layers"]["rows"]}
    for layer in ("fc1", "fc2"):
        options = records[layer]["width_options"]
        assert len(options) >= 2 and str(records[layer]["bits"]) in options
        assert rows[layer]["width_options"] == options
    assert any(p["details"].get("budget") for p in data["report"]["passes"])
