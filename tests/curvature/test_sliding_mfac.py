"""Sliding-window (dynamic) M-FAC against explicit inverses and the static algorithm."""

from __future__ import annotations

import pytest
import torch

from curvature.mfac import MFACInverse
from curvature.sliding_mfac import SlidingMFACInverse
from tests.matrices import rel

f64 = torch.float64


def explicit(window_rows, lam, m):
    """inv(λI + (1/m) Σ g gᵀ) over the given rows, normalized by the full window size m."""
    d = window_rows.shape[1]
    return torch.linalg.inv(lam * torch.eye(d, dtype=f64) + window_rows.T @ window_rows / m)


def stream(n, d, seed=0, dtype=f64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_fill_then_wrap_matches_static_inverse_of_last_m():
    # m=32, d=500; 32 updates, then 45 more (the ring wraps)
    d, m, lam = 500, 32, 1e-3
    G = stream(77, d)
    x = torch.randn(d, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    inv = SlidingMFACInverse(d, num_grads=m, damping=lam, dtype=f64)
    for g in G[:32]:
        inv.update(g)
    assert rel(inv @ x, explicit(G[:32], lam, m) @ x) <= 1e-10
    for i, g in enumerate(G[32:], start=32):
        u = inv.update_and_multiply(g)
        if i in (40, 76):
            static = MFACInverse(G[i + 1 - m : i + 1], damping=lam)
            assert rel(inv @ x, static @ x) <= 1e-10
            assert rel(u, static @ g) <= 1e-10
    assert inv.num_updates == 77 and inv.num_filled == 32
    assert torch.equal(inv.window_gradients(), G[-32:])


def test_partial_window_divides_by_full_m():
    # after 5 of m=32 updates F = λI + (1/32) Σ_5 g gᵀ
    d, m, lam = 60, 32, 1e-2
    G = stream(5, d, seed=2)
    inv = SlidingMFACInverse(d, num_grads=m, damping=lam, dtype=f64)
    x = torch.randn(d, dtype=f64, generator=torch.Generator().manual_seed(20))
    assert torch.allclose(inv @ x, x / lam)  # empty window: λ⁻¹ I
    for g in G:
        inv.update(g)
    assert rel(inv.to_dense(), explicit(G, lam, m)) <= 1e-10
    scaled = MFACInverse(G * (5 / 32) ** 0.5, damping=lam)  # the documented static equivalent
    assert rel(inv @ x, scaled @ x) <= 1e-10
    assert torch.equal(inv.window_gradients(), G)


def test_stable_after_ten_windows_of_updates():
    d, m, lam = 300, 16, 1e-4
    G = stream(10 * m + 3, d, seed=3)
    inv = SlidingMFACInverse(d, num_grads=m, damping=lam, dtype=f64)
    x = torch.randn(d, dtype=f64, generator=torch.Generator().manual_seed(21))
    for g in G:
        u = inv.update_and_multiply(g)
    W = G[-m:]
    assert rel(inv @ x, explicit(W, lam, m) @ x) <= 1e-10
    # For an in-window vector the explicit inverse cancels (cond(F) ~ 1e6); the push-through
    # identity F⁻¹ Wᵀ e = Wᵀ (λI + W Wᵀ/m)⁻¹ e is the exact reference.
    e = torch.zeros(m, dtype=f64)
    e[-1] = 1.0
    assert rel(u, W.T @ torch.linalg.solve(lam * torch.eye(m, dtype=f64) + W @ W.T / m, e)) <= 1e-10


def test_float32_stays_accurate_over_many_updates():
    d, m, lam = 2000, 16, 1e-3
    G = stream(10 * m, d, seed=4, dtype=torch.float32)
    inv = SlidingMFACInverse(d, num_grads=m, damping=lam)
    x = torch.randn(d, generator=torch.Generator().manual_seed(22))
    errors = []
    for t, g in enumerate(G):
        u = inv.update_and_multiply(g)
        if t % m == m - 1:
            static = MFACInverse(G[t + 1 - m : t + 1].double(), damping=lam)
            errors.append(max(rel((inv @ x).double(), static @ x.double()), rel(u.double(), static @ g.double())))
    assert max(errors) < 1e-5
    assert errors[-1] < 10 * errors[0] + 1e-6  # no drift


def test_in_window_product_is_cancellation_free_in_float32():
    # correlated gradients, x = the gradient just inserted
    d, m = 5000, 64
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(d, generator=gen, dtype=f64) * 1e-2 + torch.randn(m, d, generator=gen, dtype=f64) * 3e-3
    for lam in (1e-2, 1e-5, 1e-7):
        inv32 = SlidingMFACInverse(d, num_grads=m, damping=lam)
        inv64 = SlidingMFACInverse(d, num_grads=m, damping=lam, dtype=f64)
        for g in G:
            u32, u64 = inv32.update_and_multiply(g.float()), inv64.update_and_multiply(g)
        assert rel(u32.double(), u64) < 1e-4
        reference = MFACInverse(G, damping=lam) @ G[-1]
        assert rel(u64, reference) < 1e-6  # D1 vs Woodbury in float64 (cond(F) ~ 1e6/λ)
        assert rel(inv64 @ G[-1], u64) < 1e-6


def test_closed_forms_and_limits():
    g = torch.tensor([3.0, 0.0, 4.0, 1.0], dtype=f64)
    lam = 0.3
    one = SlidingMFACInverse(4, num_grads=1, damping=lam, dtype=f64)
    assert torch.allclose(one.update_and_multiply(g), g / (lam + g @ g), rtol=1e-12, atol=0)
    many = SlidingMFACInverse(4, num_grads=8, damping=lam, dtype=f64)
    assert torch.allclose(many.update_and_multiply(g), 8 * g / (lam * 8 + g @ g), rtol=1e-12, atol=0)
    # large damping: F⁻¹ g ≈ g / λ to first order
    G = stream(6, 40, seed=6)
    big = SlidingMFACInverse(40, num_grads=6, damping=1e6, dtype=f64)
    for row in G:
        u = big.update_and_multiply(row)
    bound = 2 * float(torch.linalg.matrix_norm(G, ord=2)) ** 2 / (6 * 1e6)
    assert rel(u, G[-1] / 1e6) <= bound


def test_state_dict_round_trip_and_from_buffers():
    d, m = 50, 4
    G = stream(11, d, seed=7)
    a = SlidingMFACInverse(d, num_grads=m, damping=1e-2, dtype=f64)
    for g in G[:6]:
        a.update(g)
    b = SlidingMFACInverse(d, num_grads=m, damping=1.0, dtype=f64)
    b.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.state_dict().items()})
    c = SlidingMFACInverse.from_buffers(a.window.clone(), a.gram.clone(), damping=1e-2, slot=a.slot, num_updates=6)
    for g in G[6:]:
        ua, ub, uc = a.update_and_multiply(g), b.update_and_multiply(g), c.update_and_multiply(g)
        assert torch.equal(ua, ub) and torch.equal(ua, uc)
    assert b.num_updates == 11 and b.damping == 1e-2


def test_bad_input():
    with pytest.raises(ValueError, match="damping"):
        SlidingMFACInverse(5, num_grads=2, damping=0.0)
    with pytest.raises(ValueError, match="num_grads must be >= 1"):
        SlidingMFACInverse(5, num_grads=0, damping=1.0)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        SlidingMFACInverse(0, num_grads=2, damping=1.0)
    with pytest.raises(TypeError, match="dtype"):
        SlidingMFACInverse(5, num_grads=2, damping=1.0, dtype=torch.long)
    inv = SlidingMFACInverse(5, num_grads=2, damping=1.0)
    with pytest.raises(ValueError, match=r"g must have shape \(5,\)"):
        inv.update(torch.ones(6))
    with pytest.raises(ValueError, match="one gradient"):
        inv.update(torch.ones(5, 2))
    with pytest.raises(TypeError, match="dtype"):
        inv.update(torch.ones(5, dtype=f64))
    with pytest.raises(ValueError, match="NaN or inf"):
        inv.update(torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0]))
    assert inv.num_updates == 0 and not inv.window.any()  # rejected input leaves no trace
    with pytest.raises(ValueError, match="gram"):
        SlidingMFACInverse.from_buffers(torch.zeros(2, 5), torch.zeros(2, 2), damping=1.0)
