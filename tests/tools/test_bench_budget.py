"""bench_budget's table and frontier plot (plain SVG)."""

import xml.etree.ElementTree as ElementTree

from lowbit.tools.dev.bench_budget import frontier_svg, markdown

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
