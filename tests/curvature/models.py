"""Tiny float64 models covering the layer types the operator core must handle."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.inner(x)


class TinyTransformer(nn.Module):
    def __init__(self, vocab=7, width=4, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=6, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def _randomize_batchnorm(model, gen):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)


def build(name, *, classes=3, seed=0):
    """Return (model in eval mode, float64; make_inputs(n, generator))."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, classes))
        inputs = lambda n, g: torch.randn(n, 4, generator=g, dtype=torch.float64)  # noqa: E731
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2), nn.Sigmoid(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, classes),
        )
        inputs = lambda n, g: torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)  # noqa: E731
    elif name == "residual":
        model = nn.Sequential(nn.Linear(3, 4), ResidualBlock(4), nn.Tanh(), nn.Linear(4, classes))
        inputs = lambda n, g: torch.randn(n, 3, generator=g, dtype=torch.float64)  # noqa: E731
    elif name == "transformer":
        model = TinyTransformer(classes=classes)
        inputs = lambda n, g: torch.randint(0, 7, (n, 5), generator=g)  # noqa: E731
    elif name == "batchnorm":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 4),
            nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, classes),
        )
        inputs = lambda n, g: torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)  # noqa: E731
    else:
        raise ValueError(name)
    model = model.double().eval()
    with torch.no_grad():
        _randomize_batchnorm(model, gen)
    return model, inputs


def targets(kind, n, classes, gen):
    if kind == "ce":
        return torch.randint(0, classes, (n,), generator=gen)
    if kind == "mse":
        return torch.randn(n, classes, generator=gen, dtype=torch.float64)
    return torch.rand(n, classes, generator=gen, dtype=torch.float64)


def loss_module(kind, reduction):
    return {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[kind](reduction=reduction)


def make_batches(name, kind, sizes=(5, 4, 3), classes=3, seed=0):
    model, inputs = build(name, classes=classes, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    batches = [(inputs(n, gen), targets(kind, n, classes, gen)) for n in sizes]
    return model, batches


def fresh_product(Op, model, loss_fn, data, v, **kw):
    """``Op(...) @ v`` from an operator that caches nothing (the reference for cached products)."""
    return Op(model, loss_fn, data, cache_graph=False, **kw) @ v


def mlp_dataset(n=64, seed=0):
    """The float64 MLP of :func:`build` with ``n`` samples and class targets ``(model, x, y)``."""
    model, inputs = build("mlp", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = inputs(n, g)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y
