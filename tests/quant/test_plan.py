import json

import pytest
import torch
from torch import nn

import quant
from quant import BitPlan
from tests.quant.dense import tiny_data, tiny_mlp

LOSS = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def setup():
    model, data = tiny_mlp(), tiny_data()
    sens = quant.sensitivity(model, LOSS, data, num_matvecs=16, generator=torch.Generator().manual_seed(0))
    return model, data, sens


def test_json_round_trip(setup, tmp_path):
    model, _, sens = setup
    plan = quant.allocate_bits(model, sens, max_size_bytes=quant.make_plan(model, sens, 4).size_bytes)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    payload = json.loads(path.read_text())
    assert payload["schema_version"] == 1
    assert payload["bits"] == dict(plan.bits) and payload["quantizer"] == {"symmetric": True, "per_channel": True}
    again = BitPlan.from_json(path)
    assert again == plan and dict(again.omega_per_layer) == dict(plan.omega_per_layer)
    assert again.finetune_order == plan.finetune_order
    payload["schema_version"] = 2
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="schema_version"):
        BitPlan.from_json(path)


def test_apply_returns_quantized_copy_and_leaves_original(setup):
    model, data, sens = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = quant.make_plan(model, sens, {"0": 2, "2": 4, "4": 8})
    q = plan.apply(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert q is not model
    for name, bits in plan.bits.items():
        w = dict(model.named_modules())[name].weight
        qw = dict(q.named_modules())[name].weight
        assert torch.equal(qw, quant.quantize_weight(w, bits))
        levels = torch.unique(torch.round(qw / quant.quantize(w, bits).scale)).numel()
        assert levels <= 2**bits
    assert torch.equal(dict(q.named_modules())["0"].bias, model[0].bias)  # biases stay
    ev = plan.evaluate(model, LOSS, data)
    direct = quant.evaluate_model(q, LOSS, data)
    assert ev == direct and 0 <= ev.accuracy <= 1
    x, y = data
    assert ev.loss == pytest.approx(LOSS(q(x), y).item(), rel=1e-12)


def test_evaluate_weights_batches_by_size(setup):
    model, data, _ = setup
    x, y = data
    whole = quant.evaluate_model(model, LOSS, data)
    parts = quant.evaluate_model(model, LOSS, [(x[:7], y[:7]), (x[7:], y[7:])])
    assert parts.loss == pytest.approx(whole.loss, rel=1e-12) and parts.accuracy == whole.accuracy
    custom = quant.evaluate_model(model, LOSS, data, metric=lambda out, t: (out.argmax(-1) == t).double().mean())
    assert custom.metric == pytest.approx(whole.accuracy) and custom.accuracy is None


def test_finetune_order_is_descending_omega():
    plan = BitPlan({"a": 4, "b": 8, "c": 2}, size_bytes=1, bops=0, omega=6,
                   omega_per_layer={"a": 1.0, "b": 0.5, "c": 4.5})
    assert plan.finetune_order == ("c", "a", "b")


def test_plan_errors(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="1..32"):
        BitPlan({"0": 0}, size_bytes=1, bops=0, omega=0)
    with pytest.raises(ValueError, match="1..32"):
        BitPlan({"0": 33}, size_bytes=1, bops=0, omega=0)
    with pytest.raises(ValueError, match="no module named 'conv9'"):
        BitPlan({"conv9": 4}, size_bytes=1, bops=0, omega=0).apply(model)
    with pytest.raises(ValueError, match="not in bits"):
        BitPlan({"0": 4}, size_bytes=1, bops=0, omega=0, omega_per_layer={"2": 1.0})
    with pytest.raises(ValueError, match="empty"):
        quant.evaluate_model(model, LOSS, [])
    plan = BitPlan({"0": 4}, size_bytes=1, bops=0, omega=0)
    with pytest.raises(AttributeError):
        plan.size_bytes = 3
    with pytest.raises(TypeError):
        plan.bits["0"] = 8
