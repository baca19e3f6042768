"""What the ``curvature`` command analyses: the :class:`Problem` protocol, loading and checking it.

A problem is a model, a loss and data. Users name a builder function with ``--problem``
(:mod:`curvature.app.loader` finds it); the builder returns a :class:`Problem`.

Everything that can be wrong with a problem is checked here, before any curvature is computed, and
raised as a :class:`ProblemError` subclass whose ``exit_code`` the command returns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from curvature import call_model, select_output

__all__ = [
    "BadDataError",
    "BadProblemError",
    "EmptyDataError",
    "FrozenParametersError",
    "ModelCallError",
    "NonFiniteLossError",
    "Problem",
    "ProblemError",
    "ProblemNotFoundError",
    "TrainModeError",
    "check_problem",
    "problem_from",
]

#: ``metric(outputs, targets) -> batch mean`` (a float or a 0-d tensor), or ``"accuracy"``.
Metric = Union[str, Callable[[Any, Tensor], Any]]


class ProblemError(ValueError):
    """A problem that cannot be analysed; ``exit_code`` is what the command returns for it."""

    exit_code = 3


class ProblemNotFoundError(ProblemError, ImportError):
    """The ``--problem`` spec names no importable builder."""

    exit_code = 3


class BadProblemError(ProblemError, TypeError):
    """The builder returned something that is not a problem."""

    exit_code = 4


class NonFiniteLossError(ProblemError):
    """The loss is NaN or infinite on some batch."""

    exit_code = 7


class TrainModeError(ProblemError):
    """The model is in train mode with modules whose output then depends on randomness or batch statistics."""

    exit_code = 8


class EmptyDataError(ProblemError):
    """The data holds no batch."""

    exit_code = 9


class FrozenParametersError(ProblemError):
    """No parameter of the model requires grad."""

    exit_code = 10


class BadDataError(ProblemError, TypeError):
    """The data is not an ``(inputs, targets)`` batch or an iterable of them."""

    exit_code = 11


class ModelCallError(ProblemError):
    """The model or the loss fails on the first batch (e.g. an input-shape mismatch)."""

    exit_code = 12


@dataclass
class Problem:
    """A model, its loss and its data: what ``curvature report`` and its subcommands analyse.

    Attributes:
        model: the ``nn.Module`` (analysed in eval mode).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        data: one ``(inputs, targets)`` batch or a re-iterable of them (a list, a DataLoader);
            ``inputs`` a tensor, a tuple of tensors or a dict of keyword tensors.
        name: how the report titles the model.
        metric: ``"accuracy"`` or ``metric(outputs, targets) -> batch mean``, reported over
            ``data``; ``None`` for none.
        num_classes: for classification, the number of classes (the outlier analysis compares the
            number of outlying eigenvalues with it).
        info: further numbers to show in the report, e.g. ``{"held-out accuracy": 0.97}``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
        >>> data = (torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))
        >>> p = Problem(model, nn.CrossEntropyLoss(), data, name="tiny", metric="accuracy")
        >>> p.name, check_problem(p).num_params
        ('tiny', 15)
    """

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    data: Any
    name: str = "model"
    metric: Metric | None = None
    num_classes: int | None = None
    info: dict[str, float] = field(default_factory=dict)


_EXPECTED = "curvature.app.Problem(model, loss_fn, data, name=...)"


def _describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(x).__name__ for x in obj)})"
    if isinstance(obj, Mapping):
        return f"a dict with keys {sorted(map(str, obj))}"
    return f"a {type(obj).__name__}"


def _has_params(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and any(True for _ in obj.parameters())


def problem_from(result: Any, *, source: str = "the builder") -> Problem:
    """Check that a builder returned a :class:`Problem` whose parts have the right kinds.

    Examples:
        >>> model = nn.Linear(2, 2)
        >>> problem_from(Problem(model, nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 2)))).name
        'model'
        >>> problem_from((model, nn.MSELoss(), None))
        Traceback (most recent call last):
        ...
        curvature.app.problem.BadProblemError: the builder returned a tuple of 3 (Linear, MSELoss, NoneType); ...
    """
    if not isinstance(result, Problem):
        alone = " (the model alone)" if isinstance(result, nn.Module) else ""
        raise BadProblemError(f"{source} returned {_describe(result)}{alone}; expected {_EXPECTED}")
    _check_roles(result, source)
    return result


def _check_roles(problem: Problem, source: str) -> None:
    """The three parts are of the right kinds (swapped parts are named as such)."""
    parts = {"model": problem.model, "loss_fn": problem.loss_fn, "data": problem.data}
    if not _has_params(problem.model):
        where = [k for k, v in parts.items() if _has_params(v)]
        hint = f"; the model came as {where[0]} — pass Problem(model, loss_fn, data) in that order" if where else ""
        raise BadProblemError(
            f"{source}: model is {_describe(problem.model)}, expected an nn.Module with parameters{hint}"
        )
    if not callable(problem.loss_fn) or _has_params(problem.loss_fn):
        raise BadProblemError(
            f"{source}: loss_fn is {_describe(problem.loss_fn)}, expected a callable loss_fn(outputs, targets)"
        )
    if not isinstance(problem.name, str):
        raise BadProblemError(f"{source}: name is {_describe(problem.name)}, expected a string")
    if problem.metric is not None and problem.metric != "accuracy" and not callable(problem.metric):
        raise BadProblemError(f"{source}: metric must be 'accuracy', a callable or None, got {problem.metric!r}")


@dataclass(frozen=True)
class CheckedProblem:
    """What :func:`check_problem` learnt: sizes, and which parts of the analysis can run."""

    num_params: int
    ggn_unavailable: str | None


def _batches(data: Any) -> list[Any]:
    if isinstance(data, Tensor):
        raise BadDataError(
            f"data is a bare tensor of shape {tuple(data.shape)}; expected an (inputs, targets) batch "
            "or an iterable of such batches"
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor) and not (
        isinstance(data[0], (tuple, list)) and len(data[0]) == 2 and isinstance(data[0][1], Tensor)
    ):
        return [data]
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
        raise BadDataError(f"data is {_describe(data)}; expected an (inputs, targets) batch or an iterable of them")
    if iter(data) is data:
        raise BadDataError("data is a one-shot iterator; pass a list or a DataLoader (it is read many times)")
    first = next(iter(data), None)
    if first is None:
        raise EmptyDataError("data is empty: it yielded no batch")
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise BadDataError(f"the first batch of data is {_describe(first)}; expected an (inputs, targets) pair")
    return [first]


def _shape(x: Any) -> str:
    if isinstance(x, Tensor):
        return str(tuple(x.shape))
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in x) + ")"
    return type(x).__name__


_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)  # noqa: SLF001


def check_problem(
    problem: Problem, *, allow_train_mode: bool = False, device: torch.device | None = None
) -> CheckedProblem:
    """Check everything about ``problem`` that would make the analysis fail later, in one pass.

    Calls the model and the loss on the first batch only (no gradients; later batches are not
    read), so shape mismatches, NaN losses and non-tensor outputs surface before any curvature is
    computed.

    Examples:
        >>> p = Problem(nn.Linear(4, 3).eval(), nn.CrossEntropyLoss(), torch.zeros(8, 4))
        >>> check_problem(p)
        Traceback (most recent call last):
        ...
        curvature.app.problem.BadDataError: data is a bare tensor of shape (8, 4); expected ...
    """
    model = problem.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise FrozenParametersError(
            f"no parameter of the model requires grad (all {sum(1 for _ in model.parameters())} are frozen); "
            "unfreeze the ones to analyse with p.requires_grad_(True)"
        )
    if not allow_train_mode:
        moving = [(n, type(m).__name__) for n, m in model.named_modules() if m.training and isinstance(m, _STOCHASTIC)]
        if moving:
            listed = ", ".join(f"module {n!r} ({t})" for n, t in moving[:3])
            raise TrainModeError(
                f"the model is in train mode with {listed}{' and more' if len(moving) > 3 else ''}, so its "
                "curvature is random; call model.eval() in the builder, or pass --allow-train-mode"
            )
    first = _batches(problem.data)[0]
    inputs, targets = first
    if device is not None:
        inputs, targets = _move(inputs, device), _move(targets, device)
    try:
        with torch.no_grad():
            outputs = call_model(model, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model on its own data
        raise ModelCallError(
            f"the model fails on the first batch (inputs {_shape(inputs)}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    ggn_unavailable = None
    try:
        outputs = select_output(outputs, who="the report")
    except TypeError:  # the user's loss may take the raw output; the GGN needs one tensor
        ggn_unavailable = (f"the model returns {type(outputs).__name__}, not a tensor or an output with .logits "
                           "(the GGN needs one output tensor)")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch warns (and then broadcasts) when an elementwise loss gets mismatched shapes
            warnings.filterwarnings("error", message=".*target size.*different to the input size.*")
            loss = problem.loss_fn(outputs, targets)
    except UserWarning as exc:
        raise BadDataError(f"outputs {_shape(outputs)} and targets {_shape(targets)} of the first batch do not "
                           f"match: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # noqa: BLE001
        raise ModelCallError(
            f"the loss fails on the first batch (outputs {_shape(outputs)}, targets {_shape(targets)}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise BadProblemError(f"loss_fn returned {_describe(loss)} on the first batch; expected a scalar tensor")
    if not math.isfinite(loss.item()):
        raise NonFiniteLossError(f"the loss is {loss.item()} on the first batch; check the data and the model")
    return CheckedProblem(sum(p.numel() for p in trainable), ggn_unavailable)


def _move(x: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, x)
