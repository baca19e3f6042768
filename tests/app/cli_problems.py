"""Problem builders for the ``curvature`` command's tests: a tiny good one and one per mistake."""

from __future__ import annotations

import torch
from torch import nn

from bench.models import import_transformers  # noqa: F401 - the one torchvision-safe import, shared with the tests
from curvature.app import Problem


def _data(n: int = 24, d: int = 3, classes: int = 3, batches: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return list(zip(x.chunk(batches), y.chunk(batches)))


def _model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    return model


def build_tiny() -> Problem:
    """45 parameters, 24 samples in 2 batches."""
    return Problem(_model(), nn.CrossEntropyLoss(), _data(), name="tiny MLP", metric="accuracy", num_classes=3)


class _Slow(nn.Module):
    """The tiny MLP, 20 ms a forward: a report on it lasts long enough to be interrupted."""

    def __init__(self):
        super().__init__()
        self.inner = _model()

    def forward(self, x):
        import time

        time.sleep(0.02)
        return self.inner(x)


def build_slow() -> Problem:
    """:func:`build_tiny` with a slow forward (the Ctrl-C test interrupts it mid-run on any machine)."""
    return Problem(_Slow().eval(), nn.CrossEntropyLoss(), _data(), name="slow tiny MLP", num_classes=3)


def build_tuple():
    """The removed tuple form: refused with exit code 4."""
    return _model(), nn.CrossEntropyLoss(), _data()


def build_dict():
    """The removed dict form: refused with exit code 4."""
    return {"model": _model(), "loss_fn": nn.CrossEntropyLoss(), "data": _data(), "name": "dict form"}


def returns_none():
    return None


def returns_model():
    return _model()


def swapped():
    return Problem(nn.CrossEntropyLoss(), _model(), _data())


def nan_loss():
    (x, y), rest = _data()[0], _data()[1:]
    return Problem(_model(), nn.CrossEntropyLoss(), [(x * float("nan"), y), *rest])


def train_mode():
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.2), nn.Linear(6, 3)).double()
    return Problem(model, nn.CrossEntropyLoss(), _data())


def empty_data():
    return Problem(_model(), nn.CrossEntropyLoss(), [])


def frozen():
    model = _model().requires_grad_(False)
    return Problem(model, nn.CrossEntropyLoss(), _data())


def bare_tensor():
    return Problem(_model(), nn.CrossEntropyLoss(), torch.randn(8, 3, dtype=torch.float64))


def shape_mismatch():
    g = torch.Generator().manual_seed(0)
    return Problem(_model(), nn.CrossEntropyLoss(), (torch.randn(8, 5, generator=g, dtype=torch.float64),
                                                      torch.zeros(8, dtype=torch.long)))


def output_target_mismatch():
    """MSE of (8, 3) outputs against (8, 1) targets: torch warns and broadcasts to a wrong loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return Problem(_model(), nn.MSELoss(), (x, torch.zeros(8, 1, dtype=torch.float64)))


def tiny_gpt2(seed: int = 0) -> Problem:
    """A 2-layer GPT-2 from a Hugging Face config (no download): dict inputs, padded labels, ``.logits``."""
    transformers = import_transformers()
    from curvature.losses import TokenCrossEntropyLoss

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_positions=8,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (6, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[4, 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    data = [({"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3]}, labels[i:i + 3]) for i in (0, 3)]
    return Problem(model, TokenCrossEntropyLoss(shift=True), data, name="tiny GPT-2")


def quick_aware(quick: bool = False) -> Problem:
    """A builder that would change its model under ``--quick``: the command must not pass it."""
    problem = build_tiny()
    problem.name = f"quick={quick}"
    return problem
