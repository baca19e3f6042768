"""The Hessian's ``backend="auto"`` choices: a readable, pinnable registry and the decision rule.

A choice is recorded per :class:`ChoiceKey` (model structure, dtype, device, number of columns
``k``), so every operator on the same model, device and block size runs the same strategy for the
rest of the process and the user can read it (:func:`choices`, :func:`lookup`) or fix it
(:func:`pin`). The measured choice compares MEDIANS of several interleaved timing samples per
strategy and keeps the memory-lightest strategy (the loop of double backwards) unless a vmapped
one is more than :data:`TOLERANCE` faster, so noise on a shared machine cannot make it keep a
strategy much slower than the best.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from curvature import Hessian
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> H = Hessian(model, nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 2)))
    >>> key = H.backend_key(4)
    >>> pin(key, "double_backward")
    >>> H.resolved_backend(4), lookup(key).source
    ('double_backward', 'pinned')
    >>> unpin(key)
"""

from __future__ import annotations

import hashlib
import statistics
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

__all__ = [
    "ChoiceKey",
    "BackendChoice",
    "STRATEGIES",
    "TOLERANCE",
    "model_signature",
    "select_by_medians",
    "lookup",
    "record",
    "pin",
    "unpin",
    "clear",
    "choices",
]

#: The strategies ``"auto"`` chooses among (the first is the safe, memory-lightest default).
STRATEGIES = ("double_backward", "double_backward_vmap", "forward_over_reverse")

#: A vmapped strategy is kept only when its median time per column is this much below the loop's.
TOLERANCE = 0.10


@dataclass(frozen=True)
class ChoiceKey:
    """What a backend choice is valid for.

    Attributes:
        model: :func:`model_signature` of the model and the selected parameters.
        device: ``str(device)`` of the operator.
        k: number of columns of the block (``H @ V`` with ``V`` of shape ``(d, k)``).
    """

    model: str
    device: str
    k: int


@dataclass(frozen=True)
class BackendChoice:
    """A recorded choice.

    Attributes:
        backend: the strategy used for blocks with this key.
        source: ``"measured"`` (timed), ``"pinned"`` (by :func:`pin`), ``"rule"`` (a fixed rule:
            ``deterministic=True``, a single column, or no vmapped strategy fits the memory budget).
        seconds_per_column: median seconds per column of each strategy timed (``{}`` if none).
        bytes_per_column: estimated (CPU) or measured (CUDA) extra memory per column of the
            vmapped strategies.
        columns: columns per vmapped pass (from the memory budget), ``None`` for the loop.
        reason: a short human-readable explanation.
    """

    backend: str
    source: str
    seconds_per_column: Mapping[str, float] = field(default_factory=dict)
    bytes_per_column: Mapping[str, int] = field(default_factory=dict)
    columns: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds_per_column"] = dict(self.seconds_per_column)
        out["bytes_per_column"] = dict(self.bytes_per_column)
        return out


_lock = threading.Lock()
_registry: dict[ChoiceKey, BackendChoice] = {}


def model_signature(model: nn.Module, param_names: Sequence[str] = ()) -> str:
    """A short digest of the model's structure: module types, parameter and buffer shapes and
    dtypes, and the selected parameters (values do not enter it).

    Example:
        >>> model_signature(nn.Linear(2, 3)) == model_signature(nn.Linear(2, 3))
        True
        >>> model_signature(nn.Linear(2, 3)) == model_signature(nn.Linear(3, 3))
        False
    """
    parts = [f"{name}:{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()]
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in (*model.named_parameters(), *model.named_buffers())]
    parts.append("|".join(param_names))
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def select_by_medians(samples: Mapping[str, Sequence[float]], *, tolerance: float = TOLERANCE) -> str:
    """The strategy with the smallest median time, except that the first of :data:`STRATEGIES`
    present (the loop) is kept unless the best median is more than ``tolerance`` below its own.

    Example:
        >>> select_by_medians({"double_backward": [1.0, 1.0, 1.0], "double_backward_vmap": [0.5, 3.0, 0.95]})
        'double_backward'
        >>> select_by_medians({"double_backward": [1.0, 1.1, 1.0], "double_backward_vmap": [0.5, 0.6, 2.0]})
        'double_backward_vmap'
    """
    if not samples:
        raise ValueError("samples must time at least one strategy")
    medians = {name: statistics.median(times) for name, times in samples.items() if times}
    best = min(medians, key=medians.get)
    default = next((s for s in STRATEGIES if s in medians), best)
    if medians[best] < (1.0 - tolerance) * medians[default]:
        return best
    return default


def lookup(key: ChoiceKey) -> BackendChoice | None:
    """The recorded choice for ``key`` (``None`` if none yet)."""
    with _lock:
        return _registry.get(key)


def record(key: ChoiceKey, choice: BackendChoice) -> BackendChoice:
    """Record ``choice`` for ``key`` unless a pinned choice is there; return the one in force."""
    with _lock:
        current = _registry.get(key)
        if current is not None and current.source == "pinned":
            return current
        _registry[key] = choice
        return choice


def pin(key: ChoiceKey, backend: str, *, columns: int | None = None) -> None:
    """Fix the strategy for ``key`` (``Hessian.backend_key(k)`` gives it); no timing happens."""
    if backend not in STRATEGIES:
        raise ValueError(f"backend must be one of {STRATEGIES}, got {backend!r}")
    if columns is not None and (not isinstance(columns, int) or columns < 1):
        raise ValueError(f"columns must be a positive integer or None, got {columns!r}")
    with _lock:
        _registry[key] = BackendChoice(backend, "pinned", columns=columns, reason="pinned by the user")


def unpin(key: ChoiceKey) -> None:
    """Forget the choice for ``key`` (pinned or not); the next block measures again."""
    with _lock:
        _registry.pop(key, None)


def clear() -> None:
    """Forget every recorded choice."""
    with _lock:
        _registry.clear()


def choices() -> dict[ChoiceKey, BackendChoice]:
    """A copy of all recorded choices."""
    with _lock:
        return dict(_registry)
