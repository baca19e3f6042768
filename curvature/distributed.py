"""Data-parallel curvature over ``torch.distributed``: each rank holds a shard of the data and the
same parameters; products are the exact curvature of the mean loss over the union of the shards.

Launch the ranks with ``torchrun`` (NCCL on GPUs, gloo on CPUs), build the usual operator on the
rank's shard and wrap it::

    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))
    torch.cuda.set_device(local_rank)
    H = DataParallelOperator(Hessian(unwrap_data_parallel(model), loss_fn, my_shard))
    spectra.slq(H, num_probes=8, num_steps=80, generator=torch.Generator().manual_seed(0))

Every estimator and eigensolver runs unchanged on the wrapped operator (they only use
``shape``/``dtype``/``device``/``@``); with the same generator seed on every rank they draw the
same probes, and all their arithmetic between products is then identical on every rank, because
every rank receives the same all-reduced product.

A product ``H @ V`` costs one local product over the rank's shard and two collectives:

1. a control all-reduce (``MAX``, ``2 * world_size + 5`` float64 numbers): each rank's batch
   weight in its own slot, each rank's failure flag in its own slot, and a fingerprint of ``V``
   (so every rank learns every weight exactly, who failed, and whether the probes agree, and all
   reach the same verdict, so no rank is left waiting in a collective the others skipped);
2. ONE all-reduce (``SUM``) of the ``k x d`` block of products as one flat buffer, each rank's
   contribution scaled by ``w_r / sum_s w_s`` (``w_r``: the loss's normalizer over the rank's
   shard, its number of samples by default), so uneven shards give the exact global mean
   ``sum_r w_r H_r / sum_r w_r``; for a ``sum`` loss the products just add.

Failures: a rank whose product raises (a bad batch, a NaN loss) still joins the control
all-reduce with its flag set; every rank then raises :class:`DistributedCurvatureError` naming
the failing ranks and their errors, and the data all-reduce is skipped. What no collective can
catch (a rank that dies, or raises outside a product) ends the others' collectives after the
process group's ``timeout`` (give ``init_process_group`` a short one) or when gloo/NCCL sees the
peer's connection close.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import EmptyDataError
from .linear_operator import LinearOperator, as_operator, check_operand
from .model_operator import ModelOperator
from .precision import working_dtype

__all__ = [
    "DataParallelOperator",
    "assert_same_across_ranks",
    "DistributedCurvatureError",
    "fingerprint",
    "unwrap_data_parallel",
]

#: Rows per chunk when fingerprinting (bounds the float64 copy to a few MiB).
_CHUNK_ELEMENTS = 1 << 20
#: Agreement required of fingerprints, relative to their scale (float64 sums of identical data
#: agree to the last bit on identical hardware; 1e-9 leaves room for other summation orders while
#: two independent probe draws differ by about ``1 / sqrt(d k)`` of the scale).
_FINGERPRINT_RTOL = 1e-9
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SQRT2 = math.sqrt(2.0) - 1.0


class DistributedCurvatureError(RuntimeError):
    """Raised on EVERY rank when a product failed on some rank.

    Attributes:
        failed_ranks: the ranks whose local product raised.
        messages: ``{rank: "ExceptionType: message"}`` of those ranks.
    """

    def __init__(self, failed_ranks: Sequence[int], messages: dict[int, str]):
        self.failed_ranks = tuple(failed_ranks)
        self.messages = dict(messages)
        listed = "; ".join(f"rank {r}: {self.messages.get(r, '(no message)')}" for r in self.failed_ranks)
        super().__init__(f"the curvature product failed on {len(self.failed_ranks)} rank(s): {listed}")


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (the model itself otherwise).

    Build operators on the unwrapped module: it holds the same parameters (so the operator follows
    the training), but its forward does not arm DDP's gradient hooks, and parameter names carry no
    ``module.`` prefix.

    Examples:
        >>> m = nn.Linear(2, 1)
        >>> unwrap_data_parallel(nn.DataParallel(m)) is m, unwrap_data_parallel(m) is m
        (True, True)
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def fingerprint(pieces: Sequence[Tensor]) -> tuple[float, float, float]:
    """``(uᵀ X w, ‖X‖², ‖u‖ ‖X‖ ‖w‖)`` of the rows of ``pieces`` stacked as one ``(n, k)`` matrix ``X``.

    ``u`` and ``w`` are fixed position-dependent weights (``frac(i φ)``), so permuted or
    re-drawn data changes the first number; computed in float64 over row chunks (a few MiB at a
    time). Identical data gives identical numbers on every rank, and two independent random
    draws differ by about ``1 / sqrt(n k)`` of the third number. ``pieces`` are ``(n_i,)`` or
    ``(n_i, k)`` tensors with the same ``k``.

    Examples:
        >>> a, b = fingerprint([torch.ones(3, 2)]), fingerprint([torch.ones(2, 2), torch.ones(1, 2)])
        >>> all(math.isclose(x, y) for x, y in zip(a, b)), a[1], fingerprint([-torch.ones(3, 2)])[0] == -a[0]
        (True, 6.0, True)
    """
    totals = None  # (uᵀXw, ‖X‖², ‖u‖²) as float64 on the data's device: one sync at the end
    offset = 0
    w = None
    for piece in pieces:
        X = piece.detach()
        X = X[:, None] if X.ndim == 1 else X.reshape(X.shape[0], -1)
        n, k = X.shape
        if w is None:
            j = torch.arange(1, k + 1, dtype=torch.float64, device=X.device)
            w = 1.0 + torch.frac(j * _SQRT2)
        rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
        for start in range(0, n, rows):
            chunk = X[start : start + rows].to(torch.float64)
            i = torch.arange(offset + start + 1, offset + start + 1 + chunk.shape[0], dtype=torch.float64,
                             device=X.device)
            u = 2.0 * torch.frac(i * _GOLDEN) - 1.0
            parts = torch.stack([u @ chunk @ w, (chunk * chunk).sum(), u @ u])
            totals = parts if totals is None else totals + parts
        offset += n
    if totals is None or w is None:
        return 0.0, 0.0, 0.0
    weighted, squares, u_squares = totals.tolist()
    return weighted, squares, math.sqrt(u_squares * squares) * float(w.norm())


def _collective_device(process_group: Any, device: torch.device) -> torch.device:
    """Where small control tensors go: this rank's GPU for NCCL, the CPU for gloo."""
    backend = str(dist.get_backend(process_group))
    if device.type == "cuda" and "nccl" in backend:
        return device
    if "nccl" in backend and "gloo" not in backend:
        raise ValueError(
            f"the process group's backend is {backend!r}, which reduces CUDA tensors only, but the data is on "
            f"{device}; move the model to this rank's GPU (torch.cuda.set_device(local_rank)) or use gloo"
        )
    return torch.device("cpu")


def _fingerprint_slots(fp: tuple[float, float, float]) -> list[float]:
    """Slots of a MAX all-reduce from which every rank reads the same spread of fingerprints."""
    return [fp[0], -fp[0], fp[1], -fp[1], fp[2]]


def _fingerprints_spread(slots: Sequence[float]) -> bool:
    """Whether the MAX-reduced :func:`_fingerprint_slots` show ranks that disagree."""
    hi1, lo1, hi2, lo2, scale = slots
    return hi1 + lo1 > _FINGERPRINT_RTOL * max(scale, 1e-300) or hi2 + lo2 > _FINGERPRINT_RTOL * max(hi2, 1e-300)


def assert_same_across_ranks(tensors: Sequence[Tensor], *, name: str = "tensors", process_group: Any = None) -> None:
    """Raise ``ValueError`` on EVERY rank unless ``tensors`` hold the same values on all ranks.

    One fingerprint (:func:`fingerprint`) and one 5-number all-reduce: cheap enough to run every
    few hundred steps on state that data-parallel training must keep identical, such as an
    M-FAC optimizer's gradient window (``opt.state[...]["mfac_window"]``), Sophia/AdaHessian's
    curvature EMAs or the parameters themselves. Collective: call it on every rank.

    Examples:
        >>> import os, tempfile, torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "pg"),
        ...                         rank=0, world_size=1)
        >>> assert_same_across_ranks([torch.ones(3)], name="window")
        >>> dist.destroy_process_group()
    """
    tensors = [t for t in tensors]
    if not tensors:
        raise ValueError(f"{name}: no tensors given")
    device = _collective_device(process_group, tensors[0].device)
    fp = fingerprint([t.reshape(-1) for t in tensors])
    slots = torch.tensor(_fingerprint_slots(fp), dtype=torch.float64, device=device)
    dist.all_reduce(slots, op=dist.ReduceOp.MAX, group=process_group)
    if _fingerprints_spread(slots.tolist()):
        raise ValueError(
            f"{name} differ across ranks (rank {dist.get_rank(process_group)} sees the spread too); every rank "
            "must apply the same updates: same gradients (DDP), same probe generator seed, no rank skipping a step"
        )


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


class DataParallelOperator(LinearOperator):
    """An operator over the data of ALL ranks of a process group, from each rank's operator over
    its own shard.

    ``DataParallelOperator(op) @ V`` equals, on every rank, the product of the curvature of the
    loss over the union of the shards, as one process over all the data would compute it (to
    rounding; the ranks' shards may be uneven, even of different batch sizes). Estimators,
    eigensolvers and SLQ run on it unchanged; give them the same generator seed on every rank
    (the fingerprint check refuses products whose probes differ across ranks).

    Args:
        op: this rank's operator. A model operator (``Hessian``, ``GGN``, ``Fisher``,
            ``EmpiricalFisher`` over the rank's shard) weights itself: its weight is the loss's
            normalizer summed over the shard (``op.batch_source.total_weight``: the number of
            samples, valid targets under ``ignore_index``, ...), read after every product. Build
            it on :func:`unwrap_data_parallel` of a DDP model. Any other operator (e.g. an
            explicit local matrix) needs ``weight=``: its products are taken as the mean over
            ``weight`` samples (``reduction="mean"``), or are added (``reduction="sum"``).
        process_group: the group to reduce over (default: the default group).
        weight: this rank's weight for a non-model operator (ignored with ``reduction="sum"``).
        reduction: ``"mean"``/``"sum"`` for a non-model operator; a model operator's is the loss's.
        check_probes: ``"always"`` (default) fingerprints ``V`` on every product and raises
            ``ValueError`` on every rank when the ranks' ``V`` differ (an O(d k) float64 pass,
            small beside a curvature product); ``"first"`` checks only the first product;
            ``"never"`` skips it.

    Construction is collective (every rank of the group must construct it, in the same order):
    it checks that the ranks agree on the dimension, dtype, parameter names and shapes, loss
    reduction and parameter VALUES (a fingerprint, so a rank that loaded another checkpoint is
    caught), and raises ``ValueError`` on every rank naming the first rank that differs.
    Each product is collective as well: every rank must call it with the same ``V``.

    Memory per rank: the local product (``k x d``, the operator's dtype; float32 for half
    precision, which is also the dtype of the all-reduce), and what the local operator holds.
    Communication per product: ``k d`` numbers all-reduced (:attr:`bytes_per_column` each) plus
    ``2 * world_size + 5`` float64 numbers.

    Attributes:
        local: the wrapped operator of this rank.
        rank, world_size: of the process group.
        num_samples, num_batches: totals over all ranks (model operators).

    Examples:
        >>> import os, tempfile, torch.distributed as dist
        >>> init = "file://" + os.path.join(tempfile.mkdtemp(), "pg")
        >>> dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        >>> A = DataParallelOperator(torch.diag(torch.tensor([1.0, 2.0])), weight=3)
        >>> (A @ torch.ones(2)).tolist(), A.world_size
        ([1.0, 2.0], 1)
        >>> dist.destroy_process_group()
    """

    def __init__(
        self,
        op: Any,
        *,
        process_group: Any = None,
        weight: float | None = None,
        reduction: Literal["mean", "sum"] | None = None,
        check_probes: Literal["always", "first", "never"] = "always",
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group(...) first "
                "(torchrun sets the environment for init_method='env://')"
            )
        self.check_probes = _check_choice(check_probes, "check_probes", ("always", "first", "never"))
        self.local = op if isinstance(op, LinearOperator) else as_operator(op)
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        super().__init__(self.local.shape[0], self.local.dtype, self.local.device, self.local.blocks)
        self.is_symmetric = getattr(self.local, "is_symmetric", True)
        self._control_device = _collective_device(process_group, self.local.device)
        self._model_op = isinstance(self.local, ModelOperator)
        if self._model_op:
            if weight is not None or reduction is not None:
                raise ValueError(
                    "weight= and reduction= are for operators without data; a model operator weights itself "
                    "by its loss's normalizer over its shard"
                )
            self.reduction = self.local.loss_info.reduction
        else:
            self.reduction = _check_choice(reduction or "mean", "reduction", ("mean", "sum"))
            if self.reduction == "mean":
                if weight is None:
                    raise ValueError(
                        "weight= is required for an operator without data: this rank's number of samples "
                        "(the product is taken as the mean over them); or pass reduction='sum'"
                    )
                if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not weight > 0:
                    raise ValueError(f"weight must be a positive number, got {weight!r}")
            self._weight = float(weight) if weight is not None else 1.0
        self._num_products = 0
        self._reduce_dtype = working_dtype(self.local.dtype)
        self._check_ranks_agree()

    # -- construction ---------------------------------------------------------------------------
    def _local_description(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "d": self.shape[0],
            "dtype": str(self.dtype),
            "blocks": [(b.name, tuple(b.shape)) for b in self.blocks],
            "reduction": self.reduction,
            "device_type": self.local.device.type,
        }
        if self._model_op:
            source = self.local.batch_source
            try:
                meta["counts"] = (source.num_samples, source.num_batches, source.total_weight)
            except EmptyDataError:  # an empty shard: it weighs 0, the other ranks hold the data
                meta["counts"] = (0, 0, 0.0)
            if meta["counts"][2] == 0:
                meta["reduction"] = None  # nothing read off the shard (a lambda loss): the others say
            meta["params"] = fingerprint([p.reshape(-1) for p in self.local.params])
        return meta

    def _check_ranks_agree(self) -> None:
        try:
            meta: dict[str, Any] = self._local_description()
        except Exception as exc:  # noqa: BLE001 -- reported to every rank below
            meta = {"error": f"{type(exc).__name__}: {exc}"}
            error: BaseException | None = exc
        else:
            error = None
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, meta, group=self.process_group)
        failed = [r for r, m in enumerate(gathered) if "error" in m]
        if failed:
            raise DistributedCurvatureError(failed, {r: gathered[r]["error"] for r in failed}) from error
        first = gathered[0]
        reductions = {m["reduction"] for m in gathered} - {None}
        if len(reductions) > 1:
            raise ValueError(
                f"the ranks disagree on the loss reduction: {sorted(reductions)}; every rank must build the same "
                "operator over the same model"
            )
        if self._model_op:
            if not reductions:
                raise EmptyDataError(
                    "the data of every rank are empty or weigh 0 (e.g. all targets are ignore_index)"
                )
            self.reduction = reductions.pop()
        for r, m in enumerate(gathered[1:], start=1):
            for key, what in (
                ("d", "the operator dimension (number of selected parameters)"),
                ("dtype", "the dtype"),
                ("blocks", "the parameter names and shapes"),
                ("device_type", "the device type"),
            ):
                if m[key] != first[key]:
                    detail = _first_block_difference(first[key], m[key], r) if key == "blocks" else (
                        f"rank 0 has {first[key]}, rank {r} has {m[key]}"
                    )
                    raise ValueError(f"the ranks disagree on {what}: {detail}; every rank must build the same "
                                     "operator over the same model")
            if "params" in m and not _fingerprints_agree(first["params"], m["params"]):
                raise ValueError(
                    f"the parameter values differ between rank 0 and rank {r}; every rank must hold the same "
                    "parameters (DistributedDataParallel broadcasts them at construction; or load the same "
                    "checkpoint on every rank)"
                )
        if self._model_op:
            counts = [m["counts"] for m in gathered]
            self.num_samples = int(sum(c[0] for c in counts))
            self.num_batches = int(sum(c[1] for c in counts))
            self.local_weights = tuple(float(c[2]) for c in counts)

    # -- products -------------------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        """The local model operator's parameters (the same on every rank), in the flat order."""
        if not self._model_op:
            raise AttributeError("params: the wrapped operator is not a model operator")
        return self.local.params

    @property
    def bytes_per_column(self) -> int:
        """Bytes all-reduced per product column (``d`` numbers of the reduction dtype)."""
        return self.shape[0] * torch.empty((), dtype=self._reduce_dtype).element_size()

    def matmat(self, V: Tensor) -> Tensor:
        """``self @ V`` for a ``(d, k)`` block; collective (every rank calls it with the same ``V``).

        A ``V`` refused on one rank (wrong shape, dtype or device) fails every rank with
        :class:`DistributedCurvatureError` instead of leaving the others in a collective."""
        try:
            V = check_operand(V, self.shape[0], self.dtype, self.device, name="V")
            if V.ndim != 2:
                raise ValueError(f"V must have shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        except (TypeError, ValueError) as exc:
            self._join_control(torch.zeros(2 * self.world_size + 5, dtype=torch.float64), exc)
            raise AssertionError("unreachable: _join_control raises for a failed rank") from exc
        return super().matmat(V)

    def _join_control(self, control: Tensor, error: BaseException | None) -> Tensor:
        """The control all-reduce (``MAX``) of ``[weights (n), failure flags (n), fingerprint (5)]``;
        raises on every rank when some rank failed."""
        n = self.world_size
        if error is not None:
            control[n + self.rank] = 1.0
        control = control.to(self._control_device)
        dist.all_reduce(control, op=dist.ReduceOp.MAX, group=self.process_group)
        control = control.cpu()
        failed = [r for r in range(n) if control[n + r] > 0]
        if failed:
            self._raise_failure(failed, error)
        return control

    def _local_weight(self) -> float:
        if self._model_op:
            return float(self.local.batch_source.total_weight)
        return self._weight

    def _matmat(self, V: Tensor) -> Tensor:
        n, rank = self.world_size, self.rank
        control = torch.zeros(2 * n + 5, dtype=torch.float64)
        checking = self.check_probes == "always" or (self.check_probes == "first" and self._num_products == 0)
        if checking:
            fp = fingerprint([V])
            control[2 * n : 2 * n + 5] = torch.tensor(_fingerprint_slots(fp), dtype=torch.float64)
        error: BaseException | None = None
        local: Tensor | None = None
        try:
            try:
                local = self.local @ V
                control[rank] = self._local_weight()
            except EmptyDataError:  # an empty or fully padded shard weighs 0: it adds nothing
                local = torch.zeros_like(V)
                control[rank] = 0.0
        except Exception as exc:  # noqa: BLE001 -- every rank raises in _join_control
            error = exc
        self._num_products += 1
        control = self._join_control(control, error)
        if checking:
            if _fingerprints_spread(control[2 * n : 2 * n + 5].tolist()):
                raise ValueError(
                    "the vectors V differ across ranks (their fingerprints disagree); every rank must multiply "
                    "the same vectors: give the estimator/eigensolver a generator with the same seed on every "
                    "rank, e.g. generator=torch.Generator().manual_seed(0)"
                )
        assert local is not None
        if self.reduction == "mean":
            weights = control[:n].tolist()
            if math.fsum(weights) == 0:
                raise EmptyDataError("the data of every rank are empty or weigh 0 (e.g. all targets are ignore_index)")
            scale_r = weights[rank] / math.fsum(weights)
        else:
            scale_r = 1.0
        buffer = local.T  # (k, d), contiguous for model operators: one flat buffer
        if buffer.dtype != self._reduce_dtype:
            buffer = buffer.to(self._reduce_dtype, memory_format=torch.contiguous_format)
        elif not buffer.is_contiguous() or buffer.untyped_storage().data_ptr() == V.untyped_storage().data_ptr():
            # all_reduce works in place: never on the caller's V, and on one contiguous buffer.
            buffer = torch.empty_like(buffer, memory_format=torch.contiguous_format).copy_(buffer)
        if scale_r != 1.0:
            buffer.mul_(scale_r)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.process_group)
        return buffer.T.to(self.dtype)

    def _raise_failure(self, failed: list[int], error: BaseException | None) -> None:
        message = None if error is None else f"{type(error).__name__}: {error}"
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, message, group=self.process_group)
        messages = {r: str(gathered[r]) for r in failed}
        raise DistributedCurvatureError(failed, messages) from error

    # -- convenience ----------------------------------------------------------------------------
    def release(self) -> None:
        """Free what the local operator caches (its autograd graphs), if anything."""
        release = getattr(self.local, "release", None)
        if callable(release):
            release()

    def __enter__(self) -> DataParallelOperator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"DataParallelOperator({self.local!r}, rank={self.rank}, world_size={self.world_size}, "
            f"reduction={self.reduction})"
        )


def _fingerprints_agree(a: Sequence[float], b: Sequence[float]) -> bool:
    return abs(a[0] - b[0]) <= _FINGERPRINT_RTOL * max(a[2], b[2], 1e-300) and abs(a[1] - b[1]) <= (
        _FINGERPRINT_RTOL * max(a[1], b[1], 1e-300)
    )


def _first_block_difference(a: list, b: list, rank: int) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"block {i} is {x[0]} {tuple(x[1])} on rank 0 but {y[0]} {tuple(y[1])} on rank {rank}"
    return f"rank 0 has {len(a)} parameter blocks, rank {rank} has {len(b)}"
