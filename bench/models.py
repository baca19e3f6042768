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


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convolutions with BatchNorm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def make_resnet18(*, width: int = 64, classes: int = 10, seed: int = 0) -> nn.Module:
    """ResNet-18 for 3x32x32 images (the CIFAR variant: 3x3 stem, no max-pool; 11.2M parameters
    at ``width=64``), in eval mode, written here so the benchmarks need no torchvision."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for j in range(2):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
        return nn.Sequential(*layers).eval()


CASES = {
    "mlp": (make_mlp, mlp_data),
    "cnn": (make_cnn, cnn_data),
}


def import_transformers():
    """``transformers``, with a torchvision wheel built for another torch hidden first: such a wheel
    (the bench extra's backpack pulls one from PyPI) breaks transformers' lazy imports, and GPT-2
    needs no vision."""
    import importlib
    import sys

    try:
        importlib.import_module("torchvision")
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the broken-wheel case raises RuntimeError at import
        sys.modules["torchvision"] = None
    return importlib.import_module("transformers")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
