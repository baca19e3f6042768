"""AdaHessian: the update rule against hand-computed numbers, the published copies' defects,
spatial averaging, errors and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature.optim import AdaHessian, NonFiniteError
from curvature.optim.adahessian import spatial_average
from tests.cases import CLOSURES
from tests.optim.problems import classification_batches, diagonal_quadratic, f64, mlp

HAND = dict(lr=0.1, betas=(0.5, 0.5), eps=1e-4)


def _run(h, steps=3, zeroing="set_to_none", **kwargs):
    w, make_closure = diagonal_quadratic([1.0, 4.0], h, zeroing=zeroing)
    opt = AdaHessian([w], generator=torch.Generator().manual_seed(0), **{**HAND, **kwargs})
    closure = make_closure(opt)
    path = []
    for _ in range(steps):
        opt.step(closure)
        path.extend(w.detach().tolist())
    return path, opt, w


@pytest.mark.parametrize("kwargs, convex, indefinite", [
    ({}, [0.900005, 3.60008, 0.806676, 3.226816, 0.720584, 2.882493],
     [0.900005, 4.39996, 0.806676, 4.826581, 0.720584, 5.285196]),
    ({"hessian_power": 0.5}, [0.858589, 3.717197, 0.730509, 3.447724, 0.616587, 3.192946],
     [0.858589, 4.39996, 0.730509, 4.826581, 0.616587, 5.285196]),
    ({"weight_decay": 0.1}, [0.890005, 3.56008, 0.788443, 3.153881, 0.695794, 2.783329],
     [0.890005, 4.35996, 0.788443, 4.740315, 0.695794, 5.145455]),
])
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("zeroing", list(CLOSURES))
def test_three_steps_by_hand(kwargs, convex, indefinite, scheme, zeroing):
    path, opt, w = _run([2.0, 0.5], fd_scheme=scheme, zeroing=zeroing, **kwargs)
    assert path == pytest.approx(convex, abs=1e-6)
    if not kwargs:
        assert opt.state[w]["exp_hessian_diag_sq"].tolist() == pytest.approx([3.5, 0.21875], abs=1e-7)
    path, _, _ = _run([2.0, -1.0], fd_scheme=scheme, zeroing=zeroing, **kwargs)
    assert path == pytest.approx(indefinite, abs=1e-6)
    # Negative curvature: |θ2| grows every step, away from the saddle.
    assert path[1] < path[3] < path[5]


@pytest.mark.parametrize("zeroing", list(CLOSURES))
def test_update_period_above_one_neither_explodes_nor_under_corrects(zeroing):
    # Regressions (pytorch_optimizer): with update_period > 1 its first step divided by eps
    # (θ ≈ -2e15), and it bias-corrected v with the step count instead of the refresh count.
    path1, _, _ = _run([2.0, 0.5], steps=1, zeroing=zeroing)
    path2, opt, w = _run([2.0, 0.5], steps=2, update_period=2, zeroing=zeroing)
    assert path2[:2] == pytest.approx(path1, abs=1e-12)
    # Step 2 reuses v = (2, 0.125) from one refresh: v̂ = v / (1 − 0.5¹), m̂ = m / (1 − 0.5²).
    m = torch.tensor([0.5 * 1.0 + 0.5 * 2 * path1[0], 0.5 * 1.0 + 0.5 * 0.5 * path1[1]], dtype=f64)
    denom = (torch.tensor([2.0, 0.125], dtype=f64) / 0.5).sqrt() + 1e-4
    expected = torch.tensor(path1, dtype=f64) - 0.1 * (m / 0.75) / denom
    assert path2[2:] == pytest.approx(expected.tolist(), abs=1e-8)
    assert opt.state[w]["exp_hessian_diag_sq"].tolist() == pytest.approx([2.0, 0.125], abs=1e-7)


def test_spatial_average_rules_and_conv1d():
    # Regression (official AdaHessian crashed on 3-D Conv1d weights).
    D = torch.tensor([[[1.0, -3.0, 2.0]], [[0.0, 4.0, -4.0]]], dtype=f64)
    assert spatial_average(D).tolist() == [[[2.0] * 3], [[8 / 3] * 3]]
    assert spatial_average(D, signed=True).tolist() == [[[0.0] * 3], [[0.0] * 3]]
    W = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(spatial_average(W), W.abs().mean(dim=(2, 3), keepdim=True).expand_as(W))
    assert torch.equal(spatial_average(W[0, 0]), W[0, 0].abs())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 3))
    X = torch.randn(8, 2, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    opt = AdaHessian(model.parameters(), lr=0.05, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(20):
        opt.step(closure)
    v = opt.state[model[0].weight]["exp_hessian_diag_sq"]
    assert torch.equal(v, v[..., :1].expand_as(v))  # constant over the kernel positions
    assert float(closure().detach()) < first


def test_errors_are_clear_and_nothing_is_updated():
    w, make_closure = diagonal_quadratic([1.0, 4.0], [2.0, 0.5])
    opt = AdaHessian([w], generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(lambda: w.sum() * torch.ones(2))
    closure = make_closure(opt)
    calls = []

    def nan_on_second_call():  # the finite-difference call returns NaN
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * (w**2).sum() * (1.0 if len(calls) == 1 else float("nan"))
        loss.backward()
        return loss

    before = w.detach().clone()
    with pytest.raises(NonFiniteError):
        opt.step(nan_on_second_call)
    assert torch.equal(w, before) and opt.global_step == 0 and "exp_avg" not in opt.state[w]
    opt.step(closure)
    assert opt.global_step == 1
    for kwargs, match in (
        (dict(lr=0.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"), (dict(hessian_power=0.0), "hessian_power"),
        (dict(hessian_power=1.5), "hessian_power"), (dict(update_period=1.5), "update_period"),
        (dict(fd_scheme="exact"), "fd_scheme"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            AdaHessian([w], **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(dtype):
    import io

    def run(split=None):
        model = mlp(dtype=dtype)
        opt = AdaHessian(model.parameters(), lr=0.05, update_period=2, generator=torch.Generator().manual_seed(0))
        for t, (X, y) in enumerate(classification_batches(9, dtype=dtype)):
            if t == split:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = AdaHessian(model.parameters(), lr=0.05, update_period=2,
                                 generator=torch.Generator().manual_seed(77))
                opt.load_state_dict(torch.load(buf, weights_only=False))

            def closure(opt=opt, X=X, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(X), y)
                loss.backward()
                return loss

            opt.step(closure)
        assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values() if "exp_avg" in s)
        return torch.cat([p.detach().float().flatten() for p in model.parameters()])

    assert torch.equal(run(), run(split=4))
