"""The viewer in a real headless Chromium: it renders, expands, searches, switches tabs, loads nothing
from outside, and stays fast on 20,000 nodes. Screenshots go to ``$LOWBIT_SCREENSHOT_DIR`` (else the
test's temporary folder). Needs Debian's ``chromium`` (``apt-get install -y chromium``)."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

import lowbit
from lowbit.tools.dev.bench_viewer import generated_model
from lowbit.tools.viewer import write_view
from lowbit.tools.viewer.browser import Browser, find_chromium

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_chromium() is None, reason="no Chromium found: apt-get install -y chromium (or set $LOWBIT_CHROMIUM)"
    ),
]

RIGHT = "#panes .pane:last-child"


@pytest.fixture
def shots(tmp_path) -> pathlib.Path:
    folder = pathlib.Path(os.environ.get("LOWBIT_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with Browser(width=1500, height=950) as instance:
        yield instance


@pytest.fixture(scope="module")
def compare_page(tmp_path_factory) -> pathlib.Path:
    """A 1,500-node generated model quantized 4-bit per-IC, viewed against the float one with the report."""
    folder = tmp_path_factory.mktemp("viewer")
    original, quantized, report = folder / "gen.onnx", folder / "gen.w4.onnx", folder / "report.json"
    lowbit.save(generated_model(1500, seed=3), original)
    result = lowbit.optimize(lowbit.load(original), lowbit.Recipe(bits=4, group_size=16, axis="ic"))
    lowbit.save(result.model, quantized)
    report.write_text(result.report.to_json())
    return write_view(quantized, folder / "view.html", compare=original, report=report)


def count(browser: Browser, selector: str) -> int:
    return browser.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length")


def open_page(browser: Browser, page: pathlib.Path) -> float:
    browser.requests.clear()
    browser.errors.clear()
    browser.open(page)
    return float(browser.wait_for("window.__firstRenderMs"))


def test_page_renders_expands_searches_and_switches_tabs(browser, compare_page, shots):
    open_page(browser, compare_page)
    for pane in ("#panes .pane:first-child", RIGHT):
        assert count(browser, f"{pane} g.grp") >= 10  # the first view: collapsed layers
    assert "gen.w4.onnx" in browser.evaluate(
        "document.querySelector('#panes .pane:last-child .pane-title').textContent"
    )
    browser.screenshot(shots / "viewer_first_view.png")

    # Expand a layer with a real click: its frame appears in both panes and its nodes are drawn.
    item = browser.evaluate(
        f"[...document.querySelectorAll('{RIGHT} g.grp')].find(g => g.querySelector('text.t1').textContent.endsWith('layers.2')).dataset.i"
    )
    browser.click_element(f"{RIGHT} g.grp[data-i='{item}'] rect.body")
    browser.wait_for(f"!!document.querySelector('{RIGHT} g.fhead[data-i=\"{item}\"]')")
    assert count(browser, f"{RIGHT} g.node") > 0
    assert "layers.2" in browser.evaluate(
        "[...document.querySelectorAll('#panes .pane:first-child g.fhead')].map(h => h.textContent).join()"
    )
    assert "QUANTIZED WEIGHTS" in browser.evaluate("document.getElementById('details').innerText")
    browser.screenshot(shots / "viewer_expanded.png")

    # Search by typing: Enter jumps to the match inside a collapsed layer, selects it, shows details.
    target = "model.layers.5.mlp.down_proj.MatMul.DequantizeLinear"
    browser.click_element("#search")
    browser.type_text("layers.5.mlp.down_proj.MatMul.Deq")
    browser.press("Enter", 13)
    browser.wait_for("document.getElementById('search-count').textContent === '1 / 1'")
    selected = browser.evaluate(
        f"[...document.querySelectorAll('{RIGHT} g.node.sel.hit')].map(g => g.textContent).join()"
    )
    assert target[-20:] in selected
    details = browser.evaluate("document.getElementById('details').innerText")
    assert target in details and "group axis\tic" in details and "UINT4 [64, 32]" in details
    assert count(browser, "#details svg.hist rect") > 0  # initializer histogram
    browser.screenshot(shots / "viewer_search.png")

    # Layers table, sorted by error (descending after two clicks); plots; changes.
    browser.click_element("#tabs button[data-tab=layers]")
    rows = count(browser, "table.layers tbody tr")
    assert rows == browser.evaluate("JSON.parse(document.getElementById('lowbit-data').textContent).layers.rows.length")
    column = browser.evaluate(
        "[...document.querySelectorAll('table.layers th')].findIndex(th => th.textContent.startsWith('rel. error'))"
    )
    for _ in range(2):
        browser.click_element(f"table.layers th[data-col='{column}']")
    errors = browser.evaluate(
        f"[...document.querySelectorAll('table.layers tbody tr')].map(tr => tr.children[{column}].textContent).filter(t => t).map(Number)"
    )
    assert errors and errors == sorted(errors, reverse=True)
    browser.screenshot(shots / "viewer_layers.png")
    browser.click_element("#tabs button[data-tab=plots]")
    assert count(browser, "svg.plot rect.bar") >= len(errors)
    browser.screenshot(shots / "viewer_plots.png")
    browser.click_element("#tabs button[data-tab=changes]")
    assert count(browser, "table.changes tbody tr") > 0
    browser.screenshot(shots / "viewer_changes.png")

    assert browser.requests == [compare_page.resolve().as_uri()]  # nothing from outside
    assert browser.errors == []


def test_first_render_of_a_20000_node_graph(browser, tmp_path, shots):
    model = tmp_path / "generated20000.onnx"
    lowbit.save(generated_model(20_000), model)
    page = write_view(model, tmp_path / "generated20000.html")
    milliseconds = open_page(browser, page)
    assert milliseconds < 5000, f"first render took {milliseconds:.0f} ms"
    boxes = count(browser, "#panes g.grp") + count(browser, "#panes g.node")
    assert 0 < boxes <= 150  # collapsed groups, not 20,000 boxes
    browser.click_element("#panes g.grp rect.body")
    browser.wait_for("!!document.querySelector('#panes g.fhead')")
    assert browser.errors == []
    browser.screenshot(shots / "viewer_generated20000.png")


@pytest.mark.model
def test_smollm2_in_chromium(browser, smollm2_onnx, tmp_path, shots):
    page = write_view(smollm2_onnx, tmp_path / "smollm2.html")
    assert open_page(browser, page) < 5000
    laid_out = browser.evaluate(
        "(p => p.visible.filter(i => i >= p.N && !p.expanded[i - p.N]).map(i => p.group(i).name))(window.lowbitViewer.panes[0])"
    )
    assert [f"layers.{n}" for n in range(30)] == [name for name in laid_out if name.startswith("layers.")]
    assert count(browser, "#panes g.grp") < len(laid_out)  # drawn: only what is on (or near) the screen
    assert browser.errors == []
    browser.screenshot(shots / "viewer_smollm2.png")


def test_budget_report_shows_each_layers_width_options(browser, tmp_path, shots):
    """Under a size budget the layers tab says what the budget allowed and used, and each layer row lists
    every candidate width's error and bytes with the chosen one in brackets."""
    from tests import factories

    _, chosen, report, result = factories.calibrated_mlp_files(
        tmp_path, lowbit.Recipe(bits=3, group_size=8, budget="8")
    )
    open_page(browser, write_view(chosen, tmp_path / "view.html", report=report))
    browser.click_element("#tabs button[data-tab=layers]")
    text = browser.evaluate("document.getElementById('tab-layers').innerText")
    assert "Budget 8" in text and "bits per weight" in text
    column = browser.evaluate(
        "[...document.querySelectorAll('table.layers th')].findIndex(th => th.textContent === 'width options')"
    )
    cells = browser.evaluate(
        f"[...document.querySelectorAll('table.layers tbody tr')].map(tr => tr.children[{column}].textContent)"
    )
    bits = {w.layer: w.bits for w in result.report.weights}
    assert len(cells) == 2 and all(f"[{b}b " in cell for b, cell in zip(bits.values(), cells))
    browser.screenshot(shots / "viewer_budget.png")
    assert browser.errors == []
