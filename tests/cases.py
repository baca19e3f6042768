"""The shared case registry: the usage patterns that gave silent wrong answers when tests skipped them.

Every package's tests draw models, losses, data layouts and closures from here, and compare against
truths computed independently of the library (autograd on the concatenated batch, dense float64).

* models (:data:`MODELS`): a plain MLP, an LM with an embedding tied to its head, a module called
  twice, BatchNorm and dropout in train mode, mixed parameter dtypes, frozen layers, complex
  parameters, a part computed under ``torch.no_grad()``, a hand-written ``autograd.Function``
  without a forward-mode formula, a fused kernel without a double backward;
* losses (:data:`LOSSES`): mean and sum cross-entropy, class-weighted, ``ignore_index`` padding,
  mean and sum MSE;
* data layouts (:data:`LAYOUTS`): one batch, uneven batches, a fully padded batch among others,
  a shuffled loader;
* closures (:data:`CLOSURES`): ``zero_grad(set_to_none=True)`` and in-place zeroing.

A :class:`Problem` bundles a model, a loss and batches; :func:`problem` builds one from names, and
:func:`problems` lists the valid combinations (``pytest.mark.parametrize("p", problems(...),
ids=str)``). :func:`full_batch_loss` is the truth every batch-weighting consumer must match: the
loss of the model on all batches concatenated into one.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE = -100
f64 = torch.float64


# ----------------------------------------------------------------------------------------- models
class TiedLM(nn.Module):
    """Token LM whose head shares the embedding's weight (GPT-2 style): logits (N, S, V)."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class CalledTwice(nn.Module):
    """One Linear applied twice in the forward (weight sharing across depth)."""

    def __init__(self, dim=4, classes=3):
        super().__init__()
        self.inp = nn.Linear(dim, 5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, classes)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class MixedDtype(nn.Module):
    """A float32 body and a float64 head (the cast happens inside the forward)."""

    def __init__(self, dim=4, classes=3):
        super().__init__()
        self.body = nn.Linear(dim, 6)
        self.head = nn.Linear(6, classes).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x.float())).double())


class ComplexLinear(nn.Module):
    """A complex weight with a real output (|W x|^2 features)."""

    def __init__(self, dim=4, classes=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, dim, dtype=torch.complex128) * 0.3)
        self.out = nn.Linear(6, classes).double()

    def forward(self, x):
        return self.out((self.w @ x.to(torch.complex128).T).abs().T ** 2)


class NoGradScale(nn.Module):
    """A hidden layer divided by its weight's norm taken under ``torch.no_grad()``: a constant for
    ``loss.backward()``, which forward-mode AD would differentiate through."""

    def __init__(self, dim=4, classes=3):
        super().__init__()
        self.body = nn.Linear(dim, 6)
        self.out = nn.Linear(6, classes)

    def forward(self, x):
        with torch.no_grad():
            scale = self.body.weight.norm()
        return self.out(torch.tanh(self.body(x) / scale))


def _tanh_function(*, double_backward: bool) -> type[torch.autograd.Function]:
    """tanh as a hand-written ``autograd.Function``: never with a forward-mode formula, and with a
    double backward or (``once_differentiable``, as a fused kernel) without one."""

    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    class Tanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.tanh(x)
            ctx.save_for_backward(y)
            return y

    Tanh.backward = staticmethod(backward if double_backward else once_differentiable(backward))
    return Tanh


HandTanh = _tanh_function(double_backward=True)
FusedTanh = _tanh_function(double_backward=False)


class TanhMLP(nn.Module):
    """Linear, tanh, Linear, with ``tanh`` any function of one tensor (``FusedTanh.apply``, ...)."""

    def __init__(self, tanh: Callable = torch.tanh, dim=4, classes=3):
        super().__init__()
        self.tanh = tanh
        self.a, self.b = nn.Linear(dim, 6), nn.Linear(6, classes)

    def forward(self, x):
        return self.b(self.tanh(self.a(x)))


def with_builtin_ops(model: nn.Module) -> nn.Module:
    """The same function and weights by PyTorch's own ops (a copy where the model has hand-written
    ``autograd.Function`` objects): what ``torch.func`` truths and double backwards need."""
    if not isinstance(model, TanhMLP):
        return model
    twin = copy.deepcopy(model)
    twin.tanh = torch.tanh
    return twin


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():  # seeded init, the global RNG left as it was
        torch.manual_seed(seed)
        return make()


def _mlp(dim=4, classes=3):
    return nn.Sequential(nn.Linear(dim, 6), nn.Tanh(), nn.Linear(6, classes))


def _frozen(dim=4, classes=3):
    model = _mlp(dim, classes)
    model[0].weight.requires_grad_(False)
    return model


def _batchnorm(dim=4, classes=3):
    return nn.Sequential(nn.Linear(dim, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, classes))


def _dropout(dim=4, classes=3):
    return nn.Sequential(nn.Linear(dim, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, classes))


@dataclass(frozen=True)
class ModelCase:
    """A model factory and what it is: ``inputs`` is "features" (float (N, 4)) or "tokens" ((N, S))."""

    name: str
    make: Callable[[], nn.Module]
    inputs: str = "features"
    train: bool = False
    dtype: torch.dtype = f64
    tags: frozenset = field(default_factory=frozenset)

    def build(self, seed: int = 0) -> nn.Module:
        model = _seeded(seed, self.make)
        if self.dtype is not None:
            model = model.to(self.dtype)
        return model.train(self.train)


MODELS: dict[str, ModelCase] = {
    case.name: case
    for case in [
        ModelCase("mlp", _mlp),
        ModelCase("tied_lm", TiedLM, inputs="tokens", tags=frozenset({"tied"})),
        ModelCase("called_twice", CalledTwice, tags=frozenset({"called_twice"})),
        ModelCase("batchnorm_train", _batchnorm, train=True, tags=frozenset({"train_mode", "buffers"})),
        ModelCase("dropout_train", _dropout, train=True, tags=frozenset({"train_mode", "random"})),
        ModelCase("mixed_dtype", MixedDtype, dtype=None, tags=frozenset({"mixed_dtype"})),
        ModelCase("frozen", _frozen, tags=frozenset({"frozen"})),
        ModelCase("complex", ComplexLinear, dtype=None, tags=frozenset({"complex"})),
        ModelCase("no_grad_part", NoGradScale, tags=frozenset({"no_grad"})),
        ModelCase("custom_function", lambda: TanhMLP(HandTanh.apply), tags=frozenset({"no_jvp"})),
        ModelCase("fused_kernel", lambda: TanhMLP(FusedTanh.apply), tags=frozenset({"no_double_backward"})),
    ]
}


# ----------------------------------------------------------------------------------------- losses
@dataclass(frozen=True)
class LossCase:
    """A loss factory; ``targets`` is "classes", "tokens" (with padding) or "regression"."""

    name: str
    make: Callable[[int], Callable]
    targets: str
    reduction: str = "mean"
    tags: frozenset = field(default_factory=frozenset)


def _token_ce(reduction):
    def make(classes):
        def token_cross_entropy(logits, labels):
            return nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction=reduction
            )

        return token_cross_entropy

    return make


def _class_weights(classes):
    return torch.linspace(0.5, 2.0, classes, dtype=f64)


LOSSES: dict[str, LossCase] = {
    case.name: case
    for case in [
        LossCase("ce", lambda c: nn.CrossEntropyLoss(), "classes"),
        LossCase("ce_sum", lambda c: nn.CrossEntropyLoss(reduction="sum"), "classes", "sum"),
        LossCase(
            "ce_weighted",
            lambda c: nn.CrossEntropyLoss(weight=_class_weights(c)),
            "classes",
            tags=frozenset({"weighted"}),
        ),
        LossCase(
            "ce_ignore_index",
            lambda c: nn.CrossEntropyLoss(ignore_index=IGNORE),
            "classes",
            tags=frozenset({"padded"}),
        ),
        LossCase("token_ce", _token_ce("mean"), "tokens", tags=frozenset({"padded"})),
        LossCase("token_ce_sum", _token_ce("sum"), "tokens", "sum", tags=frozenset({"padded"})),
        LossCase("mse", lambda c: nn.MSELoss(), "regression"),
        LossCase("mse_sum", lambda c: nn.MSELoss(reduction="sum"), "regression", "sum"),
    ]
}


# ------------------------------------------------------------------------------------ data layouts
@dataclass(frozen=True)
class Layout:
    """Batch sizes, and for padded losses the number of valid targets in each batch."""

    name: str
    sizes: tuple
    valid: tuple | None = None  # valid targets per batch, applied to padded losses; None: all valid
    shuffled: bool = False
    needs_padding: bool = False  # only meaningful with a padded loss


LAYOUTS: dict[str, Layout] = {
    case.name: case
    for case in [
        Layout("single_batch", (6,)),
        Layout("uneven", (5, 2, 7), valid=(5, 1, 7)),
        Layout("fully_padded", (4, 3, 5), valid=(3, 0, 4), needs_padding=True),
        Layout("shuffled", (4, 4, 4), shuffled=True),
    ]
}

SEQ = 3  # tokens per sequence for token models


def _valid_mask(n_targets: int, n_valid: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(n_targets, dtype=torch.bool)
    mask[torch.randperm(n_targets, generator=gen)[:n_valid]] = True
    return mask


def _make_batch(model: ModelCase, loss: LossCase, n: int, valid: int | None, classes: int, gen):
    if model.inputs == "tokens":
        x = torch.randint(0, classes, (n, SEQ), generator=gen)
        y = torch.randint(0, classes, (n, SEQ), generator=gen)
    else:
        x = torch.randn(n, 4, generator=gen, dtype=f64)
        if loss.targets == "regression":
            y = torch.randn(n, classes, generator=gen, dtype=f64)
        else:
            y = torch.randint(0, classes, (n,), generator=gen)
    if valid is not None and "padded" in loss.tags:
        flat = y.reshape(-1)
        # the valid count is per batch for tokens (of n * SEQ) and per sample for classes
        keep = _valid_mask(flat.numel(), min(valid, flat.numel()), gen)
        flat[~keep] = IGNORE
        y = flat.reshape(y.shape)
    return x, y


# ---------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """A model, a loss and its batches (a list, or a shuffled ``DataLoader`` over them)."""

    model_case: str
    loss_case: str
    layout: str
    model: nn.Module
    loss_fn: Callable
    batches: list
    data: object  # what to pass as ``data=``: the list, or a re-iterable shuffled loader

    def __str__(self) -> str:
        return f"{self.model_case}-{self.loss_case}-{self.layout}"

    @property
    def tags(self) -> frozenset:
        return MODELS[self.model_case].tags | LOSSES[self.loss_case].tags | {self.layout}


class ShuffledBatches:
    """A re-iterable loader yielding the batches in a new order on each pass (seeded)."""

    def __init__(self, batches, seed=0):
        self.batches = list(batches)
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        for i in torch.randperm(len(self.batches), generator=self.gen).tolist():
            yield self.batches[i]

    def __len__(self):
        return len(self.batches)


def compatible(model_case: str, loss_case: str, layout: str) -> bool:
    """Whether the combination makes sense (token models need token losses, padding needs a padded loss)."""
    m, loss, lay = MODELS[model_case], LOSSES[loss_case], LAYOUTS[layout]
    if (m.inputs == "tokens") != (loss.targets == "tokens"):
        return False
    if lay.needs_padding and "padded" not in loss.tags:
        return False
    return True


def problem(
    model_case: str = "mlp", loss_case: str = "ce", layout: str = "uneven", *, seed: int = 0, classes: int = 3
) -> Problem:
    """Build one case; the same arguments give the same tensors."""
    if not compatible(model_case, loss_case, layout):
        raise ValueError(f"incompatible case {model_case}-{loss_case}-{layout}")
    m, loss, lay = MODELS[model_case], LOSSES[loss_case], LAYOUTS[layout]
    model = m.build(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    valid = lay.valid or (None,) * len(lay.sizes)
    batches = [_make_batch(m, loss, n, v, classes, gen) for n, v in zip(lay.sizes, valid)]
    data = ShuffledBatches(batches, seed) if lay.shuffled else batches
    return Problem(model_case, loss_case, layout, model, loss.make(classes), batches, data)


def problems(models=None, losses=None, layouts=None, *, exclude_tags=()) -> list[Problem]:
    """Every compatible combination of the named cases (all when None), minus the excluded tags."""
    out = []
    for mc, lc, lay in itertools.product(models or MODELS, losses or LOSSES, layouts or LAYOUTS):
        if compatible(mc, lc, lay):
            p = problem(mc, lc, lay)
            if not (p.tags & set(exclude_tags)):
                out.append(p)
    return out


# ------------------------------------------------------------------------------------------ truths
def concatenated(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches as one (inputs, targets) batch."""
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def full_batch_loss(model: nn.Module, loss_fn: Callable, batches) -> torch.Tensor:
    """The loss on the concatenation of all batches: what a correctly weighted aggregation gives."""
    x, y = concatenated(batches)
    return loss_fn(model(x), y)


def full_batch_gradient(model: nn.Module, loss_fn: Callable, batches, params=None) -> torch.Tensor:
    """Flat gradient of :func:`full_batch_loss` by autograd (one big batch)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    grads = torch.autograd.grad(full_batch_loss(model, loss_fn, batches), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


# ---------------------------------------------------------------------------------------- closures
def _zero_none(optimizer, model):
    optimizer.zero_grad(set_to_none=True)


def _zero_in_place(optimizer, model):
    optimizer.zero_grad(set_to_none=False)


def _zero_manual(optimizer, model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()


CLOSURES: dict[str, Callable] = {
    "set_to_none": _zero_none,
    "in_place": _zero_in_place,  # the pre-2.0 default, still common
    "manual_in_place": _zero_manual,  # ``p.grad.zero_()`` in the user's loop
}


def make_closure(
    optimizer, model: nn.Module, loss_fn: Callable, batch, zeroing: str = "set_to_none", *, create_graph: bool = False
):
    """The standard ``closure()`` of a training loop, with the named way of zeroing gradients."""
    zero = CLOSURES[zeroing]
    x, y = batch

    def closure():
        zero(optimizer, model)
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure
