"""The built-in default of ``curvature report``: a small CNN trained on a synthetic image task.

Ten classes of 1x16x16 images, each a fixed random smooth pattern plus noise, so the network
learns real structure in seconds on a CPU and its trained Hessian shows the familiar spectrum
(a bulk near zero and about one outlier per class).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["make_dataset", "make_cnn", "trained_cnn"]

logger = logging.getLogger(__name__)


def make_dataset(
    num_samples: int, *, num_classes: int = 10, noise: float = 2.0, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic image classification data: class templates (fixed by ``seed 0``) plus noise.

    Example:
        >>> x, y = make_dataset(8, generator=torch.Generator().manual_seed(1))
        >>> tuple(x.shape), tuple(y.shape)
        ((8, 1, 16, 16), (8,))
    """
    template_gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(num_classes, 1, 4, 4, generator=template_gen)
    templates = nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    images = templates[labels] + noise * torch.randn(num_samples, 1, 16, 16, generator=generator)
    return images, labels


def make_cnn(*, num_classes: int = 10) -> nn.Module:
    """A small CNN (9,802 parameters) for 1x16x16 images.

    Example:
        >>> sum(p.numel() for p in make_cnn().parameters())
        9802
    """
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.GELU(), nn.Linear(32, num_classes),
    )


def trained_cnn(
    *, seed: int = 0, steps: int = 300, batch_size: int = 64, num_eval: int = 512, device: str = "cpu"
) -> dict[str, Any]:
    """Train :func:`make_cnn` with Adam on fresh synthetic batches; return the report inputs.

    Returns:
        ``{"model", "loss_fn", "data", "name", "train_accuracy"}`` with ``data`` a list of four
        batches of ``num_eval // 4`` held-out samples, the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_cnn().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        x, y = make_dataset(batch_size, generator=gen)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    x, y = make_dataset(num_eval, generator=gen)
    with torch.no_grad():
        accuracy = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
    logger.info("built-in model trained: held-out accuracy %.3f", accuracy)
    batches = list(zip(x.chunk(4), y.chunk(4)))
    return {"model": model, "loss_fn": loss_fn, "data": batches, "name": "built-in CNN (synthetic 10-class images)",
            "accuracy": accuracy}
