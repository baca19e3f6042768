"""A small CNN trained on scikit-learn's digits in about a second (fixed seed), for the quant tests."""

from __future__ import annotations

import torch
from torch import nn


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


def make_digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train_digits_cnn(*, seed: int = 0, epochs: int = 20, batch_size: int = 64):
    """Returns ``(model in eval mode, (x_train, y_train), (x_test, y_test))``."""
    x, y = digits_tensors()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    train, test = (x[:1200], y[:1200]), (x[1200:], y[1200:])
    model = make_digits_cnn()
    with torch.no_grad():  # seeded initialisation without the global RNG
        for p in model.parameters():
            bound = 1.0 / max(p[0].numel(), 1) ** 0.5 if p.ndim > 1 else 0.05
            p.uniform_(-bound, bound, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(1200, generator=g)
        for i in range(0, 1200, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(train[0][idx]), train[1][idx]).backward()
            opt.step()
    return model.eval(), train, test
