"""The Hessian of the loss over a dataset, applied to blocks of vectors."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import backend_choice as registry
from ._memory import default_memory_budget, is_out_of_memory
from .backend_choice import BackendChoice, ChoiceKey, model_signature, select_by_medians
from .functional import model_as_function
from .model_operator import FlatParts, ModelOperator, _measure_saved_bytes
from .outputs import select_output

__all__ = ["Hessian", "HESSIAN_BACKENDS"]

logger = logging.getLogger(__name__)

#: Columns the ``"auto"`` backend times each strategy on (at most; fewer when memory is short).
AUTOTUNE_COLUMNS = 8
#: Interleaved timing rounds of the ``"auto"`` backend (the choice compares medians).
AUTOTUNE_ROUNDS = 3
#: A strategy slower than this multiple of the fastest in a round gets no further rounds.
PRUNE_FACTOR = 2.0
#: Products after a measured choice whose first batch is timed again to re-check it.
RECHECK_PRODUCTS = 2
#: Estimated extra memory per column of the vmapped strategies, in units of the bytes the
#: first-order graph saves (the second backward's intermediates are activation-sized per column;
#: forward-over-reverse also carries tangents and its own graph).
BYTES_PER_COLUMN_FACTOR = {"double_backward_vmap": 1.0, "forward_over_reverse": 2.0}

HESSIAN_BACKENDS = ("auto", "double_backward", "double_backward_vmap", "forward_over_reverse")

_LOOP = "double_backward"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Hessian(ModelOperator):
    """Hessian of the loss of ``model`` over ``data`` with respect to the selected parameters.

    ``H @ V`` for a ``(d, k)`` block shares one forward and one create-graph backward per data
    batch among all ``k`` columns; only the second backward is paid per column.

    Args:
        model: the network, analysed as it is (call ``model.eval()`` first).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        data: one ``(inputs, targets)`` batch or a re-iterable of batches (a DataLoader);
            ``inputs`` may be a tensor, a tuple of tensors (positional) or a dict (keywords).
        backend: ``"double_backward"`` (one second backward per column through the shared
            graph: the least memory, and each column bitwise equal to its single product),
            ``"double_backward_vmap"`` (the second backward vmapped over columns),
            ``"forward_over_reverse"`` (``vmap(jvp(grad))``), or ``"auto"`` (default): single
            columns use the double backward; for ``k`` columns the choice recorded in
            :mod:`curvature.backend_choice` for (model structure, device, ``k``) is used, and
            when there is none the strategies that fit ``memory_budget`` are timed on the first
            (at most 8) columns, in 3 interleaved rounds; the vmapped ones are kept only if their
            median time per column beats the loop's by more than 10%, and the choice is re-timed
            on the next 2 products. Read it with :meth:`backend_choice`, pin it with
            :func:`curvature.backend_choice.pin`.
        deterministic: with ``backend="auto"``, use the fixed rule (the double backward for every
            ``k``) instead of timings, so which code runs, and the result, is the same on every
            run (bitwise, on the CPU; on CUDA also set ``torch.use_deterministic_algorithms``).
        memory_budget: bytes the columns of a vmapped pass may take; ``None``: measured when
            needed, :func:`curvature._memory.default_memory_budget` (a quarter of the free memory
            on CUDA; on the CPU 20% of the process's resident memory, at least 64 MiB). The
            memory per column is estimated from the bytes the batch's first-order graph saves
            (measured on CUDA during the trials); with ``probe_batch_size=None`` a vmapped pass
            takes ``memory_budget // bytes_per_column`` columns at a time, and an out-of-memory
            error falls back to the double backward.
        **options: ``params``, ``reduction``, ``probe_batch_size``, ``cache_graph``,
            ``graph_cache_bytes``, ``allow_train_mode``, ``check_finite``, ``progress``; see
            :class:`~curvature.model_operator.ModelOperator`. With the default graph cache, a
            single batch's create-graph backward is kept (about one to two times the activation
            memory), as PyHessian does, so repeated products pay only the second backward; the
            peak of a product is then that graph plus one column's second backward (loop) or
            plus ``memory_budget`` at most (vmapped strategies).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> H = Hessian(model, nn.CrossEntropyLoss(), (x, y))
        >>> H.shape, (H @ torch.ones(H.shape[0])).shape
        ((26, 26), torch.Size([26]))
        >>> Hd = Hessian(model, nn.CrossEntropyLoss(), (x, y), deterministic=True)
        >>> V = torch.ones(26, 4)
        >>> bool(torch.equal(Hd @ V, Hd @ V)), Hd.backend_choice(4).backend
        (True, 'double_backward')
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        backend: str = "auto",
        deterministic: bool = False,
        memory_budget: int | None = None,
        **options: Any,
    ):
        if backend not in HESSIAN_BACKENDS:
            raise ValueError(f"backend must be one of {HESSIAN_BACKENDS}, got {backend!r}")
        if memory_budget is not None and (isinstance(memory_budget, bool) or int(memory_budget) < 0):
            raise ValueError(f"memory_budget must be a non-negative number of bytes or None, got {memory_budget!r}")
        super().__init__(model, loss_fn, data, **options)
        self.backend = backend
        self.deterministic = bool(deterministic)
        self.memory_budget = int(memory_budget) if memory_budget is not None else None
        self._signature: str | None = None
        self._used: dict[int, BackendChoice] = {}  # the choice each k ran with (survives registry.clear())
        self._rechecks: dict[int, int] = {}
        self._graph_bytes = 0  # the most bytes a batch's first-order graph saved (memory estimates)
        # Forward-over-reverse: None until checked against the double backward on a first product.
        self._forward_ok: bool | None = None

    # -- the backend choice -----------------------------------------------------------------------
    def backend_key(self, k: int) -> ChoiceKey:
        """The :class:`~curvature.backend_choice.ChoiceKey` of blocks of ``k`` columns."""
        if self._signature is None:
            self._signature = model_signature(self.model, self.param_names)
        return ChoiceKey(self._signature, str(self.device), int(k))

    def _rule(self, k: int) -> BackendChoice | None:
        """The choice a fixed rule makes (``None``: ``"auto"`` must look it up or measure)."""
        if self.backend != "auto":
            return BackendChoice(
                self.backend, "rule", columns=self.probe_batch_size, reason=f"backend={self.backend!r}"
            )
        if k == 1:
            return BackendChoice(_LOOP, "rule", reason="a single column")
        if self.deterministic:
            return BackendChoice(_LOOP, "rule", reason="deterministic=True")
        return None

    def backend_choice(self, k: int) -> BackendChoice | None:
        """The choice in force for blocks of ``k`` columns (``None``: not chosen yet)."""
        rule = self._rule(k)
        if rule is not None:
            return rule
        return registry.lookup(self.backend_key(k)) or self._used.get(k)

    def resolved_backend(self, k: int) -> str | None:
        """The backend used for a block of ``k`` columns (``None``: ``"auto"`` has not chosen yet)."""
        choice = self.backend_choice(k)
        return choice.backend if choice is not None else None

    def _budget(self) -> int:
        return self.memory_budget if self.memory_budget is not None else default_memory_budget(self.device)

    def _vmap_columns(self, backend: str, index: int, k: int) -> int:
        """Columns per vmapped pass: ``probe_batch_size``, else what the memory budget allows."""
        if self.probe_batch_size is not None:
            return self.probe_batch_size
        per_column = BYTES_PER_COLUMN_FACTOR[backend] * self._graph_bytes
        if per_column <= 0:
            return k
        return max(1, min(k, int(self._budget() // per_column)))

    def _measure(self, index: int, inputs: Any, targets: Any, V: list[Tensor], grads: list[Tensor]) -> tuple[
        BackendChoice, list[Tensor], int
    ]:
        """Time the strategies that fit the memory budget on the first columns (interleaved rounds,
        medians); return the choice, its results for those columns and how many columns they are."""
        k = V[0].shape[0]
        graph = self._graph_bytes
        budget = self._budget()
        per_column = {s: int(f * graph) for s, f in BYTES_PER_COLUMN_FACTOR.items()}
        fits = {s: (budget // b if b > 0 else k) for s, b in per_column.items()}
        limit = min(k, AUTOTUNE_COLUMNS, self.probe_batch_size or AUTOTUNE_COLUMNS)
        candidates = [_LOOP] + [s for s in BYTES_PER_COLUMN_FACTOR if fits[s] >= 2]
        cols = min([limit] + [fits[s] for s in candidates[1:]])
        if len(candidates) == 1 or cols < 2:
            choice = BackendChoice(
                _LOOP, "rule", bytes_per_column=per_column,
                reason=f"no vmapped strategy fits the memory budget ({budget} bytes)",
            )
            return choice, self._product_with(_LOOP, index, inputs, targets, [v[:1] for v in V], grads), 1
        trial = [v[:cols] for v in V]
        samples: dict[str, list[float]] = {s: [] for s in candidates}
        results: dict[str, list[Tensor]] = {}
        for rnd in range(AUTOTUNE_ROUNDS):
            order = candidates[rnd % len(candidates):] + candidates[: rnd % len(candidates)]
            for backend in order:
                peak = self._start_peak()
                _synchronize(self.device)
                start = time.perf_counter()
                try:
                    results[backend] = self._product_with(backend, index, inputs, targets, trial, grads, cols)
                except (RuntimeError, NotImplementedError, MemoryError) as exc:
                    # Some ops lack forward-AD or batching rules (mse_loss's zero tangents under vmap).
                    if backend == _LOOP:
                        raise
                    logger.info("Hessian backend 'auto': %s unavailable here (%s)", backend, exc)
                    self._free_after_oom(exc)
                    candidates.remove(backend)
                    samples.pop(backend)
                    results.pop(backend, None)
                    continue
                _synchronize(self.device)
                samples[backend].append((time.perf_counter() - start) / cols)
                if peak is not None and backend != _LOOP:
                    per_column[backend] = max(0, (torch.cuda.max_memory_allocated(self.device) - peak) // cols)
            fastest = min(min(t) for t in samples.values())
            for backend in [s for s in candidates if s != _LOOP and min(samples[s]) > PRUNE_FACTOR * fastest]:
                candidates.remove(backend)
            if len(candidates) == 1:
                break
        timed = {s: samples[s] for s in candidates}
        backend = select_by_medians(timed)
        medians = {s: sorted(t)[len(t) // 2] for s, t in samples.items() if t}
        columns = None
        if backend != _LOOP:
            columns = self._vmap_columns(backend, index, k)
            if self.probe_batch_size is None and self.device.type == "cuda" and per_column.get(backend, 0) > 0:
                columns = max(1, min(k, budget // per_column[backend]))  # the measured memory per column
        choice = BackendChoice(
            backend, "measured", seconds_per_column=medians, bytes_per_column=per_column, columns=columns,
            reason=f"medians of {AUTOTUNE_ROUNDS} interleaved rounds on {cols} columns",
        )
        logger.info("Hessian backend 'auto' chose %s (%s)", backend, medians)
        return choice, results[backend], cols

    def _start_peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _free_after_oom(self, exc: BaseException) -> None:
        if is_out_of_memory(exc) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def gradient_graph(self, index: int, inputs: Any, targets: Any) -> list[Tensor]:
        """The batch loss's gradient per parameter, with its graph (zeros for unused parameters)."""

        def build() -> list[Tensor]:
            with torch.enable_grad():
                loss = self.second_order_loss(inputs, targets, index)
                return list(
                    torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
                )

        return self._cached(index, build)

    def _measured_gradient_graph(self, index: int, inputs: Any, targets: Any) -> list[Tensor]:
        """:meth:`gradient_graph`, recording the bytes the graph saves the first time (memory estimates)."""
        if self._graph_bytes:
            return self.gradient_graph(index, inputs, targets)
        own = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        grads, size = _measure_saved_bytes(lambda: self.gradient_graph(index, inputs, targets), own)
        entry = self._cache.get(index)
        self._graph_bytes = max(size, entry.nbytes if entry is not None else 0)
        return grads

    def _estimate_graph_bytes(self, index: int, inputs: Any, targets: Any) -> None:
        """Measure the bytes a first-order graph saves without keeping it (forward-over-reverse
        needs no such graph, only the memory estimate)."""
        own = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}

        def build() -> None:
            with torch.enable_grad():
                loss = self.loss(inputs, targets, index)
                torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

        self._graph_bytes = _measure_saved_bytes(build, own)[1]

    # -- products -------------------------------------------------------------------------------
    def _batch_product(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        k = V[0].shape[0]
        choice = self.backend_choice(k)
        if choice is None:
            return self._choose_and_apply(index, inputs, targets, V)
        if choice.source == "measured" and self._rechecks.get(k, 0) > 0 and index == 0:
            return self._recheck(choice, index, inputs, targets, V)
        return self._apply(choice, index, inputs, targets, V)

    def _apply(self, choice: BackendChoice, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        backend, k = choice.backend, V[0].shape[0]
        if backend == _LOOP:
            return self._product_with(backend, index, inputs, targets, V)
        if backend == "forward_over_reverse":
            grads = None
            if not self._graph_bytes and choice.columns is None and self.probe_batch_size is None:
                self._estimate_graph_bytes(index, inputs, targets)
        else:
            grads = self._measured_gradient_graph(index, inputs, targets)
        columns = choice.columns or self._vmap_columns(backend, index, k)
        try:
            return self._product_with(backend, index, inputs, targets, V, grads, columns)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            self._free_after_oom(exc)
            logger.warning("Hessian: %s ran out of memory on %d columns; using the double backward", backend, columns)
            fallback = BackendChoice(_LOOP, "rule", reason=f"{backend} ran out of memory")
            if self.backend == "auto":
                self._used[k] = registry.record(self.backend_key(k), fallback)
            return self._product_with(_LOOP, index, inputs, targets, V, grads)

    def _choose_and_apply(self, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        k = V[0].shape[0]
        grads = self._measured_gradient_graph(index, inputs, targets)  # built outside the timed trials
        choice, head, done = self._measure(index, inputs, targets, V, grads)
        choice = registry.record(self.backend_key(k), choice)
        self._used[k] = choice
        self._rechecks[k] = RECHECK_PRODUCTS if choice.source == "measured" and choice.backend != _LOOP else 0
        if done >= k:
            return head
        rest = self._apply(choice, index, inputs, targets, [v[done:] for v in V])
        return [torch.cat([h, r]) for h, r in zip(head, rest)]

    def _recheck(self, choice: BackendChoice, index: int, inputs: Any, targets: Any, V: list[Tensor]) -> list[Tensor]:
        """Time a product of a measured vmapped choice; fall back to the loop if it is more than
        the tolerance slower per column than the loop measured."""
        k = V[0].shape[0]
        self._rechecks[k] -= 1
        grads = None
        if choice.backend != "forward_over_reverse":
            grads = self._measured_gradient_graph(index, inputs, targets)
        columns = choice.columns or self._vmap_columns(choice.backend, index, k)
        _synchronize(self.device)
        start = time.perf_counter()  # the graph is built outside the timing, as in the trials
        out = self._product_with(choice.backend, index, inputs, targets, V, grads, columns)
        _synchronize(self.device)
        per_column = (time.perf_counter() - start) / k
        loop = choice.seconds_per_column.get(_LOOP)
        if loop is not None and per_column > (1.0 + registry.TOLERANCE) * loop:
            logger.info("Hessian backend 'auto': %s took %.3g s/column > loop %.3g; switching", choice.backend,
                        per_column, loop)
            fallback = BackendChoice(
                _LOOP, "measured", seconds_per_column={**choice.seconds_per_column, choice.backend: per_column},
                bytes_per_column=choice.bytes_per_column, reason="re-check: the vmapped strategy was slower",
            )
            self._used[k] = registry.record(self.backend_key(k), fallback)
            self._rechecks[k] = 0
        return out

    def _product_with(
        self, backend: str, index: int, inputs: Any, targets: Any, V: list[Tensor],
        grads: list[Tensor] | None = None, columns: int | None = None,
    ) -> list[Tensor]:
        if backend == "forward_over_reverse":
            if self._forward_ok is not False:
                res = self._checked_forward_over_reverse(index, inputs, targets, V, columns)
                if res is not None:
                    return res
            backend, grads = _LOOP, None
        if grads is None:
            grads = self.gradient_graph(index, inputs, targets)
        # Gradients that do not depend on the parameters (unused or linear ones) contribute nothing.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(v) for v in V]
        outputs = [grads[i] for i in live]
        if backend == "double_backward_vmap":
            return self._vmapped_second_backward(outputs, live, V, columns)
        return self._looped_second_backward(outputs, live, V)

    def _looped_second_backward(self, outputs: list[Tensor], live: list[int], V: list[Tensor]) -> list[Tensor]:
        """``d(grad . v)/d params`` per column: one backward per column through the shared graph."""
        k = V[0].shape[0]
        # Each column is written once into the (k, d) result; the per-parameter views need no
        # stacking and the product needs no concatenation (two full copies fewer per block).
        flat = torch.empty(k, self.shape[0], dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for c in range(k):
                # No materialize_grads: it costs a pass over every gradient; unused ones get zeros.
                rs = torch.autograd.grad(outputs, self.params, [V[i][c] for i in live], retain_graph=True,
                                         allow_unused=True)
                for r, block in zip(rs, self.blocks):
                    if r is None:
                        flat[c, block.slice].zero_()
                    else:
                        flat[c, block.slice].copy_(r.reshape(-1))
        return FlatParts(flat, self.blocks)

    def _vmapped_second_backward(
        self, outputs: list[Tensor], live: list[int], V: list[Tensor], columns: int | None
    ) -> list[Tensor]:
        k = V[0].shape[0]
        step = columns or self.probe_batch_size or k
        if step == 1:  # one column per pass is the loop, without vmap's overhead
            return self._looped_second_backward(outputs, live, V)
        chunks = []
        with torch.enable_grad():
            for start in range(0, k, step):
                cols = slice(start, min(start + step, k))
                res = torch.autograd.grad(
                    outputs, self.params, [V[i][cols] for i in live],
                    retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True,
                )
                chunks.append((cols, res))
        # materialize_grads gives unbatched zeros for parameters the loss does not use.
        chunks = [
            [r if r.shape == v[cols].shape else r.expand_as(v[cols]) for r, v in zip(rs, V)]
            for cols, rs in chunks
        ]
        if len(chunks) == 1:
            return chunks[0]
        return [torch.cat(rs) for rs in zip(*chunks)]

    def _checked_forward_over_reverse(
        self, index: int, inputs: Any, targets: Any, V: list[Tensor], columns: int | None
    ) -> list[Tensor] | None:
        """Forward-over-reverse where it is the Hessian the user's ``loss.backward()`` sees; ``None``
        (explicit ``backend="forward_over_reverse"``: use the double backward) where it is not.

        Two PyTorch gaps: ops without forward-AD formulas (``huber_loss``'s backward, ``mse_loss``'s
        zero tangents) raise, and forward-mode AD differentiates through ``torch.no_grad()``
        regions that reverse mode treats as constants. The first is caught (info log), the second
        detected on the first product by comparing one column with the double backward (warning).
        Under ``"auto"`` both raise, so the measurement leaves the strategy out.
        """
        explicit = self.backend == "forward_over_reverse"
        try:
            res = self._forward_over_reverse(index, inputs, targets, V, columns)
        except (RuntimeError, NotImplementedError) as exc:
            if not explicit:
                raise
            logger.info("Hessian: forward-over-reverse unavailable for this model/loss (%s); using "
                        "reverse-over-reverse (the double backward)", exc)
            self._forward_ok = False
            return None
        if self._forward_ok is None:
            ref = self._product_with(_LOOP, index, inputs, targets, [v[:1] for v in V])
            num = sum(float((r[0] - q[0]).double().norm()) ** 2 for r, q in zip(res, ref)) ** 0.5
            den = sum(float(q[0].double().norm()) ** 2 for q in ref) ** 0.5
            self._forward_ok = num <= 100 * torch.finfo(self.dtype).eps ** 0.5 * den
            if not self._forward_ok:
                message = (
                    f"Hessian: forward-over-reverse disagrees with the double backward (relative difference "
                    f"{num / max(den, 1e-300):.2g}), typically because the model computes part of itself under "
                    "torch.no_grad(), which forward-mode AD differentiates through"
                )
                if not explicit:
                    raise RuntimeError(message)
                warnings.warn(message + "; using the double backward, the Hessian of loss.backward()", stacklevel=5)
                return None
        return res

    def _forward_over_reverse(
        self, index: int, inputs: Any, targets: Any, V: list[Tensor], columns: int | None = None
    ) -> list[Tensor]:
        f = model_as_function(self.model, self.param_names, inputs)
        primals = tuple(p.detach() for p in self.params)

        def loss_of(*params: Tensor) -> Tensor:
            outputs = select_output(f(*params), self.outputs_fn, who="Hessian")
            return self._check_loss(self.loss_fn(outputs, targets), index)

        grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(primals))))

        def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad_fn, primals, tangents)[1]

        k = V[0].shape[0]
        step = columns or self.probe_batch_size or k
        chunks = [torch.func.vmap(hvp)(*[v[start:start + step] for v in V]) for start in range(0, k, step)]
        if len(chunks) == 1:
            return list(chunks[0])
        return [torch.cat(rs) for rs in zip(*chunks)]
