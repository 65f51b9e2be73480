"""A random-weight Llama (real architecture, tiny config) through export -> optimize -> ONNX Runtime."""

import numpy as np
import pytest
import torch

import lowbit
from tests.parity import check_valid, run

transformers = pytest.importorskip("transformers", reason="the 'models' extra (transformers) is not installed")


class CausalLM(torch.nn.Module):
    """input_ids -> logits, no KV cache: the form lowbit exports causal LMs in."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    module = CausalLM(transformers.LlamaForCausalLM(config)).eval()
    ids = torch.randint(0, 96, (2, 12))
    return module, ids


def _export(tiny_llama):
    module, ids = tiny_llama
    return lowbit.export(
        module, (ids,), dynamic_shapes={"input_ids": {1: "seq"}}, input_names=["input_ids"], output_names=["logits"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_tiny_llama_quantizes_every_linear_but_the_tied_head(tiny_llama, axis):
    module, ids = tiny_llama
    model = _export(tiny_llama)
    feeds = {"input_ids": ids.numpy()}
    (float_logits,) = run(model, feeds)
    with torch.no_grad():
        np.testing.assert_allclose(float_logits, module(ids).numpy(), rtol=1e-4, atol=1e-4)

    result = lowbit.optimize(model, lowbit.Recipe(bits=8, group_size=32, axis=axis))
    check_valid(result.model)
    layers = sorted(record.layer.rsplit(".", 1)[-1] for record in result.report.weights)
    assert layers == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] * 2)
    assert sorted(skipped.kind for skipped in result.report.skipped) == ["embedding", "lm_head"]
    (quant_logits,) = run(result.model, feeds)
    relative = np.linalg.norm(quant_logits - float_logits) / np.linalg.norm(float_logits)
    assert relative < 0.02  # 8-bit g32 RTN on random weights


@pytest.mark.slow
@pytest.mark.parametrize("selector, modules", [("block", 4), ("layer", 2)])
def test_graph_selectors_never_end_worse_than_the_matrix_choice(tiny_llama, selector, modules):
    module, ids = tiny_llama
    model = _export(tiny_llama)
    batches = [{"input_ids": torch.randint(0, 96, (2, 16)).numpy()} for _ in range(6)]
    recipe = lowbit.Recipe(bits=2, group_size=16, axis="adadim", method="rtn", selector=selector)
    result = lowbit.optimize(model, recipe, calibration=batches)
    check_valid(result.model)
    selection = next(p for p in result.report.passes if p.name == "QuantizeWeightsPass").details["selection"]
    assert selection["modules"] == modules  # (self_attn, mlp) x 2 layers, or the 2 decoder layers
    assert selection["final_error"] <= selection["start_error"]
    assert all(set(w.axis_errors) == {"oc", "ic"} for w in result.report.weights)
    axes = {
        node.inputs[0].name: node.attributes.get_int("axis")
        for node in result.model.graph
        if node.op_type == "DequantizeLinear"
    }
    assert len(axes) == len(result.report.weights) == 14
