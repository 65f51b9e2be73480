"""bench_matmul: the last-level cache from sysfs, the cycled (non-resident) models, the tables' arithmetic."""

import xml.etree.ElementTree as ElementTree

import numpy as np
import onnxruntime as ort
import pytest

from lowbit.kernels import reference
from lowbit.kernels.model import QuantMatMulWeights
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme
from lowbit.tools.dev import bench_matmul
from lowbit.tools.dev.bench_matmul import Bench, Result, bytes_ratio, copies_for, make_kernel, tables


def _cache(root, index, level, kind, size):
    folder = root / f"index{index}"
    folder.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size)):
        (folder / name).write_text(f"{value}\n")


def test_last_level_cache_is_the_highest_data_or_unified_level(tmp_path):
    _cache(tmp_path, 0, 1, "Data", "48K")
    _cache(tmp_path, 1, 1, "Instruction", "64K")
    _cache(tmp_path, 2, 2, "Unified", "2048K")
    _cache(tmp_path, 3, 3, "Unified", "30M")
    assert bench_matmul.last_level_cache_bytes(tmp_path) == 30 << 20


def test_last_level_cache_missing_is_an_error_naming_the_flag(tmp_path):
    with pytest.raises(RuntimeError, match="--llc-bytes"):
        bench_matmul.last_level_cache_bytes(tmp_path / "absent")


@pytest.mark.parametrize("nbytes", [1, 1000, 4096, 10**6, 3 * 10**8])
def test_copies_exceed_the_multiple_of_the_cache_by_less_than_one_copy(nbytes):
    llc, multiple = 30 << 20, 2.5
    copies = copies_for(nbytes, llc, multiple)
    assert copies * nbytes > multiple * llc
    assert copies == 1 or (copies - 1) * nbytes <= multiple * llc


def _run(bench, kernel, k, n, copies, a):
    """Every copy's output of one run (the benchmark binds them all to one buffer; here each is read)."""
    sess = bench.session(kernel, k, n, copies)
    outputs = sess.run(None, {"A": a})
    assert len(outputs) == copies
    return outputs


def _copy_kernel(kernel, i):
    """The one-node kernel of copy ``i`` of a cycled model."""
    tensors = [
        (name, None if array is None else bench_matmul.distinct_copy(array, i)) for name, array in kernel.tensors
    ]
    return bench_matmul.Kernel(kernel.op_type, kernel.domain, kernel.attributes, tensors)


def test_cycled_copies_differ_in_content():
    """ONNX Runtime serves identical pre-packed weights from one buffer: the copies must differ."""
    kernel = make_kernel("nbits-acc4", np.random.default_rng(4).standard_normal((256, 64)).astype(np.float32))
    for _, array in kernel.tensors:
        copies = [bench_matmul.distinct_copy(array, i).tobytes() for i in range(3)]
        assert copies[0] == np.ascontiguousarray(array).tobytes() and len(set(copies)) == 3


def test_cycled_fp32_copies_each_compute_the_product():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 24)).astype(np.float32)
    a = rng.standard_normal((3, 40)).astype(np.float32)
    for i, y in enumerate(_run(Bench(1, 0.0), make_kernel("fp32", weight), 40, 24, 5, a)):
        np.testing.assert_allclose(y, a @ bench_matmul.distinct_copy(weight, i), rtol=1e-5, atol=1e-5)


def test_cycled_matmulnbits_matches_the_dequantized_weight():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((256, 32)).astype(np.float32)
    a = rng.standard_normal((2, 256)).astype(np.float32)
    expected = a @ quantize_rtn(weight, QuantScheme(bits=4, group_size=128, group_axis="oc")).dequantize()
    kernel = make_kernel("nbits-acc0", weight)
    outputs = _run(Bench(1, 0.0), kernel, 256, 32, 3, a)
    np.testing.assert_allclose(outputs[0], expected, rtol=1e-4, atol=1e-4)
    for i, y in enumerate(outputs):  # copy i computes with its own tensors
        np.testing.assert_allclose(y, _run(Bench(1, 0.0), _copy_kernel(kernel, i), 256, 32, 1, a)[0], rtol=1e-6)


@pytest.mark.parametrize("method", ["lowbit-ic3", "lowbit-oc2"])
def test_cycled_quant_matmul_matches_the_reference(ops_library, method):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((256, 192)).astype(np.float32)
    a = rng.standard_normal((4, 256)).astype(np.float32)
    scheme = QuantScheme(bits=int(method[-1]), group_size=128, group_axis=method[-3:-1])
    weights = QuantMatMulWeights.from_quantized(quantize_rtn(weight, scheme))
    kernel = make_kernel(method, weight)
    assert kernel.nbytes == weights.nbytes
    for i, y in enumerate(_run(Bench(1, 0.0), kernel, 256, 192, 2, a)):
        inputs = [None if x is None else bench_matmul.distinct_copy(x, i) for x in weights.inputs()]
        expected = reference.quant_matmul(a, *inputs, **weights.attributes)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fp32", "nbits-acc4", "lowbit-oc4"])
def test_sessions_copy_the_in_memory_weights(ops_library, method, monkeypatch):
    """Bench.session lets the data buffer go once the session exists: ONNX Runtime must have copied it."""
    buffers = []
    cycled = bench_matmul.cycled_model

    def keep(*args):
        model, data = cycled(*args)
        buffers.append(data)
        return model, data

    monkeypatch.setattr(bench_matmul, "cycled_model", keep)
    weight = np.random.default_rng(3).standard_normal((256, 128)).astype(np.float32)
    sess = Bench(1, 0.0).session(make_kernel(method, weight), 256, 128, 2)
    a = np.ones((1, 256), np.float32)
    before = sess.run(None, {"A": a})
    buffers[0][:] = 0
    for y0, y1 in zip(before, sess.run(None, {"A": a})):
        np.testing.assert_array_equal(y0, y1)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown method 'lowbit-xx4'"):
        make_kernel("lowbit-xx4", np.zeros((4, 4), np.float32))


def _result(method, m, seconds, nbytes, mode="non-resident"):
    return Result(64, 64, mode, m, method, nbytes, 7, seconds, seconds)


def test_bytes_ratio_is_one_when_time_follows_bytes():
    row = {"lowbit-oc4": _result("lowbit-oc4", 1, 1.0, 400), "lowbit-oc3": _result("lowbit-oc3", 1, 0.9, 300)}
    assert bytes_ratio(row, "lowbit-oc3") == pytest.approx(0.9 / 0.75)
    assert bytes_ratio({"lowbit-ic3": row["lowbit-oc3"]}, "lowbit-ic3") is None  # no 4-bit cell of its axis


def test_tables_divide_by_the_baseline_and_the_bandwidth_of_their_mode():
    results = [
        _result("fp32", 1, 4e-3, 4_000_000),
        _result("lowbit-oc4", 1, 1e-3, 500_000),
        _result("lowbit-oc2", 1, 0.6e-3, 250_000),
        _result("lowbit-ic2", 1, 0.66e-3, 250_000),
        _result("fp32", 1, 1e-3, 4_000_000, "resident"),
    ]
    text = tables(results, {"non-resident": 1e9, "resident": 8e9})
    lines = text.splitlines()
    assert "### 64x64, non-resident" in lines and "### 64x64, resident" in lines
    non_resident = lines[: lines.index("### 64x64, resident")]
    assert "| 1 | 4000.0 | 1000.0 | 600.0 | 660.0 |" in non_resident  # us
    assert "| 1 | 1.00x | 4.00x | 6.67x | 6.06x |" in non_resident  # speed-up over fp32
    assert "| 1 | 100 | 50 | 42 | 38 |" in non_resident  # %dram of 1 GB/s
    assert "| 1 | 1.20 | - |" in non_resident  # oc2 vs bytes; ic2 has no ic4 cell
    assert "| 1 | 1.10 |" in non_resident  # ic2 / oc2
    resident = lines[lines.index("### 64x64, resident") :]
    assert "| 1 | 50 |" in resident  # %cache of 8 GB/s


def test_svg_has_a_bar_per_result_and_parses():
    results = [
        _result(method, m, 1e-3 * (i + 1), 100) for i, method in enumerate(["fp32", "lowbit-ic4"]) for m in (1, 8)
    ]
    root = ElementTree.fromstring(bench_matmul.svg_bars(results))
    assert len(root.findall("{http://www.w3.org/2000/svg}rect")) == len(results)


def test_thread_clock_probes_bandwidth_with_ort_on_its_own_thread(ops_library, capsys):
    args = ["--quick", "--threads", "1", "--clock", "thread", "--shapes", "64x64", "--batches", "1"]
    assert bench_matmul.main([*args, "--llc-bytes", str(1 << 20), "--methods", "fp32", "--modes", "resident"]) == 0
    assert "streaming read (ORT fp32 MatMul of one row, one thread, its CPU time)" in capsys.readouterr().out


def test_main_quick_prints_both_modes(ops_library, capsys, tmp_path):
    args = ["--quick", "--threads", "1", "--shapes", "128x64", "--batches", "1", "2", "--llc-bytes", str(1 << 20)]
    args += ["--methods", "fp32", "lowbit-oc4", "lowbit-oc3", "--json", str(tmp_path / "r.json")]
    assert bench_matmul.main(args) == 0
    out = capsys.readouterr().out
    assert "### 128x64, non-resident" in out and "### 128x64, resident" in out
    assert f"ONNX Runtime {ort.__version__}" in out
    assert (tmp_path / "r.json").is_file()


def test_thread_clock_needs_one_thread():
    with pytest.raises(ValueError, match="needs --threads 1"):
        Bench(2, 0.0, clock="thread")
    bench = Bench(1, 0.0, clock="thread")
    kernel = make_kernel("fp32", np.ones((64, 64), np.float32))
    median, best = bench.time_session(bench.session(kernel, 64, 64, 2), np.ones((1, 64), np.float32), 64, 2)
    assert 0 < best <= median
