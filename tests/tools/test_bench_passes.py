"""bench_passes' tables: one row per variant, a cell per (bits, method, axis), ratios against the base."""

from lowbit.tools.dev.bench_passes import VARIANTS, latency_table, quality_table


def test_quality_table_has_a_row_per_variant_and_marks_missing_and_crashed_cells():
    rows = {
        "fp32": {"quality": 43.0},
        "W3 rtn oc | base": {"quality": 173.4, "bytes": 100 * 2**20},
        "W3 gptq adadim | + outliers 0.5 %": {"quality": 62.19, "bytes": 104 * 2**20},
        "W3 rtn oc | + layer split": {"error": "ValueError: x"},
    }
    lines = quality_table(rows, [3]).splitlines()
    assert lines[2] == "| variant | W3 rtn oc | W3 rtn adadim | W3 gptq oc | W3 gptq adadim | MiB (W3 rtn oc) |"
    body = {line.split(" | ")[0][2:]: line for line in lines[4:]}
    assert list(body) == list(VARIANTS)
    assert body["base"] == "| base | 173.4 | - | - | - | 100.0 |"
    assert body["+ outliers 0.5 %"] == "| + outliers 0.5 % | - | - | - | 62.19 | - |"
    assert body["+ layer split"] == "| + layer split | crashed | - | - | - | - |"


def test_latency_table_divides_by_the_base_of_the_same_form():
    rows = [
        ("base", "portable", 2**20, {128: 0.2, 1: 0.04}),
        ("base", "fused", 2**20, {128: 0.1, 1: 0.01}),
        ("+ outliers 1 %", "portable", 2**20, {128: 0.3, 1: 0.05}),
        ("+ outliers 1 %", "fused", 2**20, {128: 0.11, 1: 0.012}),
    ]
    lines = latency_table(rows).splitlines()
    assert lines[4] == "| + outliers 1 % | portable | 1.0 | 300.0 | 1.50x | 50.0 | 1.25x |"
    assert lines[5] == "| + outliers 1 % | fused | 1.0 | 110.0 | 1.10x | 12.0 | 1.20x |"
