"""Fixtures of the pass tests: the random Qwen2 exported once per test session."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from tests.passes.test_reorder_channels import export_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_qwen2():
    """A factory of fresh copies of the exported random Qwen2."""
    proto = export_tiny_qwen2()
    return lambda: ir.from_proto(proto)
