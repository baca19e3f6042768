"""Dense float64 references for the quant tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.8, 0.8, generator=g)
    return model.eval()


def tiny_data(seed: int = 1, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dense_hessian(model: nn.Module, loss_fn, data, names: list[str]) -> torch.Tensor:
    """Hessian of the loss w.r.t. the named parameters (flattened in the given order)."""
    x, y = data
    params = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss_of(flat):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        out = torch.func.functional_call(model, {**fixed, **parts}, (x,))
        return loss_fn(out, y)

    return torch.func.hessian(loss_of)(flat0)
