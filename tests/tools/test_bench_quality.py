"""bench_quality's tables: layer types without the layer index, per-IC counts per type."""

from lowbit.tools.bench_quality import axis_choice_table, layer_type


def test_layer_type_drops_the_layer_index():
    assert layer_type("model.layers.17.mlp.down_proj") == "mlp.down_proj"
    assert layer_type("encoder.layer.3.attention.output.dense") == "attention.output.dense"
    assert layer_type("encoder.layer.3.output.dense") == "output.dense"  # not merged with the one above
    assert layer_type("lm_head") == "lm_head"


def test_axis_choice_table_counts_per_ic_choices_per_type():
    rows = {
        "fp32": {"quality": 1.0},
        "W4 lowbit rtn oc": {"quality": 0.9, "choices": {"a.q": {"oc": 2, "ic": 0}}},
        "W4 lowbit rtn adadim block": {"quality": 0.95, "choices": {"a.q": {"oc": 1, "ic": 3}, "b.v": {"oc": 0, "ic": 2}}},
        "W3 lowbit gptq adadim matrix": {"quality": 0.8, "choices": {"b.v": {"oc": 2, "ic": 0}}},
    }
    lines = axis_choice_table(rows).splitlines()
    assert lines[0] == "| row | a.q | b.v |"
    assert lines[2] == "| W4 lowbit rtn adadim block | 3/4 | 2/2 |"
    assert lines[3] == "| W3 lowbit gptq adadim matrix | - | 0/2 |"
    assert len(lines) == 4  # non-AdaDim rows are not listed
