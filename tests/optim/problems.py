"""Small deterministic problems shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn

from tests.cases import CLOSURES

f64 = torch.float64


def diagonal_quadratic(theta0, h, dtype=f64, zeroing="set_to_none"):
    """``L(θ) = ½ Σ h_i θ_i²`` as a parameter and a standard closure factory (gradients zeroed the
    way ``tests.cases.CLOSURES[zeroing]`` does)."""
    w = nn.Parameter(torch.tensor(theta0, dtype=dtype))
    h = torch.tensor(h, dtype=dtype)
    holder = nn.Module()
    holder.w = w
    zero = CLOSURES[zeroing]

    def make_closure(opt):
        def closure():
            zero(opt, holder)
            loss = 0.5 * (h * w**2).sum()
            loss.backward()
            return loss

        return closure

    return w, make_closure


def mlp(seed=0, dtype=torch.float32, sizes=(6, 12, 4), act=nn.Tanh):
    with torch.random.fork_rng():  # seeded init, global RNG left as it was
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(sizes[0], sizes[1]), act(), nn.Linear(sizes[1], sizes[2])).to(dtype)


def classification_batches(n, *, seed=2, dtype=torch.float32, batch=32, dim=6, classes=4):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, dim, generator=gen, dtype=dtype), torch.randint(0, classes, (batch,), generator=gen))
        for _ in range(n)
    ]


def logistic_problem():
    """Ill-conditioned logistic regression (feature scales 10^-1.5 .. 10^1.5), labels drawn from the
    model, so the optimum is finite; returns ``X, y`` and the optimal loss."""
    gen = torch.Generator().manual_seed(0)
    n, p = 400, 20
    scales = torch.logspace(-1.5, 1.5, p, dtype=f64)
    X = torch.randn(n, p, generator=gen, dtype=f64) * scales
    w_true = 2 * torch.randn(p, generator=gen, dtype=f64) / scales
    y = (torch.rand(n, generator=gen, dtype=f64) < torch.sigmoid(X @ w_true)).to(f64)
    w = torch.zeros(p, dtype=f64)
    for _ in range(40):  # Newton's method to machine precision (the reference optimum)
        s = torch.sigmoid(X @ w)
        g = X.T @ (s - y) / n
        H = (X.T * (s * (1 - s))) @ X / n
        w = w - torch.linalg.solve(H, g)
    fstar = float(nn.functional.binary_cross_entropy_with_logits(X @ w, y))
    return X, y, fstar
