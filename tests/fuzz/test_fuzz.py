"""Short fuzz run with fixed seeds (the long run is ``tools/dev/fuzz.py``): generated graphs are valid, every
registry pass and random pass orders keep them valid and within their tolerance or bound, random
recipes through ``lowbit.optimize`` give valid models; and the harness does catch broken passes."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.passes.quant.scheme import QuantScheme
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from tests import factories
from tests.fuzz import registry
from tests.fuzz.generator import VARIANTS, Block, Spec, build, minimize, random_spec, smaller
from tests.fuzz.harness import FuzzFailure, check_order, check_pipeline, random_order
from tests.parity import check_valid, run, serialized

SEEDS = range(40)


def _spec(seed: int) -> Spec:
    return random_spec(np.random.default_rng(seed))


def test_generation_is_reproducible():
    assert serialized(build(_spec(3))) == serialized(build(_spec(3)))
    assert serialized(build(_spec(3))) != serialized(build(_spec(4)))
    assert Spec.from_dict(_spec(3).to_dict()) == _spec(3)


def test_generated_graphs_are_valid_and_cover_every_op_kind():
    seen = collections.Counter()
    for seed in SEEDS:
        spec = _spec(seed)
        model = build(spec)
        check_valid(model)
        assert all(np.isfinite(output).all() for output in run(model, factories.feeds_for(model)))
        seen.update(f"{block.kind}:{block.variant}" for block in spec.blocks)
        seen.update({f"rank {len(spec.batch) + 1}", "embedding" if spec.vocab else "float input"})
        seen["shared weight"] += len({id(node.inputs[1]) for node in model.graph if node.op_type == "MatMul"}) < sum(
            node.op_type == "MatMul" for node in model.graph
        )
    expected = {f"{kind}:{variant}" for kind, variants in VARIANTS.items() for variant in variants}
    assert expected | {"rank 2", "rank 3", "embedding", "float input", "shared weight"} <= set(seen)


def test_every_smaller_spec_still_builds_a_valid_graph():
    spec = _spec(11)
    for candidate in smaller(spec):
        check_valid(build(candidate))


@pytest.mark.parametrize("name", sorted(registry.PASSES))
def test_each_pass_keeps_its_contract(name):
    order = (["capture_calibration"] if registry.PASSES[name].needs_calibration else []) + [name]
    for seed in range(8):
        check_order(_spec(seed), ["fold_weights", *order], seed)


def test_quantize_then_fuse_then_clean_up():
    for seed in range(10):
        check_order(_spec(100 + seed), ["fold_weights", "quantize_rtn", "fuse_qdq", "cleanup"], seed)


@pytest.mark.parametrize("seed", range(60))
def test_random_pass_orders_keep_models_valid(seed):
    rng = np.random.default_rng(1000 + seed)
    spec = random_spec(rng)
    check_order(spec, random_order(rng, int(rng.integers(2, 7))), seed)


@pytest.mark.parametrize("seed", range(60))
def test_random_recipes_give_valid_models(seed):
    check_pipeline(_spec(2000 + seed), seed)


# --- the harness catches what it is meant to catch ----------------------------------------------


class _PerturbWeight(ir.passes.InPlacePass):
    """Scales the first float weight by 1.01 and says whether it did (``honest``) or not."""

    def __init__(self, honest: bool):
        super().__init__()
        self.honest = honest

    def call(self, model):
        value = next(
            v for v in model.graph.initializers.values() if v.const_value.size > 1 and v.dtype == ir.DataType.FLOAT
        )
        value.const_value = ir.tensor(value.const_value.numpy() * np.float32(1.01), name=value.name)
        return ir.passes.PassResult(model, modified=self.honest)


class _OffByOneCode(ir.passes.InPlacePass):
    """RTN quantization, then one code moved by one step: still valid ONNX, no longer the reference."""

    def __init__(self):
        super().__init__()
        self.scheme = QuantScheme(8, -1, "oc", symmetric=False)

    def call(self, model):
        result = QuantizeWeightsPass(self.scheme)(model)
        codes = next(node for node in model.graph if node.op_type == "DequantizeLinear").inputs[0]
        array = codes.const_value.numpy().copy()
        array.flat[0] = 255 - array.flat[0] if array.flat[0] in (0, 255) else array.flat[0] + 1
        codes.const_value = ir.tensor(array, name=codes.name)
        return result


_MLP = Spec(
    seed=0,
    batch=(3, 5),
    width=16,
    blocks=(Block("linear", "matmul", 8), Block("act", "Relu"), Block("linear", "matmul", 4)),
)


@pytest.mark.parametrize(
    "entry, kind",
    [
        (registry.Entry(lambda context: _PerturbWeight(honest=True), registry.LOSSLESS), "mismatch"),
        (registry.Entry(lambda context: _PerturbWeight(honest=False), registry.LOSSLESS), "contract"),
        (registry.Entry(lambda context: _PerturbWeight(honest=True), registry.ANALYSIS), "contract"),
        (registry.Entry(lambda context: _OffByOneCode(), registry.QUANTIZE, rtn_reference=True), "reference"),
    ],
)
def test_the_harness_catches_a_broken_pass(monkeypatch, entry, kind):
    monkeypatch.setitem(registry.PASSES, "broken", entry)
    with pytest.raises(FuzzFailure) as failure:
        check_order(_MLP, ["broken"], seed=0)
    assert failure.value.signature == ("broken", kind)


def test_minimize_keeps_the_failure_and_drops_the_rest():
    spec = dataclasses.replace(
        _MLP, batch=(4,), blocks=(*_MLP.blocks, Block("linear", "gemm_t", 24), Block("norm", "rms"))
    )

    def has_gemm(candidate: Spec) -> bool:
        return any(node.op_type == "Gemm" for node in build(candidate).graph)

    assert has_gemm(spec)
    small = minimize(spec, has_gemm)
    assert has_gemm(small)
    assert small.blocks == (Block("linear", "gemm_t", 1),) and small.batch == (1,) and small.width == 1
