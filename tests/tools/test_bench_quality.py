"""bench_quality's tables: layer types without the layer index, per-IC counts per type."""

from lowbit.tools.dev.bench_quality import axis_choice_table, layer_type


def test_layer_type_drops_the_layer_index():
    assert layer_type("model.layers.17.mlp.down_proj") == "mlp.down_proj"
    assert layer_type("encoder.layer.3.attention.output.dense") == "attention.output.dense"
    assert layer_type("encoder.layer.3.output.dense") == "output.dense"  # not merged with the one above
    assert layer_type("lm_head") == "lm_head"


def test_axis_choice_table_counts_per_ic_choices_per_type():
    rows = {
        "fp32": {"quality": 1.0},
        "W4 lowbit rtn oc": {"quality": 0.9, "choices": {"a.q": {"oc": 2, "ic": 0}}},
        "W4 lowbit rtn adadim block": {
            "quality": 0.95,
            "choices": {"a.q": {"oc": 1, "ic": 3}, "b.v": {"oc": 0, "ic": 2}},
        },
        "W3 lowbit gptq adadim matrix": {"quality": 0.8, "choices": {"b.v": {"oc": 2, "ic": 0}}},
    }
    lines = axis_choice_table(rows).splitlines()
    assert lines[0] == "| row | a.q | b.v |"
    assert lines[2] == "| W4 lowbit rtn adadim block | 3/4 | 2/2 |"
    assert lines[3] == "| W3 lowbit gptq adadim matrix | - | 0/2 |"
    assert len(lines) == 4  # non-AdaDim rows are not listed


def test_markdown_has_a_line_per_row_with_clip_search_rows_apart(tmp_path):
    import pathlib

    from lowbit.tools.dev.bench_quality import LOWBIT_ROWS, Setting, markdown

    setting = Setting("smollm2", (4, 3), 128, 1, 8, 1, 8, pathlib.Path(tmp_path))
    rows = {
        "fp32": {"quality": 48.0, "bytes": 2**20},
        "W4 lowbit gptq adadim block": {"quality": 52.5, "bytes": 2**20},
        "W4 lowbit gptq adadim block + clip": {"quality": 50.5, "bytes": 2**20},
        "W3 lowbit gptq adadim block + clip": {"error": "ValueError: boom"},
    }
    lines = markdown(rows, setting, "perplexity").splitlines()
    assert len(lines) == 4 + 3 + len(LOWBIT_ROWS)  # fp32 line, blank, header, rule; ORT rows; lowbit rows
    assert "| lowbit gptq adadim block | 52.5 (1 MiB) | n/a |" in lines
    assert "| lowbit gptq adadim block + clip | 50.5 (1 MiB) | crashed |" in lines


def test_cached_rows_of_another_setting_are_refused(tmp_path):
    """A folder's cached rows were measured under one setting: another (other than the widths, by which rows are
    keyed) is refused, naming what differs, instead of mixing stale rows into the table."""
    import dataclasses
    import json
    import pathlib

    import pytest

    from lowbit.tools.dev.bench_quality import Bench, Setting

    (tmp_path / "smollm2.fp32.onnx").write_bytes(b"")  # Bench exports the model only when it is missing
    setting = Setting("smollm2", (3,), 128, 1, 8, 4, 8, pathlib.Path(tmp_path))
    bench = Bench(setting)
    bench.rows_path.write_text(json.dumps({"fp32": {"quality": 48.0, "bytes": 1}}))
    assert Bench(dataclasses.replace(setting, bits=(4,))).rows["fp32"]["quality"] == 48.0  # widths may change
    with pytest.raises(ValueError, match=r"another setting \(eval_windows 4 -> 10\): use another --out"):
        Bench(dataclasses.replace(setting, eval_windows=10))
