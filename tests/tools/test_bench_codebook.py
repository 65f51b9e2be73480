"""bench_codebook's rows: every format reconstructs the weight's shape and counts its stored bits."""

import numpy as np
import pytest

from lowbit.passes.quant.adadim import output_error
from lowbit.tools.dev import bench_codebook


@pytest.mark.parametrize("gptq", [False, True])
def test_every_format_reconstructs_and_counts_bits(gptq):
    rng = np.random.default_rng(0)
    weight = rng.standard_t(4, size=(768, 768)).astype(np.float32)
    activations = rng.normal(size=(1536, 768)) * rng.uniform(0.1, 3.0, 768)
    hessian = activations.T @ activations
    for fmt in bench_codebook.formats(3, 64, with_gptq=gptq):
        approx, bits = fmt.quantize(weight, hessian)
        assert approx.shape == weight.shape, fmt.name
        assert 3 * weight.size < bits < 4 * weight.size, fmt.name  # codes plus a fraction for scales or tables
        assert output_error(weight, approx, hessian) < output_error(weight, np.zeros_like(weight), hessian)


def test_adadim_row_keeps_the_lower_error_of_its_two_formats():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(128, 64)).astype(np.float32)
    hessian = np.diag(rng.uniform(0.01, 100.0, 128))
    first, second = bench_codebook.codebook_format(2, -1, "oc"), bench_codebook.codebook_format(2, -1, "ic")
    chosen, _ = bench_codebook.adadim(first, second).quantize(weight, hessian)
    errors = [output_error(weight, f.quantize(weight, hessian)[0], hessian) for f in (first, second)]
    assert output_error(weight, chosen, hessian) == min(errors)


def test_only_picks_rows_by_their_whole_printed_names():
    names = [fmt.name for fmt in bench_codebook.formats(3, 128, with_gptq=True)]
    assert all(bench_codebook._chosen(name, None) for name in names)
    picked = [name for name in names if bench_codebook._chosen(name, ["int3 g128 oc gptq + clip", "bcq3 g128 oc rtn"])]
    assert picked == ["bcq3 g128 oc rtn", "int3 g128 oc gptq + clip"]  # not the AdaDim row that contains one


def test_minilm_rows_measure_cosine_and_resume_from_their_cache(minilm_onnx, texts_available, tmp_path, monkeypatch):
    """On MiniLM: fp32 has cosine 1, the quantized row less, with its bits and output error; a second run reads
    the cached rows instead of quantizing again."""
    import shutil

    shutil.copy(minilm_onnx, tmp_path / "minilm.fp32.onnx")  # Bench reuses an export in its folder
    argv = [
        "--model",
        "minilm",
        "--calibration-windows",
        "1",
        "--out",
        str(tmp_path),
        "--only",
        "int3 g128 oc rtn + clip",
    ]
    rows = bench_codebook.run(bench_codebook.parse_args(argv))
    assert [row["format"] for row in rows] == ["fp32", "int3 g128 oc rtn + clip"]
    assert rows[0]["quality"] == pytest.approx(1.0, abs=1e-6)
    quantized = rows[1]
    assert 0.5 < quantized["quality"] < 1.0 and 3.0 < quantized["bits"] < 4.0 and 0 < quantized["output_error"] < 1
    assert "| int3 g128 oc rtn + clip | " in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(
        bench_codebook, "fake_quantize", lambda *args: pytest.fail("the cached row was quantized again")
    )
    assert bench_codebook.run(bench_codebook.parse_args(argv)) == rows
