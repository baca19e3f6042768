"""Hutchinson diagonals from a plain closure: finite differences against the exact Hessian, the
same probes as ``estimators.diagonal``, bit-exact restoration, RNG replay, data-parallel probes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature
import estimators
from curvature.optim import AdaHessian, Sophia
from curvature.optim._hessian_diagonal import RNGReplay, draw_param_probes, fd_products, operator_products
from tests.matrices import rel
from tests.optim.problems import classification_batches, f64, mlp

ce = nn.CrossEntropyLoss()


def _closure(model, X, y):
    def closure():
        model.zero_grad()
        loss = ce(model(X), y)
        loss.backward()
        return loss

    return closure


def _grads(model):
    for p in model.parameters():
        p.grad = None
    return [p for p in model.parameters()]


def test_same_probes_as_estimators_diagonal_and_exact_operator_path():
    model = mlp(dtype=f64)
    (X, y), = classification_batches(1, dtype=f64)
    H = curvature.Hessian(model, ce, (X, y))
    params = list(model.parameters())
    probes = draw_param_probes(params, torch.Generator().manual_seed(7))
    ours = torch.cat([(u * hu).flatten() for u, hu in zip(probes, operator_products(H, params, probes))])
    ref = estimators.diagonal(H, num_matvecs=1, generator=torch.Generator().manual_seed(7)).value
    assert rel(ours, ref) <= 1e-12


@pytest.mark.parametrize("scheme, tol", [("central", 2e-4), ("forward", 3e-3)])
def test_finite_differences_match_the_exact_hutchinson_diagonal_in_float32(scheme, tol):
    # float32 tanh MLP (P = 1100) against the float64 exact product with the same probe.
    model = mlp(dtype=torch.float32, sizes=(10, 60, 8))
    (X, y), = classification_batches(1, dtype=torch.float32, batch=64, dim=10, classes=8)
    closure = _closure(model, X, y)
    closure()
    params = list(model.parameters())
    probes = draw_param_probes(params, torch.Generator().manual_seed(0))
    fd = torch.cat([(u * hu).flatten() for u, hu in zip(probes, fd_products(
        params, closure, probes, scheme=scheme))])
    model64 = mlp(dtype=f64, sizes=(10, 60, 8))
    H = curvature.Hessian(model64, ce, (X.double(), y))
    exact = torch.cat([(u.double() * hu).flatten() for u, hu in zip(
        probes, operator_products(H, list(model64.parameters()), [u.double() for u in probes]))])
    err = rel(fd.double(), exact)
    assert err <= tol, err
    # The FD error is far below the spread of a single Hutchinson sample around diag(H).
    assert err < 0.01 * rel(exact, torch.diagonal(H.to_dense()))


def test_parameters_grads_buffers_and_rng_are_restored_bit_exactly_and_dropout_is_replayed():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
    model.train()
    (X, y), = classification_batches(1, batch=40, dim=5, classes=3)
    closure = _closure(model, X, y)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        rng = RNGReplay(list(model.parameters()))
        closure()
        rng.mark_after()
        after_one_call = torch.get_rng_state()
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        grads = [p.grad for p in params]
        buffers = [b.clone() for b in model.buffers()]
        probes = draw_param_probes(params, torch.Generator().manual_seed(1))
        hu = fd_products(params, closure, probes, scheme="central", rng=rng, model=model)
        assert torch.equal(torch.get_rng_state(), after_one_call)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert all(p.grad is g for p, g in zip(params, grads))
        assert all(torch.equal(b, b0) for b, b0 in zip(model.buffers(), buffers))
        # Exact product of the loss with the SAME dropout mask (replayed RNG) and batch statistics.
        torch.set_rng_state(rng.before[0])
        out = ce(model(X), y)
        g = torch.autograd.grad(out, params, create_graph=True)
        exact = torch.autograd.grad(sum((gi * u).sum() for gi, u in zip(g, probes)), params)
    assert rel(torch.cat([h.flatten() for h in hu]), torch.cat([e.flatten() for e in exact])) <= 1e-3


def test_rademacher_probes_are_unbiased_not_constant():
    # Regression (pytorch_optimizer's sampler returned -1 always): on H = [[2,1],[1,3]] the mean of
    # u ⊙ Hu is diag(H) = (2, 3), not the row sums (3, 4).
    w = nn.Parameter(torch.zeros(2, dtype=f64))
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=f64)

    def closure():
        w.grad = None
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    gen = torch.Generator().manual_seed(0)
    closure()
    samples = []
    for _ in range(4000):
        (u,) = draw_param_probes([w], gen)
        (hu,) = fd_products([w], closure, [u], scheme="central")
        samples.append(u * hu)
    S = torch.stack(samples)
    assert set(S.new_tensor([-1.0, 1.0]).tolist()) == set(torch.stack(
        draw_param_probes([w], torch.Generator().manual_seed(1))).flatten().tolist() + [1.0, -1.0])
    mean, se = S.mean(0), S.std(0) / len(samples) ** 0.5
    assert torch.all((mean - torch.tensor([2.0, 3.0], dtype=f64)).abs() <= 3 * se)
    assert torch.all((mean - torch.tensor([3.0, 4.0], dtype=f64)).abs() > 10 * se)


@pytest.mark.parametrize("make", [
    lambda p, g: Sophia(p, lr=0.01, update_period=1, generator=g),
    lambda p, g: AdaHessian(p, lr=0.01, generator=g),
])
def test_data_parallel_ranks_draw_the_same_probes_and_the_estimate_of_the_mean_loss_is_the_mean(make):
    # Regression (official AdaHessian's all-reduce was a no-op): with the same seed two "ranks"
    # draw identical probes, so the curvature of the rank-averaged loss (what DDP's averaged
    # gradients difference to) is the average of the per-rank estimates.
    shards = classification_batches(2, dtype=f64)
    states = []
    for which in (0, 1, None):
        model = mlp(dtype=f64)
        opt = make(list(model.parameters()), torch.Generator().manual_seed(5))

        def closure(opt=opt, model=model, which=which):
            opt.zero_grad()
            data = shards if which is None else [shards[which]]
            loss = sum(ce(model(X), y) for X, y in data) / len(data)
            loss.backward()
            return loss

        opt.step(closure)
        key = "hessian" if isinstance(opt, Sophia) else "exp_hessian_diag_sq"
        states.append([opt.state[p][key].clone() for p in model.parameters()])
    if key == "hessian":  # h = (1 - β2) u ⊙ Hu is linear in the loss
        for a, b, both in zip(*states):
            assert rel(both, (a + b) / 2) <= 1e-6
    else:  # magnitudes: the averaged-loss estimate is |mean| <= mean of magnitudes
        for a, b, both in zip(*states):
            assert torch.all(both.sqrt() <= (a.sqrt() + b.sqrt()) / 2 + 1e-9)
