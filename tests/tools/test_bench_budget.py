"""bench_budget's rows, table and frontier plot (plain SVG)."""

import xml.etree.ElementTree as ElementTree
from types import SimpleNamespace

from lowbit.passes.quantize_plan import WidthTable
from lowbit.tools.dev.bench_budget import Measured, frontier_svg, markdown

ROWS = {
    "fp32": {"quality": 45.0, "bytes": 540_000_000},
    "3": {
        "quality": 52.0,
        "megabytes": 170.0,
        "bits_per_weight": 2.99,
        "widths": {"2": 10, "3": 150, "4": 50},
        "output_error": 12.5,
    },
    "W3": {
        "quality": 57.0,
        "megabytes": 171.0,
        "bits_per_weight": 3.25,
        "widths": {"3": 210},
        "output_error": 20.0,
    },
    "W2": {
        "quality": 900.0,
        "megabytes": 150.0,
        "bits_per_weight": 2.25,
        "widths": {"2": 210},
        "output_error": 80.0,
    },
}


def test_markdown_lists_every_row_with_its_widths():
    lines = markdown(ROWS, "perplexity").splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert "| row | MB | bits per weight | perplexity | widths (2/3/4/5/6/8) | summed output error |" in lines
    assert "| 3 | 170.0 | 2.990 | 52.0000 | 10/150/50/0/0/0 | 12.5 |" in lines
    assert "| W3 | 171.0 | 3.250 | 57.0000 | 0/210/0/0/0/0 | 20 |" in lines


def test_frontier_places_points_by_megabytes_and_quality():
    svg = ElementTree.fromstring(frontier_svg(ROWS, "perplexity"))
    circles = {
        c.find("{http://www.w3.org/2000/svg}title").text: c for c in svg.iter("{http://www.w3.org/2000/svg}circle")
    }
    assert set(circles) == {"budget 3", "W3", "W2"}
    x = {name: float(c.get("cx")) for name, c in circles.items()}
    y = {name: float(c.get("cy")) for name, c in circles.items()}
    assert x["W2"] < x["budget 3"] < x["W3"]  # more MB further right
    assert y["W2"] < y["W3"] < y["budget 3"]  # higher perplexity further up (SVG y grows downwards)


def test_a_failed_row_is_listed_and_left_out_of_the_plot():
    rows = {**ROWS, "3 kl": {"error": "ValueError: no"}}
    assert "| 3 kl | failed: ValueError: no |" in markdown(rows, "perplexity").splitlines()
    assert "3 kl" not in frontier_svg(rows, "perplexity")


def test_rows_at_a_subset_of_widths_choose_among_those_only():
    """``B at 2,8``: the budget allocated as if only those widths were measured; indices stay the table's."""
    table = WidthTable((2, 4, 8), plans=[], axes=[], costs=[[10, 20, 40], [10, 20, 40]], errors=[[9, 3, 1], [5, 2, 1]])
    plans = [SimpleNamespace(weight=SimpleNamespace(size=32))] * 2  # 64 weights: 5 bits per weight = 40 bytes
    measured = Measured(model=None, plans=plans, table=table, fused=False)
    measured.__dict__["other_bytes"] = 0  # a bits budget leaves it out
    assert measured.picks("5") == [1, 1]  # both at 4 bits: error 5
    assert measured.picks("5 at 2,8") == [0, 0]  # 8 bits no longer fits beside 2
    assert measured.picks("7.5") == [2, 1]  # 60 bytes: 8 + 4 bits, error 3
    assert measured.picks("7.5 at 2,8") == [2, 0]  # 8 + 2 bits, error 6
