"""Models and data shared by the benchmark scripts (the sizes named in the issues)."""

from __future__ import annotations

import torch
from torch import nn


def make_mlp(*, seed: int = 0, activation: str = "tanh") -> nn.Module:
    """MLP 784 -> 512 -> 10 (~407k parameters)."""
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}[activation]
    return nn.Sequential(nn.Linear(784, 512), act(), nn.Linear(512, 10)).eval()


def make_cnn(*, seed: int = 0, activation: str = "relu", pool: str = "max") -> nn.Module:
    """Small CNN for 3x32x32 images (~25k parameters)."""
    torch.manual_seed(seed)
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
    pool_layer = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), act(), pool_layer(2),
        nn.Conv2d(16, 32, 3, padding=1), act(), pool_layer(2),
        nn.Conv2d(32, 32, 3, padding=1), act(), pool_layer(2),
        nn.Flatten(), nn.Linear(512, 20), act(), nn.Linear(20, 10),
    ).eval()


def mlp_data(*, num_samples: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_samples, 784, generator=g), torch.randint(0, 10, (num_samples,), generator=g)


def cnn_data(*, num_samples: int = 256, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_samples, 3, 32, 32, generator=g), torch.randint(0, 10, (num_samples,), generator=g)


def split_batches(data: tuple[torch.Tensor, torch.Tensor], num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split one (x, y) batch into ``num_batches`` equal batches."""
    x, y = data
    return list(zip(x.chunk(num_batches), y.chunk(num_batches)))


CASES = {
    "mlp": (make_mlp, mlp_data),
    "cnn": (make_cnn, cnn_data),
}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
