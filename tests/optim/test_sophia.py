"""Sophia: the update rule against hand-computed numbers, the refresh schedule, Sophia-G's
estimator and scale, errors, resume, dtypes and parameter groups."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import curvature
from curvature.optim import NonFiniteError, Sophia
from tests.cases import CLOSURES
from tests.optim.problems import classification_batches, diagonal_quadratic, f64, mlp

HAND = dict(lr=0.1, betas=(0.5, 0.5), rho=2.0, weight_decay=0.0, update_period=2)


def _run(h, steps=3, zeroing="set_to_none", **kwargs):
    w, make_closure = diagonal_quadratic([1.0, 4.0], h, zeroing=zeroing)
    opt = Sophia([w], generator=torch.Generator().manual_seed(0), **{**HAND, **kwargs})
    closure = make_closure(opt)
    path = []
    for _ in range(steps):
        opt.step(closure)
        path.append(w.detach().clone().tolist())
    return path, opt, w


@pytest.mark.parametrize("h, expected", [
    ([2.0, 0.5], [(0.95, 3.9), (0.8775, 3.8), (0.824083, 3.7)]),
    ([2.0, -1.0], [(0.95, 4.1), (0.8775, 4.2), (0.824083, 4.3)]),
])
@pytest.mark.parametrize("zeroing", list(CLOSURES))
@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_paper_timing_three_steps_by_hand(h, expected, zeroing, scheme):
    # Refresh before steps 1 and 3: m1 = (1,1)·…, h1 = (1-β2) ĥ, clip(m/max(ρh, ε), 1).
    path, opt, w = _run(h, zeroing=zeroing, fd_scheme=scheme)
    for got, want in zip(path, expected):
        assert got == pytest.approx(want, abs=1e-6)
    h3 = [1.5, 0.375] if h[1] > 0 else [1.5, -0.75]
    assert opt.state[w]["hessian"].tolist() == pytest.approx(h3, abs=1e-9 if scheme == "central" else 1e-7)
    assert opt.state[opt.param_groups[0]["params"][0]]["num_refreshes"] == 2
    # Negative curvature: |θ2| grows every step (a sign step, never against the momentum).
    if h[1] < 0:
        assert [abs(p[1]) for p in path] == sorted(abs(p[1]) for p in path)


@pytest.mark.parametrize("zeroing", list(CLOSURES))
def test_official_timing_and_weight_decay_by_hand(zeroing):
    path, _, _ = _run([2.0, 0.5], hessian_timing="official", zeroing=zeroing)
    assert sum(path, []) == pytest.approx([0.9, 3.9, 0.8, 3.8, 0.725, 3.7], abs=1e-9)
    path, _, _ = _run([2.0, 0.5], hessian_timing="official", weight_decay=0.1, zeroing=zeroing)
    assert sum(path, []) == pytest.approx([0.89, 3.86, 0.7811, 3.7214, 0.699484, 3.584186], abs=1e-6)


def test_win_rate_and_refresh_schedule():
    w, make_closure = diagonal_quadratic([1.0, 4.0], [2.0, 0.5])
    opt = Sophia([w], generator=torch.Generator().manual_seed(0), **{**HAND, "update_period": 3})
    closure = make_closure(opt)
    refreshed = []
    for _ in range(7):
        refreshed.append(opt.curvature_due)
        opt.step(closure)
        assert opt.last_step_info.refreshed == refreshed[-1]
    assert refreshed == [True, False, False, True, False, False, True]
    # Step 1: ratios m/(ρh) = (0.5, 2): one of two coordinates unclipped.
    w, make_closure = diagonal_quadratic([1.0, 4.0], [2.0, 0.5])
    opt = Sophia([w], generator=torch.Generator().manual_seed(0), **HAND)
    opt.step(make_closure(opt))
    assert opt.last_step_info.win_rate == 0.5 and opt.last_step_info.clip_fraction == 0.5


def test_update_period_one_works():
    # Regression (pytorch_optimizer's SophiaH(update_period=1) raised KeyError('momentum')).
    path, _, _ = _run([2.0, 0.5], update_period=1)
    assert all(torch.isfinite(torch.tensor(p)).all() for p in path)
    # Exact operator path gives the same numbers as finite differences on a quadratic.
    w, make_closure = diagonal_quadratic([1.0, 4.0], [2.0, 0.5])
    model = nn.Module()
    model.w = w
    H = curvature.Hessian(_Identity(model), lambda out, t: 0.5 * (torch.tensor([2.0, 0.5], dtype=f64) * out**2).sum(),
                          (torch.zeros(1), torch.zeros(1)))
    opt = Sophia([w], generator=torch.Generator().manual_seed(0), **{**HAND, "update_period": 1})
    closure = make_closure(opt)
    for want in path:
        opt.step(closure, curvature=H)
        assert w.tolist() == pytest.approx(want, abs=1e-9)


class _Identity(nn.Module):
    def __init__(self, holder):
        super().__init__()
        self.holder = holder

    def forward(self, x):
        return self.holder.w


def _gnb_setup(seed=0):
    model = mlp(dtype=f64)
    (X, y), = classification_batches(1, dtype=f64, batch=16)
    return model, X, y


def test_gnb_estimate_is_unbiased_for_the_ggn_diagonal():
    model, X, y = _gnb_setup()
    G = torch.diagonal(curvature.GGN(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    opt = Sophia(model.parameters(), lr=0.1, estimator="gnb", generator=torch.Generator().manual_seed(0))
    draws = []
    for _ in range(3000):
        opt.update_curvature(model, X)
        draws.append(torch.cat([opt._pending[p].flatten() for p in model.parameters()]))
    D = torch.stack(draws)
    mean, se = D.mean(0), D.std(0) / len(draws) ** 0.5
    z = ((mean - G) / se.clamp_min(1e-12)).abs()
    assert float((z < 4).float().mean()) > 0.98
    assert (mean - G).norm() / G.norm() < 0.08


def test_gnb_batch_factor_acts_as_rho():
    # num_terms = 2B with ρ gives exactly the trajectory of B with 2ρ.
    paths = []
    for num_terms, rho in ((32, 0.05), (16, 0.1)):
        model, X, y = _gnb_setup()
        opt = Sophia(model.parameters(), lr=0.01, rho=rho, update_period=2, estimator="gnb",
                     generator=torch.Generator().manual_seed(3))
        for _ in range(5):
            if opt.curvature_due:
                opt.update_curvature(model, X, num_terms=num_terms)
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        paths.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(paths[0], paths[1])


def test_errors_are_clear_and_nothing_is_updated():
    w, make_closure = diagonal_quadratic([1.0, 4.0], [2.0, 0.5])
    opt = Sophia([w], lr=0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(lambda: None)
    before = w.detach().clone()

    def nan_closure():
        opt.zero_grad()
        loss = (w * float("nan")).sum()
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError, match="non-finite loss"):
        opt.step(nan_closure)
    assert torch.equal(w, before) and opt.global_step == 0 and "exp_avg" not in opt.state[w]
    gnb = Sophia([w], lr=0.1, estimator="gnb")
    with pytest.raises(RuntimeError, match="update_curvature"):
        gnb.step(make_closure(gnb))
    for kwargs, match in (
        (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(lr=0.1, betas=(1.0, 0.9)), "betas"),
        (dict(lr=0.1, betas=(0.9,)), "betas"), (dict(lr=0.1, rho=0.0), "rho"),
        (dict(lr=0.1, weight_decay=-0.1), "weight_decay"), (dict(lr=0.1, eps=0.0), "eps"),
        (dict(lr=0.1, update_period=0), "update_period"), (dict(lr=0.1, estimator="exact"), "estimator"),
        (dict(lr=0.1, fd_scheme="backward"), "fd_scheme"), (dict(lr=0.1, hessian_timing="late"), "hessian_timing"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            Sophia([w], **kwargs)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "rho": -1.0})


def _train(opt_factory, steps, *, split=None, dtype=torch.float32, seed=0):
    model = mlp(dtype=dtype)
    batches = classification_batches(steps, dtype=dtype)
    opt = opt_factory(model, seed)
    for t, (X, y) in enumerate(batches):
        if split is not None and t == split:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=False)
            model = mlp(dtype=dtype, seed=99)
            model.load_state_dict(saved["model"])
            opt = opt_factory(model, 1234)
            opt.load_state_dict(saved["opt"])

        def closure(model=model, opt=opt, X=X, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            return loss

        opt.step(closure)
    return torch.cat([p.detach().float().flatten() for p in model.parameters()]), opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical_and_seeds_reproduce(dtype):
    def factory(model, seed):
        return Sophia(model.parameters(), lr=0.01, update_period=3, generator=torch.Generator().manual_seed(seed))

    full, opt = _train(factory, 12, dtype=dtype)
    resumed, opt2 = _train(factory, 12, split=5, dtype=dtype)
    assert torch.equal(full, resumed)
    assert all(s["exp_avg"].dtype == torch.float32 and s["hessian"].dtype == torch.float32
               for p, s in opt2.state.items())
    assert torch.equal(full, _train(factory, 12, dtype=dtype)[0])
    other, _ = _train(lambda m, s: factory(m, s + 1), 12, dtype=dtype)
    assert not torch.equal(full, other)


def test_param_groups_and_params_without_grad():
    model = mlp(dtype=f64)
    frozen = nn.Parameter(torch.ones(3, dtype=f64))
    opt = Sophia([{"params": [model[0].weight, model[0].bias], "lr": 0.02},
                  {"params": [model[2].weight, model[2].bias, frozen]}], lr=0.01, weight_decay=0.0,
                 update_period=1, generator=torch.Generator().manual_seed(0))
    (X, y), = classification_batches(1, dtype=f64)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(frozen, torch.ones(3, dtype=f64)) and frozen not in opt.state
    # First step with h = (1-β2) u⊙Hu: each coordinate moves by at most its group's lr.
    moves = [(p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert max(moves[:2]) <= 0.02 + 1e-12 and max(moves[:2]) > 0.01 + 1e-9
    assert max(moves[2:]) <= 0.01 + 1e-12
