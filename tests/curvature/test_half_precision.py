"""Half-precision models: what precision the products have, and float32 products on a bfloat16
model without copying it by hand (``compute_dtype=torch.float32``).

Stated tolerances (relative error of a product against the float64 product of the same weights,
tiny MLP, measured here 3e-3..4e-3 and 4e-4..5e-4): bfloat16 <= 2e-2, float16 <= 2.5e-3, bfloat16 weights computed in
float32 <= 1e-5 (measured 1e-7). ``curvature.precision`` documents the same figures.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import spectra
from curvature import GGN, EmpiricalFisher, Fisher, Hessian
from curvature.losses import TokenCrossEntropyLoss

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2.5e-3}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def mlp_problem(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    model = model.to(dtype)  # the reference below uses the same (rounded) weights in float64
    return model, (x.to(dtype), y)


def reference(Op, model, data, V, **kw):
    ref_model = copy.deepcopy(model).double()
    x, y = data
    return Op(ref_model, nn.CrossEntropyLoss(), (x.double(), y), **kw) @ V.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Op", [Hessian, GGN, Fisher, EmpiricalFisher])
def test_half_precision_products_against_float64(Op, dtype):
    model, data = mlp_problem(dtype)
    op = Op(model, nn.CrossEntropyLoss(), data)
    assert op.dtype == dtype
    V = torch.randn(op.shape[0], 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert rel_err(op @ V, reference(Op, model, data, V)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("Op", [Hessian, GGN, Fisher, EmpiricalFisher])
def test_float32_products_on_a_bfloat16_model(Op):
    model, data = mlp_problem(torch.bfloat16)
    op = Op(model, nn.CrossEntropyLoss(), data, compute_dtype=torch.float32)
    assert op.dtype == torch.float32 and next(model.parameters()).dtype == torch.bfloat16
    V = torch.randn(op.shape[0], 4, generator=torch.Generator().manual_seed(2))
    assert rel_err(op @ V, reference(Op, model, data, V)) <= 1e-5
    # The copy follows the model: change a weight in place, the products change with it.
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    assert rel_err(op @ V, reference(Op, model, data, V)) <= 1e-5


def test_compute_dtype_with_parameter_tensors_and_a_token_loss():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Tanh(), nn.Linear(5, 7)).to(torch.bfloat16)
    tokens = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(4))
    labels = tokens.masked_fill(torch.rand(3, 5, generator=torch.Generator().manual_seed(5)) < 0.3, -100)
    G = GGN(model, TokenCrossEntropyLoss(shift=True), (tokens, labels), params=[model[2].weight],
            compute_dtype=torch.float32)
    ref = GGN(copy.deepcopy(model).double(), TokenCrossEntropyLoss(shift=True), (tokens, labels),
              params=["2.weight"])
    V = torch.randn(G.shape[0], 3, generator=torch.Generator().manual_seed(6))
    assert [b.name for b in G.blocks] == ["2.weight"]
    assert rel_err(G @ V, ref @ V.double()) <= 1e-5


def test_top_eigenvalue_of_a_bfloat16_ggn():
    model, data = mlp_problem(torch.bfloat16)
    G = GGN(model, nn.CrossEntropyLoss(), data)
    ref = GGN(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), (data[0].double(), data[1]))
    want = torch.linalg.eigvalsh(ref.to_dense())[-1].item()
    res = spectra.eigsh(G, k=1, tol=1e-2, generator=torch.Generator().manual_seed(0))
    assert abs(res.eigenvalues[0].item() - want) <= 2e-2 * want  # the bfloat16 recurrence was 28% off
