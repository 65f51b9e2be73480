"""tools/dev/fuzz.py: a failure is minimized (graph and pass order), saved with its seed and error, and replays."""

from __future__ import annotations

import json

import onnx
import pytest

from lowbit.tools.dev import fuzz
from tests.fuzz import harness, registry
from tests.fuzz.generator import Block, Spec
from tests.fuzz.test_fuzz import _OffByOneCode


def test_a_failure_is_minimized_saved_and_replayed(tmp_path, monkeypatch):
    monkeypatch.setitem(
        registry.PASSES,
        "broken",
        registry.Entry(lambda context: _OffByOneCode(), registry.QUANTIZE, rtn_reference=True),
    )
    spec = Spec(
        seed=1,
        batch=(2, 3),
        width=16,
        blocks=(Block("norm", "rms"), Block("linear", "bias", 24), Block("act", "Relu"), Block("linear", "matmul", 8)),
    )
    case = {"seed": 5, "index": 9, "check_seed": 9, "order": ["fold_weights", "broken", "cleanup"]}
    with pytest.raises(harness.FuzzFailure) as failure:
        fuzz._check(harness, case, spec)
    folder = fuzz._minimize_and_save(fuzz._fuzz_modules()[0], harness, case, spec, failure.value, tmp_path)
    record = json.loads((folder / "failure.json").read_text())
    assert folder.name == "broken-reference-seed5-9"
    assert record["order"] == ["broken"] and record["original_order"] == case["order"]
    small = Spec.from_dict(record["spec"])
    assert len(small.blocks) == 1 and small.blocks[0].kind == "linear" and small.width == 1
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    for saved in (folder / "failure.json", folder, tmp_path):  # the file, its folder, the --out folder
        with pytest.raises(harness.FuzzFailure, match="reference"):
            fuzz.replay(saved)
    with pytest.raises(FileNotFoundError, match="no failure.json"):
        fuzz.replay(tmp_path / "nothing")


def test_a_short_run_counts_what_it_ran(tmp_path):
    counts = fuzz.fuzz(minutes=0.05, seed=0, out=tmp_path, max_blocks=4, pipeline_share=0.5)
    assert counts["graphs"] == counts["pass orders"] + counts["pipelines"] > 0
    assert counts["passes run"] >= counts["pass orders"]
    assert counts["distinct failures"] == len(list(tmp_path.iterdir()))
