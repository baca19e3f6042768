"""quant.layers: quantizable layers and MACs over the case registry (issue 21 item 5, issue 22)."""

import pytest
import torch
from torch import nn

import quant
from tests.cases import SEQ, problem


def test_a_module_called_twice_counts_both_calls():
    p = problem("called_twice", "ce", "single_batch")
    macs = quant.layer_macs(p.model, quant.quantizable_layers(p.model), p.data)
    assert macs == {"inp": 4 * 5, "shared": 2 * 5 * 5, "out": 5 * 3}  # shared was 25


def test_a_tied_head_counts_under_the_layer_that_names_the_weight():
    p = problem("tied_lm", "token_ce", "single_batch")
    layers = quant.quantizable_layers(p.model)
    assert list(layers) == ["embed", "mix"]  # the head's weight is the embedding's
    macs = quant.layer_macs(p.model, layers, p.data)
    vocab, width = p.model.embed.weight.shape
    assert macs == {"embed": SEQ * width * vocab, "mix": SEQ * width * width}  # embed was 0


def test_bops_of_a_tied_lm_include_the_head():
    p = problem("tied_lm", "token_ce", "single_batch")
    sens = quant.sensitivity(p.model, p.loss_fn, p.data, num_matvecs=2, generator=torch.Generator().manual_seed(0))
    plan = quant.make_plan(p.model, sens, 4)
    vocab, width = p.model.embed.weight.shape
    assert plan.bops == 16 * SEQ * (width * vocab + width * width)


@pytest.fixture(scope="module")
def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).double().eval()
    return model


def test_gpt2_conv1d_is_quantizable_with_its_output_axis(tiny_gpt2):
    from transformers.pytorch_utils import Conv1D

    layers = quant.quantizable_layers(tiny_gpt2)
    conv = [n for n, m in layers.items() if isinstance(m, Conv1D)]
    assert conv == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                    "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    m = layers["transformer.h.0.mlp.c_fc"]  # weight (8, 32): (in, out)
    assert quant.channel_axis(m) == 1
    plan = quant.BitPlan({"transformer.h.0.mlp.c_fc": 4}, size_bytes=0, bops=0, omega=0)
    q = plan.quantized_weights(tiny_gpt2)["transformer.h.0.mlp.c_fc"]
    expected = quant.quantize_weight(m.weight.detach().T, 4).T  # one scale per output column
    assert torch.equal(q, expected)


def test_gpt2_macs_count_every_token_and_the_tied_head(tiny_gpt2):
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    layers = quant.quantizable_layers(tiny_gpt2)
    macs = quant.layer_macs(tiny_gpt2, layers, (tokens, tokens))
    T, d, V = 5, 8, 11
    assert macs["transformer.h.0.attn.c_attn"] == T * d * 3 * d
    assert macs["transformer.h.0.mlp.c_fc"] == T * d * 4 * d
    assert macs["transformer.h.0.mlp.c_proj"] == T * 4 * d * d
    assert macs["transformer.wte"] == T * d * V  # the LM head is tied to wte
    assert macs["transformer.wpe"] == 0


def test_other_module_is_not_quantizable():
    assert not quant.is_quantizable(nn.LayerNorm(3))


def test_gpt2_end_to_end_sensitivity_and_plan(tiny_gpt2):
    from curvature import TokenCrossEntropyLoss

    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    loss_fn = TokenCrossEntropyLoss(shift=True)
    sens = quant.sensitivity(tiny_gpt2, loss_fn, (tokens, tokens), num_matvecs=4,
                             generator=torch.Generator().manual_seed(0))
    assert "transformer.h.0.mlp.c_fc" in sens and "lm_head" not in sens
    budget = quant.make_plan(tiny_gpt2, sens, 4).size_bytes
    plans = [quant.allocate_bits(tiny_gpt2, sens, max_size_bytes=budget, method=m) for m in ("ilp", "pareto")]
    assert plans[0].omega == pytest.approx(plans[1].omega, rel=1e-9)
    ev = plans[0].evaluate(tiny_gpt2, loss_fn, (tokens, tokens))
    assert 0.0 <= ev.accuracy <= 1.0 and ev.num_predictions == 8  # shifted: 4 predictions per sequence
