"""Built-in problems of the ``curvature`` command.

* ``digits`` (the default): a small CNN trained for a few seconds on scikit-learn's bundled
  8x8 handwritten digits (1,797 images, 10 classes; needs the ``[app]`` extra).
* ``synthetic``: a small CNN on synthetic 16x16 images (class templates plus noise); no extra
  dependency.

Each builder takes ``seed``, ``device`` and ``progress`` and returns a
:class:`~curvature.app.problem.Problem` with the model in eval mode. A builder is a pure function of
its seed: ``--quick`` never reaches it, so a quick report analyses the same trained model with
smaller budgets. Register a new built-in in :data:`BUILTIN_PROBLEMS`.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .builtin_lm import char_transformer
from .problem import Problem

__all__ = ["BUILTIN_PROBLEMS", "DigitsCNN", "digits_cnn", "make_cnn", "make_dataset", "synthetic_cnn"]

logger = logging.getLogger(__name__)


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digit images (3,658 parameters), with named layers.

    Examples:
        >>> sum(p.numel() for p in DigitsCNN().parameters())
        3658
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, num_classes)
        self.act = nn.GELU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(images (1797, 1, 8, 8) in [0, 1], labels (1797,))``.

    Raises:
        ImportError: without scikit-learn (``pip install 'curvature-toolkit[app]'``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # an optional dependency of the application layer
        raise ImportError(
            "the built-in 'digits' problem needs scikit-learn: pip install 'curvature-toolkit[app]' "
            "(or use --problem synthetic)"
        ) from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def _train(model: nn.Module, batches: Callable[[int], tuple[Tensor, Tensor]], steps: int, lr: float,
           progress: bool, desc: str) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        x, y = batches(step)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def digits_cnn(*, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
               steps: int = 400) -> Problem:
    """:class:`DigitsCNN` trained with Adam on 1,437 digits; the problem is its loss on 512 of them.

    ``steps`` Adam steps of 64 images (the command always trains 400); held-out accuracy (on the
    other 360 images) is in ``info``. About 2 s on one CPU core.

    Examples:
        >>> p = digits_cnn(steps=5)
        >>> p.num_classes, sorted(p.info)
        (10, ['held-out accuracy'])
    """
    device = torch.device(device)
    x, y = load_digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[:1437], order[1437:]
    x, y = x.to(device), y.to(device)
    with torch.random.fork_rng(devices=[]):  # nn.Module initialisation draws from the global RNG
        torch.manual_seed(seed)
        model = DigitsCNN().to(device)
    batch_size = 64

    def batch(_: int) -> tuple[Tensor, Tensor]:
        idx = train[torch.randint(0, len(train), (batch_size,), generator=gen)].to(device)
        return x[idx], y[idx]

    _train(model, batch, steps, 1e-2, progress, "training the digits CNN")
    analysed = train[:512].to(device)
    xa, ya = x[analysed], y[analysed]
    test_acc = _accuracy(model, x[test.to(device)], y[test.to(device)])
    logger.info("digits CNN: held-out accuracy %.3f", test_acc)
    data = list(zip(xa.chunk(4), ya.chunk(4)))
    return Problem(model, nn.CrossEntropyLoss(), data, name="digits CNN (scikit-learn 8x8 digits)",
                   metric="accuracy", num_classes=10, info={"held-out accuracy": test_acc})


def make_dataset(
    num_samples: int, *, num_classes: int = 10, noise: float = 2.0, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Synthetic image classification data: class templates (fixed by ``seed 0``) plus noise.

    Examples:
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

    Examples:
        >>> sum(p.numel() for p in make_cnn().parameters())
        9802
    """
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.GELU(), nn.Linear(32, num_classes),
    )


def synthetic_cnn(*, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                  steps: int = 300) -> Problem:
    """:func:`make_cnn` trained on fresh synthetic batches; the problem is its loss on held-out samples.

    ``steps`` Adam steps of 64 images (the command always trains 300); the analysed loss is over
    512 fresh samples.

    Examples:
        >>> synthetic_cnn(steps=5).num_classes
        10
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_cnn().to(device)

    def batch(_: int) -> tuple[Tensor, Tensor]:
        x, y = make_dataset(64, generator=gen)
        return x.to(device), y.to(device)

    _train(model, batch, steps, 3e-3, progress, "training the synthetic CNN")
    x, y = make_dataset(512, generator=gen)
    x, y = x.to(device), y.to(device)
    accuracy = _accuracy(model, x, y)
    return Problem(model, nn.CrossEntropyLoss(), list(zip(x.chunk(4), y.chunk(4))),
                   name="built-in CNN (synthetic 10-class images)", metric="accuracy", num_classes=10,
                   info={"held-out accuracy": accuracy})


#: Built-in problems by ``--problem`` name (the first is the default).
BUILTIN_PROBLEMS: dict[str, Callable[..., Problem]] = {"digits": digits_cnn, "synthetic": synthetic_cnn,
                                                       "charlm": char_transformer}
