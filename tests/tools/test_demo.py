"""The README's main job (``lowbit demo``), run small on MiniLM: every row is built, fused and measured,
printed as it comes, and a second run reuses what the first made."""

import argparse
import shutil

import pytest

from lowbit.tools import demo, models

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _table_rows(out: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in out.splitlines()
        if line.startswith("| W") or line.startswith("| fp32")
    ]


def test_demo_rows_on_minilm_then_reused(minilm_onnx, texts_available, ops_library, tmp_path, capsys):
    shutil.copy(minilm_onnx, tmp_path / "minilm.fp32.onnx")  # the demo reuses an export in its workdir
    args = argparse.Namespace(
        workdir=str(tmp_path),
        model="minilm",
        bits=[4],
        axes=["ic"],
        group_size=128,
        gptq_bits=[4],
        choice_method="rtn",
        outliers=True,
        whole_file=True,
        calibration_windows=2,
        form="fused",
        windows=1,
        length=64,
    )
    demo.main(args)
    captured = capsys.readouterr()
    rows = _table_rows(captured.out)
    names = [row[0] for row in rows]
    assert names == [
        "fp32",
        "W4 g128 ic RTN (fused)",
        "W4 g128 AdaDim GPTQ (fused)",
        "W4 g128 AdaDim GPTQ + 0.5% outliers (fused)",
        "W4 g128 ic RTN (fused) + embedding/head",
    ]
    cosines = [float(row[3]) for row in rows]
    assert cosines[0] == 1.0 and all(0.8 < c < 1.0 for c in cosines[1:])
    assert cosines[3] > cosines[2]  # the outliers kept exact help
    assert len(list(tmp_path.glob("minilm.w4.*.onnx"))) == 4
    assert all(float(row[7]) > 0 for row in rows[1:])  # optimize seconds, made now
    for index, name in enumerate(names[1:], 2):
        assert f"[{index}/5] {name}" in captured.err  # progress names each row as it starts

    demo.main(args)  # same recipes: every quantized file is reused, and measured again
    again = _table_rows(capsys.readouterr().out)
    assert [row[0] for row in again] == names and all(row[7] == "reused" for row in again[1:])
    assert [float(row[3]) for row in again] == pytest.approx(cosines, abs=1e-6)

    args.calibration_windows = 3  # the calibrated rows' recipe changed: those are made again
    demo.main(args)
    third = _table_rows(capsys.readouterr().out)
    assert [row[7] == "reused" for row in third[1:]] == [True, False, False, True]


def test_export_cache_copies_a_second_export(minilm_available, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    first = models.export_minilm(tmp_path / "a.onnx", cache=True)
    cached = list((tmp_path / "cache").glob("minilm.fp32.*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.read_bytes()

    def no_export(*args, **kwargs):
        raise AssertionError("the cached export should have been copied")

    monkeypatch.setattr(models, "export_sentence_embedding", no_export)
    second = models.export_minilm(tmp_path / "b.onnx", cache=True)
    assert second.read_bytes() == first.read_bytes()
    with pytest.raises(AssertionError, match="should have been copied"):
        models.export_minilm(tmp_path / "c.onnx")  # cache=False exports for real
