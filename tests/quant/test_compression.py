"""Joint compression plans (sparsity + bits): prediction against measurement, JSON round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import quant

f64 = torch.float64


class TwoBranches(nn.Module):
    """``A x + B x``: MSE is exactly quadratic in (A, B), with cross-layer terms A-B."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.a(x) + self.b(x)


def _data(seed=0, n=64, classes=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=f64)
    y = torch.randn(n, 3, generator=g, dtype=f64) if classes is None else torch.randint(0, classes, (n,), generator=g)
    return x, y


def _batches(data, k=8):
    return list(zip(data[0].chunk(k), data[1].chunk(k)))


def _loss(model, loss_fn, data):
    with torch.no_grad():
        return float(loss_fn(model(data[0]), data[1]))


def test_prediction_of_pruning_plus_quantization_is_exact_on_a_quadratic_with_cross_terms():
    torch.manual_seed(0)
    dense = TwoBranches().to(f64)
    loss_fn, data = nn.MSELoss(), _data()
    pruned = copy.deepcopy(dense)
    result = quant.prune(pruned, loss_fn, _batches(data), sparsity=0.5, num_gradients=8, damping=1e-2)
    plan = quant.CompressionPlan({"a": 4, "b": 3}, result.mask)
    compressed = plan.apply(pruned)
    pred = quant.predict_compression(dense, compressed, loss_fn, data)
    measured = _loss(compressed, loss_fn, data) - _loss(dense, loss_fn, data)
    assert pred.total == pytest.approx(measured, rel=1e-10, abs=1e-12)
    assert abs(pred.cross_layer_quadratic) > 1e-3 * abs(pred.quadratic)  # the cross-layer terms matter here
    assert pred.layers == ("a", "b")
    # the pattern survives quantization
    assert torch.equal(compressed.a.weight != 0, result.mask.masks["a"] & (compressed.a.weight != 0))
    assert not (compressed.a.weight[~result.mask.masks["a"]] != 0).any()


def test_prediction_tracks_the_measured_change_on_a_nonlinear_model():
    g = torch.Generator().manual_seed(1)
    dense = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(f64)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=f64))
    loss_fn, data = nn.CrossEntropyLoss(), _data(classes=4)
    pruned = copy.deepcopy(dense)
    result = quant.prune(pruned, loss_fn, _batches(data), sparsity=0.1, num_gradients=8, damping=1e-3)
    compressed = quant.CompressionPlan({"0": 8, "2": 8}, result.mask).apply(pruned)
    pred = quant.predict_compression(dense, compressed, loss_fn, data)
    measured = _loss(compressed, loss_fn, data) - _loss(dense, loss_fn, data)
    assert pred.total == pytest.approx(measured, rel=0.1)


def test_plan_json_round_trip_applies_both(tmp_path):
    torch.manual_seed(0)
    model = TwoBranches()
    mask = quant.prune(copy.deepcopy(model), sparsity=0.5, method="magnitude", scope="layer").mask
    plan = quant.CompressionPlan({"a": 4}, mask, method="joint")
    path = tmp_path / "plan.json"
    plan.to_json(path)
    payload = json.loads(path.read_text())
    assert payload["mask_file"] == "plan.json.mask.pt" and payload["bits"] == {"a": 4}
    loaded = quant.CompressionPlan.from_json(path)
    assert loaded == plan
    a, b = plan.apply(model), loaded.apply(model)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert plan.layers == ("a", "b")
    # a 4-bit, half-pruned layer a (12 kept x 4 bits + 24 map bits), b half-pruned at 32 bits, bias 3 x 32
    assert plan.size_bytes(model) == pytest.approx((12 * 4 + 24 + 12 * 32 + 24 + 3 * 32) / 8)
    for text in ["[]", '{"kind": "quant.CompressionPlan", "schema_version": 7}', "not json",
                 '{"kind": "quant.CompressionPlan", "schema_version": 1, "bits": {"a": 99}}',
                 '{"kind": "quant.CompressionPlan", "schema_version": 1, "bits": {}, "mask_file": "../x.pt"}']:
        path.write_text(text)
        with pytest.raises(quant.MaskFileError):
            quant.CompressionPlan.from_json(path)
