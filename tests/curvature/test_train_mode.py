"""The train-mode guard (curvature.train_mode) refuses any mode-dependent module in train mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature import Hessian


# -- train-mode guard ---------------------------------------------------------------------------
class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.5, self.training))


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.body = inner

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    "model, name, kind",
    [
        (Wrapper(FunctionalDropout()), "body", "FunctionalDropout"),
        (nn.Sequential(nn.Linear(4, 4), nn.RReLU(), nn.Linear(4, 3)), "1", "RReLU"),
    ],
)
def test_any_mode_dependent_module_in_train_mode_is_refused(model, name, kind):
    model = model.double().train()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError) as info:
        Hessian(model, nn.CrossEntropyLoss(), (x, y))
    message = str(info.value)
    assert f"'{name}' ({kind})" in message and "model.eval()" in message and "allow_train_mode=True" in message
    H = Hessian(model.eval(), nn.CrossEntropyLoss(), (x, y))
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert torch.equal(H @ v, H @ v)
    model.train()
    with pytest.raises(RuntimeError, match=f"'{name}'"):  # checked again at every product
        H @ v


def test_mode_independent_custom_module_in_train_mode_is_accepted():
    model = Wrapper(nn.Sequential(nn.Linear(4, 3), nn.Tanh())).double().train()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    H = Hessian(model, nn.MSELoss(), (x, y))
    assert H.shape == (15, 15)
