"""The README's main job (``lowbit demo``), run small on MiniLM: every row is built, fused and measured."""

import argparse
import shutil

import pytest

from lowbit.tools import demo

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_demo_rows_on_minilm(minilm_onnx, texts_available, ops_library, tmp_path, capsys):
    shutil.copy(minilm_onnx, tmp_path / "minilm.fp32.onnx")  # the demo reuses an export in its workdir
    args = argparse.Namespace(
        workdir=str(tmp_path), model="minilm", bits=[4], axes=["ic"], group_size=128, gptq_bits=[4],
        calibration_windows=2, form="fused", windows=1, length=64,
    )
    demo.main(args)
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| W") or line.startswith("| fp32")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["fp32", "W4 g128 ic RTN (fused)", "W4 g128 AdaDim GPTQ (fused)",
                     "W4 g128 AdaDim GPTQ + 0.5% outliers (fused)", "W4 g128 ic RTN (fused) + embedding/head"]
    cosines = [float(row.split("|")[4]) for row in rows]
    assert cosines[0] == 1.0 and all(0.8 < c < 1.0 for c in cosines[1:])
    assert cosines[3] > cosines[2]  # the outliers kept exact help
    assert len(list(tmp_path.glob("minilm.w4.*.onnx"))) == 4
