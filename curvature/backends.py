"""How an operator computes a block of ``k`` products: the backends, and the one policy choosing among them.

Every model operator (:class:`~curvature.Hessian`, :class:`~curvature.GGN`,
:class:`~curvature.Fisher`, :class:`~curvature.EmpiricalFisher`) computes ``op @ V`` for a
``(d, k)`` block with one of these backends (one vocabulary for all operators):

* ``"loop"``: one backward per column through the batch's shared graph: the least memory, and
  each column bitwise equal to its single product;
* ``"vmap"``: the columns batched in one backward (``is_grads_batched``), at most as many per
  pass as the memory budget allows;
* ``"forward_over_reverse"`` (Hessian only): ``vmap(jvp(grad))`` with ``torch.func``;
* ``"finite_difference"`` (Hessian only): central differences of gradients, for models whose
  kernels have no double backward (see ``docs/finite_difference.md``). Approximate, so
  ``"auto"`` never chooses it: ask for it by name.

The choice for blocks of ``k`` columns is made by one policy, :class:`BackendSelector`:
``backend="<name>"`` on the operator fixes it; with ``"auto"`` (default) single columns and
``deterministic=True`` use ``"loop"`` (a fixed rule: the same code and the same bits on every
run); otherwise the choice recorded for (operator, model structure, device, ``k``) is used, and
when there is none the backends whose columns fit the memory budget are timed on the first (at
most :data:`TRIAL_COLUMNS`) columns in :data:`TRIAL_ROUNDS` interleaved rounds; a batched backend
is kept only if its MEDIAN time per column beats the loop's by more than :data:`TOLERANCE`, and a
kept batched backend is timed again on the next :data:`RECHECK_PRODUCTS` products (back to the
loop if it turned out slower). An out-of-memory error in a batched backend falls back to the loop.

Read a choice with ``op.backend_choice(k)``; pin one for every operator of that model, device
and ``k`` with :func:`pin` (``op.backend_key(k)`` gives the key).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from curvature import Hessian
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> H = Hessian(model, nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 2)))
    >>> key = H.backend_key(4)
    >>> pin(key, "loop")
    >>> H.backend_choice(4).backend, lookup(key).source
    ('loop', 'pinned')
    >>> unpin(key)
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._memory import default_memory_budget, is_out_of_memory

__all__ = [
    "BACKENDS",
    "BackendKey",
    "BackendChoice",
    "BackendSelector",
    "SelectsBackend",
    "TOLERANCE",
    "TRIAL_COLUMNS",
    "TRIAL_ROUNDS",
    "PRUNE_FACTOR",
    "RECHECK_PRODUCTS",
    "model_signature",
    "select_by_medians",
    "lookup",
    "record",
    "pin",
    "unpin",
    "clear",
    "choices",
]

logger = logging.getLogger(__name__)

#: Every backend name (the first is the safe, memory-lightest default of ``"auto"``).
BACKENDS = ("loop", "vmap", "forward_over_reverse", "finite_difference")
#: The backend of single columns, ``deterministic=True`` and every fallback.
LOOP = "loop"
#: Backends ``"auto"`` never chooses (approximate products).
NEVER_AUTO = ("finite_difference",)

#: A batched backend is kept only when its median time per column is this much below the loop's.
TOLERANCE = 0.10
#: Columns ``"auto"`` times each backend on (at most; fewer when memory is short).
TRIAL_COLUMNS = 8
#: Interleaved timing rounds of ``"auto"`` (the choice compares medians).
TRIAL_ROUNDS = 3
#: A backend slower than this multiple of the fastest in a round gets no further rounds.
PRUNE_FACTOR = 2.0
#: Products after a measured batched choice whose first batch is timed again to re-check it.
RECHECK_PRODUCTS = 2


@dataclass(frozen=True)
class BackendKey:
    """What a backend choice is valid for.

    Attributes:
        operator: the operator's class name (``"Hessian"``, ``"GGN"``, ...).
        model: :func:`model_signature` of the model and the selected parameters.
        device: ``str(device)`` of the operator.
        k: number of columns of the block (``op @ V`` with ``V`` of shape ``(d, k)``).
    """

    operator: str
    model: str
    device: str
    k: int


@dataclass(frozen=True)
class BackendChoice:
    """A choice of backend for blocks of ``k`` columns.

    Attributes:
        backend: one of :data:`BACKENDS`.
        source: ``"measured"`` (timed), ``"pinned"`` (by :func:`pin`), ``"rule"`` (a fixed rule:
            ``backend=`` given, ``deterministic=True``, a single column, or no batched backend
            fits the memory budget).
        seconds_per_column: median seconds per column of each backend timed (``{}`` if none).
        bytes_per_column: estimated (CPU) or measured (CUDA) extra memory per column of the
            batched backends.
        columns: columns per batched pass (from the memory budget), ``None``: all, or the loop.
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
_recorded: dict[BackendKey, BackendChoice] = {}


def model_signature(model: nn.Module, param_names: Sequence[str] = ()) -> str:
    """A short digest of the model's structure: module types, parameter and buffer shapes and
    dtypes, and the selected parameters (values do not enter it).

    Examples:
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
    """The backend with the smallest median time, except that the loop (the first of
    :data:`BACKENDS` present) is kept unless the best median is more than ``tolerance`` below its own.

    Examples:
        >>> select_by_medians({"loop": [1.0, 1.0, 1.0], "vmap": [0.5, 3.0, 0.95]})
        'loop'
        >>> select_by_medians({"loop": [1.0, 1.1, 1.0], "vmap": [0.5, 0.6, 2.0]})
        'vmap'
    """
    if not samples:
        raise ValueError("samples must time at least one backend")
    medians = {name: statistics.median(times) for name, times in samples.items() if times}
    best = min(medians, key=medians.__getitem__)
    default = next((s for s in BACKENDS if s in medians), best)
    if medians[best] < (1.0 - tolerance) * medians[default]:
        return best
    return default


def lookup(key: BackendKey) -> BackendChoice | None:
    """The recorded choice for ``key`` (``None`` if none yet)."""
    with _lock:
        return _recorded.get(key)


def record(key: BackendKey, choice: BackendChoice) -> BackendChoice:
    """Record ``choice`` for ``key`` unless a pinned choice is there; return the one in force."""
    with _lock:
        current = _recorded.get(key)
        if current is not None and current.source == "pinned":
            return current
        _recorded[key] = choice
        return choice


def pin(key: BackendKey, backend: str, *, columns: int | None = None) -> None:
    """Fix the backend for ``key`` (``op.backend_key(k)`` gives it); no timing happens."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if columns is not None and (not isinstance(columns, int) or columns < 1):
        raise ValueError(f"columns must be a positive integer or None, got {columns!r}")
    with _lock:
        _recorded[key] = BackendChoice(backend, "pinned", columns=columns, reason="pinned by the user")


def unpin(key: BackendKey) -> None:
    """Forget the choice for ``key`` (pinned or not); the next block measures again."""
    with _lock:
        _recorded.pop(key, None)


def clear() -> None:
    """Forget every recorded choice."""
    with _lock:
        _recorded.clear()


def choices() -> dict[BackendKey, BackendChoice]:
    """A copy of all recorded choices."""
    with _lock:
        return dict(_recorded)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``run(backend, V, columns)``: the product of one batch with the per-parameter columns ``V``
#: (``(k, *shape)`` each), ``columns`` per batched pass (``None``: the operator's default).
Runner = Callable[[str, list[Tensor], "int | None"], list[Tensor]]


class BackendSelector:
    """The one policy by which an operator chooses the backend of a block of ``k`` columns.

    An operator owns one selector and calls :meth:`product` per batch with a ``run`` callback
    (computing the batch's product with a named backend) and its memory estimates; the selector
    decides, times, records and re-checks (see the module docs).

    Args:
        operator: the operator's class name (part of :class:`BackendKey`).
        supported: the backends the operator implements (the loop first).
        backend: ``"auto"`` or one of ``supported``.
        deterministic: with ``"auto"``, always the loop (a fixed rule, no timing).
        memory_budget: bytes the columns of a batched pass may take (``None``:
            :func:`curvature._memory.default_memory_budget` of the device, read when needed).
        probe_batch_size: columns per batched pass when set (the operator's option).

    Examples:
        >>> sel = BackendSelector("Demo", ("loop", "vmap"), backend="auto", deterministic=True)
        >>> sel.rule(4).backend, sel.rule(4).reason
        ('loop', 'deterministic=True')
    """

    def __init__(
        self,
        operator: str,
        supported: Sequence[str],
        *,
        backend: str = "auto",
        deterministic: bool = False,
        memory_budget: int | None = None,
        probe_batch_size: int | None = None,
    ):
        supported = tuple(supported)
        if backend != "auto" and backend not in supported:
            raise ValueError(f"backend must be one of {('auto', *supported)}, got {backend!r}")
        if memory_budget is not None and (isinstance(memory_budget, bool) or int(memory_budget) < 0):
            raise ValueError(f"memory_budget must be a non-negative number of bytes or None, got {memory_budget!r}")
        self.operator = operator
        self.supported = supported
        self.backend = backend
        self.deterministic = bool(deterministic)
        self.memory_budget = int(memory_budget) if memory_budget is not None else None
        self.probe_batch_size = probe_batch_size
        self._used: dict[int, BackendChoice] = {}  # the choice each k ran with (survives clear())
        self._rechecks: dict[int, int] = {}

    # -- reading the choice -------------------------------------------------------------------------
    def rule(self, k: int) -> BackendChoice | None:
        """The choice a fixed rule makes (``None``: ``"auto"`` must look it up or measure)."""
        if self.backend != "auto":
            return BackendChoice(
                self.backend, "rule", columns=self.probe_batch_size, reason=f"backend={self.backend!r}"
            )
        if k == 1:
            return BackendChoice(LOOP, "rule", reason="a single column")
        if self.deterministic:
            return BackendChoice(LOOP, "rule", reason="deterministic=True")
        return None

    def choice(self, key: BackendKey) -> BackendChoice | None:
        """The choice in force for blocks of ``key.k`` columns (``None``: not chosen yet)."""
        rule = self.rule(key.k)
        if rule is not None:
            return rule
        return lookup(key) or self._used.get(key.k)

    def budget(self, device: torch.device) -> int:
        """Bytes a batched pass may take."""
        return self.memory_budget if self.memory_budget is not None else default_memory_budget(device)

    def columns(self, backend: str, k: int, per_column: int, device: torch.device) -> int:
        """Columns per batched pass: ``probe_batch_size``, else what the memory budget allows."""
        if self.probe_batch_size is not None:
            return self.probe_batch_size
        if per_column <= 0:
            return k
        return max(1, min(k, int(self.budget(device) // per_column)))

    # -- one batch's product --------------------------------------------------------------------
    def product(
        self,
        key: BackendKey,
        device: torch.device,
        V: list[Tensor],
        run: Runner,
        bytes_per_column: Callable[[str], int],
        *,
        first_batch: bool,
    ) -> list[Tensor]:
        """One batch's product with the backend in force for ``key`` (chosen now if there is none).

        ``bytes_per_column(backend)``: the estimated extra memory per column of a batched
        backend (0: unknown, all columns in one pass)."""
        choice = self.choice(key)
        if choice is None:
            return self._choose_and_apply(key, device, V, run, bytes_per_column)
        if choice.source == "measured" and self._rechecks.get(key.k, 0) > 0 and first_batch:
            return self._recheck(key, device, choice, V, run, bytes_per_column)
        return self.apply(key, device, choice, V, run, bytes_per_column)

    def apply(
        self, key: BackendKey, device: torch.device, choice: BackendChoice, V: list[Tensor], run: Runner,
        bytes_per_column: Callable[[str], int],
    ) -> list[Tensor]:
        backend, k = choice.backend, V[0].shape[0]
        if backend in (LOOP, "finite_difference"):
            return run(backend, V, None)
        columns = choice.columns or self.columns(backend, k, bytes_per_column(backend), device)
        try:
            return run(backend, V, columns)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            _free_after_oom(exc, device)
            logger.warning("%s: %s ran out of memory on %d columns; using the loop", self.operator, backend, columns)
            fallback = BackendChoice(LOOP, "rule", reason=f"{backend} ran out of memory")
            if self.backend == "auto":
                self._used[k] = record(key, fallback)
            return run(LOOP, V, None)

    def _choose_and_apply(
        self, key: BackendKey, device: torch.device, V: list[Tensor], run: Runner,
        bytes_per_column: Callable[[str], int],
    ) -> list[Tensor]:
        k = V[0].shape[0]
        choice, head, done = self._measure(device, V, run, bytes_per_column)
        choice = record(key, choice)
        self._used[k] = choice
        self._rechecks[k] = RECHECK_PRODUCTS if choice.source == "measured" and choice.backend != LOOP else 0
        if done >= k:
            return head
        rest = self.apply(key, device, choice, [v[done:] for v in V], run, bytes_per_column)
        return [torch.cat([h, r]) for h, r in zip(head, rest)]

    def _measure(
        self, device: torch.device, V: list[Tensor], run: Runner, bytes_per_column: Callable[[str], int]
    ) -> tuple[BackendChoice, list[Tensor], int]:
        """Time the backends that fit the memory budget on the first columns (interleaved rounds,
        medians); return the choice, its results for those columns and how many columns they are."""
        k = V[0].shape[0]
        budget = self.budget(device)
        batched = [s for s in self.supported if s != LOOP and s not in NEVER_AUTO]
        per_column = {s: int(bytes_per_column(s)) for s in batched}
        fits = {s: (budget // b if b > 0 else k) for s, b in per_column.items()}
        limit = min(k, TRIAL_COLUMNS, self.probe_batch_size or TRIAL_COLUMNS)
        candidates = [LOOP] + [s for s in batched if fits[s] >= 2]
        cols = min([limit] + [fits[s] for s in candidates[1:]])
        if len(candidates) == 1 or cols < 2:
            choice = BackendChoice(
                LOOP, "rule", bytes_per_column=per_column,
                reason=f"no batched backend fits the memory budget ({budget} bytes)",
            )
            return choice, run(LOOP, [v[:1] for v in V], None), 1
        trial = [v[:cols] for v in V]
        samples: dict[str, list[float]] = {s: [] for s in candidates}
        results: dict[str, list[Tensor]] = {}
        for rnd in range(TRIAL_ROUNDS):
            order = candidates[rnd % len(candidates):] + candidates[: rnd % len(candidates)]
            for backend in order:
                peak = _start_peak(device)
                synchronize(device)
                start = time.perf_counter()
                try:
                    results[backend] = run(backend, trial, cols)
                except (RuntimeError, NotImplementedError, MemoryError) as exc:
                    # Some ops lack forward-AD or batching rules (mse_loss's zero tangents under vmap).
                    if backend == LOOP:
                        raise
                    logger.info("%s backend 'auto': %s unavailable here (%s)", self.operator, backend, exc)
                    _free_after_oom(exc, device)
                    candidates.remove(backend)
                    samples.pop(backend)
                    results.pop(backend, None)
                    continue
                synchronize(device)
                samples[backend].append((time.perf_counter() - start) / cols)
                if peak is not None and backend != LOOP:
                    per_column[backend] = max(0, (torch.cuda.max_memory_allocated(device) - peak) // cols)
            fastest = min(min(t) for t in samples.values())
            for backend in [s for s in candidates if s != LOOP and min(samples[s]) > PRUNE_FACTOR * fastest]:
                candidates.remove(backend)
            if len(candidates) == 1:
                break
        backend = select_by_medians({s: samples[s] for s in candidates})
        medians = {s: statistics.median(t) for s, t in samples.items() if t}
        columns = None
        if backend != LOOP:
            columns = self.columns(backend, k, per_column.get(backend, 0), device)
        choice = BackendChoice(
            backend, "measured", seconds_per_column=medians, bytes_per_column=per_column, columns=columns,
            reason=f"medians of {TRIAL_ROUNDS} interleaved rounds on {cols} columns",
        )
        logger.info("%s backend 'auto' chose %s (%s)", self.operator, backend, medians)
        return choice, results[backend], cols

    def _recheck(
        self, key: BackendKey, device: torch.device, choice: BackendChoice, V: list[Tensor], run: Runner,
        bytes_per_column: Callable[[str], int],
    ) -> list[Tensor]:
        """Time a product of a measured batched choice; fall back to the loop if it is more than
        the tolerance slower per column than the loop measured."""
        k = V[0].shape[0]
        self._rechecks[k] -= 1
        columns = choice.columns or self.columns(choice.backend, k, bytes_per_column(choice.backend), device)
        synchronize(device)
        start = time.perf_counter()
        out = run(choice.backend, V, columns)
        synchronize(device)
        per_column = (time.perf_counter() - start) / k
        loop = choice.seconds_per_column.get(LOOP)
        if loop is not None and per_column > (1.0 + TOLERANCE) * loop:
            logger.info("%s backend 'auto': %s took %.3g s/column > loop %.3g; switching", self.operator,
                        choice.backend, per_column, loop)
            fallback = BackendChoice(
                LOOP, "measured", seconds_per_column={**choice.seconds_per_column, choice.backend: per_column},
                bytes_per_column=choice.bytes_per_column, reason="re-check: the batched backend was slower",
            )
            self._used[k] = record(key, fallback)
            self._rechecks[k] = 0
        return out


def _start_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _free_after_oom(exc: BaseException, device: torch.device) -> None:
    if is_out_of_memory(exc) and device.type == "cuda":
        torch.cuda.empty_cache()


class SelectsBackend:
    """Mixin of the model operators whose products go through a :class:`BackendSelector`:
    reading the choice (:meth:`backend_choice`) and its key (:meth:`backend_key`)."""

    _selector: BackendSelector
    _signature: str | None = None
    backends: tuple[str, ...]
    model: nn.Module
    param_names: list[str]
    device: torch.device

    def _init_selector(
        self, init: Any, model: nn.Module, loss_fn: Any, data: Any, *, backend: str, deterministic: bool,
        memory_budget: int | None, options: dict[str, Any],
    ) -> None:
        """Check the backend options, then run the operator's base ``init`` and attach the selector."""
        selector = BackendSelector(
            type(self).__name__, self.backends, backend=backend, deterministic=deterministic,
            memory_budget=memory_budget, probe_batch_size=options.get("probe_batch_size"),
        )
        init(model, loss_fn, data, **options)
        self._selector = selector
        self._selector.probe_batch_size = getattr(self, "probe_batch_size", None)

    @property
    def backend(self) -> str:
        """The ``backend=`` option (``"auto"`` or a backend name)."""
        return self._selector.backend

    @property
    def deterministic(self) -> bool:
        """Whether a fixed rule (``"loop"``) replaces the timed choice."""
        return self._selector.deterministic

    @property
    def memory_budget(self) -> int | None:
        """The bytes the columns of one batched pass may take (``None``: the device default)."""
        return self._selector.memory_budget

    def backend_key(self, k: int) -> BackendKey:
        """The :class:`BackendKey` of blocks of ``k`` columns (for :func:`pin`)."""
        if self._signature is None:
            self._signature = model_signature(self.model, self.param_names)
        return BackendKey(type(self).__name__, self._signature, str(self.device), int(k))

    def backend_choice(self, k: int) -> BackendChoice | None:
        """The :class:`BackendChoice` in force for blocks of ``k`` columns (``None``: ``"auto"``
        has not chosen yet)."""
        return self._selector.choice(self.backend_key(k))
