"""Static M-FAC inverse against explicit float64 inverses and the spec's Sherman–Morrison chain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature.linear_operator import as_operator
from curvature.mfac import MFACInverse, collect_gradients
from tests.matrices import rel

f64 = torch.float64


def explicit_inverse(G, lam, block_size=None):
    m, d = G.shape
    B = d if block_size is None else block_size
    Finv = torch.zeros(d, d, dtype=f64)
    for s in range(0, d, B):
        e = min(s + B, d)
        Gb = G[:, s:e].to(f64)
        Finv[s:e, s:e] = torch.linalg.inv(lam * torch.eye(e - s, dtype=f64) + Gb.T @ Gb / m)
    return Finv


def sherman_morrison_chain(G, lam):
    """Spec A.2 STATIC_PRECOMPUTE, written out literally."""
    m, d = G.shape
    V, c = torch.empty_like(G), torch.empty(m, dtype=G.dtype)
    for k in range(m):
        v = G[k] / lam
        if k > 0:
            coef = (V[:k] @ G[k]) / c[:k]
            v = v - coef @ V[:k]
        V[k] = v
        c[k] = m + G[k] @ v
    return V, c


def gradients(m, d, *, seed=0, repeats=1):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m // repeats, d, generator=gen, dtype=f64)
    return G.repeat(repeats, 1)


def check_against(op, Finv, *, seed=1, num_elements=20):
    d = Finv.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=gen, dtype=f64)
    X = torch.randn(d, 5, generator=gen, dtype=f64)
    assert rel(op @ x, Finv @ x) <= 1e-10
    assert rel(op @ X, Finv @ X) <= 1e-10
    diag = op.diagonal()
    assert float((diag - Finv.diagonal()).abs().max() / Finv.diagonal().abs().max()) <= 1e-10
    scale = float(Finv.abs().max())
    idx = torch.randint(0, d, (num_elements, 2), generator=gen).tolist() + [[0, 0], [d - 1, d - 1], [0, d - 1]]
    for i, j in idx:
        assert abs(op.element(i, j) - float(Finv[i, j])) <= 1e-10 * scale


@pytest.mark.parametrize(
    "d,m,lam,repeats",
    [
        (200, 32, 1e-1, 1),
        (200, 32, 1e-3, 1),
        (30, 50, 1e-2, 1),  # m > d
        (40, 1, 1e-2, 1),  # m = 1
        (60, 16, 1e-3, 4),  # every gradient four times: G Gᵀ is singular
        (25, 25, 1.0, 1),  # m = d
    ],
)
def test_matches_explicit_inverse(d, m, lam, repeats):
    G = gradients(m, d, repeats=repeats)
    op = MFACInverse(G, damping=lam)
    assert op.shape == (d, d) and op.dtype == f64 and op.device == G.device
    check_against(op, explicit_inverse(G, lam))


@pytest.mark.parametrize("lam", [1e-1, 1e-3])
def test_equals_sherman_morrison_chain(lam):
    G = gradients(32, 200, seed=3)
    V, c = sherman_morrison_chain(G, lam)
    assert bool((c >= 32).all())
    chain = torch.eye(200, dtype=f64) / lam - (V.T / c) @ V
    dense = MFACInverse(G, damping=lam).to_dense()
    assert rel(dense, chain) <= 1e-10
    assert rel(dense, explicit_inverse(G, lam)) <= 1e-10


@pytest.mark.parametrize(
    "d,m,B",
    [
        (1000, 16, 128),  # 7 full blocks + a ragged block of 104
        (37, 16, 8),  # m >= B: explicit per-block inverses, ragged 5
        (37, 16, 20),  # m < B for the full block and m < 17 for the ragged one
        (50, 12, 10),  # no ragged block
        (30, 4, 64),  # block_size > d: one block
    ],
)
def test_blocked_matches_block_diagonal_inverse(d, m, B):
    G = gradients(m, d, seed=5)
    op = MFACInverse(G, damping=1e-3, block_size=B)
    Finv = explicit_inverse(G, 1e-3, block_size=min(B, d))
    check_against(op, Finv)
    if d > B:
        assert op.element(0, d - 1) == 0.0


def test_blocked_groups_do_not_change_results(monkeypatch):
    import curvature.mfac as mfac

    G = gradients(16, 1000, seed=6)
    x = torch.randn(1000, 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    reference = MFACInverse(G, damping=1e-3, block_size=128) @ x
    monkeypatch.setattr(mfac, "_GROUP_BUDGET", 3 * 16 * 128)  # groups of a few blocks
    monkeypatch.setattr(mfac, "_GRAM_CHUNK", 50)
    assert rel(MFACInverse(G, damping=1e-3, block_size=128) @ x, reference) <= 1e-12
    assert rel(MFACInverse(G, damping=1e-3) @ x, explicit_inverse(G, 1e-3) @ x) <= 1e-10  # chunked columns
    monkeypatch.setattr(mfac, "_GRAM_CHUNK", 5)  # m = 16 >= B = 8: explicit blocks, Gram over row chunks
    assert rel(MFACInverse(G, damping=1e-3, block_size=8) @ x, explicit_inverse(G, 1e-3, 8) @ x) <= 1e-10


def test_order_and_input_forms_do_not_matter():
    G = gradients(20, 80, seed=7)
    x = torch.randn(80, dtype=f64, generator=torch.Generator().manual_seed(1))
    y = MFACInverse(G, damping=1e-2) @ x
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(2))
    assert rel(MFACInverse(G[perm], damping=1e-2) @ x, y) <= 1e-11
    assert rel(MFACInverse(list(G), damping=1e-2) @ x, y) <= 1e-14


def test_inplace_overwrites_grads_and_keeps_results():
    G = gradients(10, 300, seed=8)
    expected = MFACInverse(G, damping=1e-2).to_dense()
    H = G.clone()
    op = MFACInverse(H, damping=1e-2, inplace=True)
    assert not torch.equal(H, G)  # consumed
    assert rel(op.to_dense(), expected) <= 1e-14


def test_float32_accuracy():
    # correlated gradients, float32 storage, float64 reference
    d, m = 20000, 128
    gen = torch.Generator().manual_seed(0)
    G64 = torch.randn(d, generator=gen, dtype=f64) * 1e-2 + torch.randn(m, d, generator=gen, dtype=f64) * 3e-3
    x = torch.randn(d, generator=gen, dtype=f64)
    for lam in (1e-6, 1e-4, 1e-2):
        op32, op64 = MFACInverse(G64.float(), damping=lam), MFACInverse(G64, damping=lam)
        assert op32.dtype == torch.float32
        assert rel((op32 @ x.float()).double(), op64 @ x) < 1e-5
        assert float(((op32.diagonal().double() - op64.diagonal()) / op64.diagonal()).abs().max()) < 1e-6


def test_obs_pruning_identities():
    # on the quadratic L(w) = ½ (w − w*)ᵀ F (w − w*)
    d, m, lam = 120, 24, 1e-2
    G = gradients(m, d, seed=9)
    F = lam * torch.eye(d, dtype=f64) + G.T @ G / m
    op = MFACInverse(G, damping=lam)
    w = torch.randn(d, dtype=f64, generator=torch.Generator().manual_seed(3))
    for q in (0, 17, d - 1):
        e = torch.zeros(d, dtype=f64)
        e[q] = 1.0
        delta = -(w[q] / op.element(q, q)) * (op @ e)
        assert abs(float(w[q] + delta[q])) < 1e-12
        increase = 0.5 * delta @ F @ delta
        assert abs(float(increase) - float(w[q] ** 2 / (2 * op.element(q, q)))) <= 1e-10 * float(increase)


def test_operator_contract():
    G = gradients(6, 10, seed=10)
    op = MFACInverse(G, damping=0.1)
    assert as_operator(op) is op
    dense = op.to_dense()
    assert torch.allclose(dense, dense.T, atol=1e-13)
    assert (torch.ones(10, dtype=f64) @ op).shape == (10,)
    assert op.num_matvecs >= 10


def _tiny_problem(seed=0):
    with torch.random.fork_rng():  # seeded init, global RNG left as it was
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(6, 3, generator=gen, dtype=f64), torch.randint(0, 2, (6,), generator=gen)) for _ in range(4)]
    return model, nn.CrossEntropyLoss(), data


def _manual_gradient(model, loss_fn, x, y):
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return torch.cat([g.reshape(-1) for g in grads])


def test_from_model_collects_minibatch_gradients_without_touching_the_model():
    model, loss_fn, data = _tiny_problem()
    before = [p.detach().clone() for p in model.parameters()]
    op = MFACInverse.from_model(model, loss_fn, data, num_grads=6, batch_size=3, damping=1e-2)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    rows = [_manual_gradient(model, loss_fn, x[s : s + 3], y[s : s + 3]) for x, y in data for s in (0, 3)][:6]
    G = torch.stack(rows)
    assert rel(op.to_dense(), explicit_inverse(G, 1e-2)) <= 1e-10
    assert [b.name for b in op.blocks] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    per_param = op @ [torch.ones_like(p) for p in model.parameters()]
    assert [t.shape for t in per_param] == [p.shape for p in model.parameters()]


def test_collect_gradients_inputs_forms_and_errors():
    model, loss_fn, data = _tiny_problem(1)
    G = collect_gradients(model, loss_fn, data, num_grads=4)
    assert torch.allclose(G[2], _manual_gradient(model, loss_fn, *data[2]))
    single = collect_gradients(model, loss_fn, data[0], num_grads=3, batch_size=2)  # one batch, cut
    assert torch.allclose(single[1], _manual_gradient(model, loss_fn, data[0][0][2:4], data[0][1][2:4]))
    as_tuple = collect_gradients(model, loss_fn, [((x,), y) for x, y in data], num_grads=2)
    assert torch.equal(as_tuple, G[:2])
    as_dict = collect_gradients(
        _KeywordModel(model), loss_fn, [({"x": x}, y) for x, y in data], num_grads=2, params=list(model.parameters())
    )
    assert torch.equal(as_dict, G[:2])
    with pytest.raises(ValueError, match="only 4 mini-batch gradients, but num_grads=5"):
        collect_gradients(model, loss_fn, data, num_grads=5)
    with pytest.raises(ValueError, match="num_grads must be >= 1"):
        collect_gradients(model, loss_fn, data, num_grads=0)
    with pytest.raises(ValueError, match="scalar"):
        collect_gradients(model, nn.CrossEntropyLoss(reduction="none"), data, num_grads=1)


class _KeywordModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_collect_gradients_rejects_nonfinite_loss():
    model, loss_fn, data = _tiny_problem(2)
    bad = [(torch.full((2, 3), float("nan"), dtype=f64), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="loss is nan"):
        collect_gradients(model, loss_fn, bad, num_grads=1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(damping=0.0), ValueError, "damping must be a finite number > 0"),
        (dict(damping=-1.0), ValueError, "damping"),
        (dict(damping=float("nan")), ValueError, "damping"),
        (dict(damping="1"), TypeError, "damping"),
        (dict(damping=1.0, block_size=0), ValueError, "block_size must be >= 1"),
        (dict(damping=1.0, block_size=2.5), TypeError, "block_size must be an int"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        MFACInverse(torch.ones(2, 3, dtype=f64), **kwargs)


def test_bad_gradients():
    with pytest.raises(ValueError, match="m = 0"):
        MFACInverse(torch.zeros(0, 5), damping=1.0)
    with pytest.raises(ValueError, match="m = 0"):
        MFACInverse([], damping=1.0)
    with pytest.raises(ValueError, match=r"shape \(m, d\)"):
        MFACInverse(torch.ones(5), damping=1.0)
    with pytest.raises(ValueError, match=r"grads\[1\] must be a vector of shape \(3,\)"):
        MFACInverse([torch.ones(3), torch.ones(4)], damping=1.0)
    with pytest.raises(TypeError, match="floating"):
        MFACInverse(torch.ones(2, 3, dtype=torch.long), damping=1.0)
    for bad in (float("nan"), float("inf")):
        G = torch.ones(3, 4)
        G[1, 2] = bad
        with pytest.raises(ValueError, match=r"NaN or inf \(rows \[1\]\)"):
            MFACInverse(G, damping=1.0)
    with pytest.raises(TypeError, match="grads must be"):
        MFACInverse(3.0, damping=1.0)


def test_bad_queries():
    op = MFACInverse(torch.ones(2, 3, dtype=f64), damping=1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        op @ torch.ones(4, dtype=f64)
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.ones(3, dtype=torch.float32)
    with pytest.raises(IndexError, match="i=3 is out of range"):
        op.element(3, 0)
    with pytest.raises(TypeError, match="j must be an int"):
        op.element(0, 1.0)
    assert op.element(-1, -1) == op.element(2, 2)
