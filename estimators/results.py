"""Result types: an estimate together with its standard error and its cost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Tuple

from torch import Tensor

from curvature import Block

__all__ = ["BlockTraceEstimates", "DiagonalEstimate", "Estimate", "FrobeniusNormEstimate", "TraceEstimate"]


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


class Estimate:
    """Base of every stochastic estimate in the toolkit (traces, diagonals, norms, spectral sums).

    Every estimate has ``value``, ``stderr`` (one convention everywhere: ``0.0`` when the value is
    exact, ``inf`` when it cannot be estimated, e.g. from a single sample), ``num_matvecs`` (its
    cost in operator columns), ``method`` and ``samples`` (the per-sample values it averages, or
    ``None``), and a normal-approximation :meth:`confidence_interval`. Subclasses are frozen
    dataclasses that declare these fields.

    Examples:
        >>> isinstance(TraceEstimate(1.0, 0.0, 4, "exact", "unit"), Estimate)
        True
    """

    value: float | Tensor
    stderr: float | Tensor
    num_matvecs: int
    method: str
    samples: Tensor | None

    def confidence_interval(self, level: float = 0.95) -> Tuple[float, float]:
        """Normal-approximation interval ``value ± z·stderr`` at the given coverage ``level``."""
        half = _z(level) * self.stderr
        return (self.value - half, self.value + half)


@dataclass(frozen=True)
class TraceEstimate(Estimate):
    """An estimate of ``tr(A)``.

    Attributes:
        value: the estimate.
        stderr: its estimated standard error (``inf`` when it cannot be estimated, ``0.0`` when
            the estimate is exact).
        num_matvecs: operator columns (matrix-vector products) spent.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"exact"``; ``method="auto"``
            reports its choice as ``"auto:<method>"``.
        distribution: probe distribution (``"rademacher"``/``"normal"``; ``"unit"`` when exact).
        converged: with ``rtol=``, whether ``stderr <= rtol * |value|`` was reached; else ``None``.
        samples: the float64 per-sample values the estimate averages (Hutchinson: ``vᵀAv`` per
            probe; Hutch++: the deflated residual samples; XTrace: the leave-one-out estimates).

    Examples:
        >>> est = TraceEstimate(10.0, 0.5, 100, "hutchinson", "rademacher")
        >>> est.confidence_interval(0.95)
        (9.02..., 10.97...)
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    distribution: str
    converged: bool | None = None
    samples: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def relative_stderr(self) -> float:
        """``stderr / |value|`` (``inf`` for a zero value with nonzero error)."""
        if self.value == 0:
            return 0.0 if self.stderr == 0 else math.inf
        return self.stderr / abs(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        return f"{self.value:.6g} ± {self.stderr:.2g} ({self.method}, {self.num_matvecs} matvecs)"


class BlockTraceEstimates(dict):
    """``{block name: TraceEstimate}`` from :func:`estimators.block_traces`, plus :attr:`total`.

    A plain ``dict`` in block order, so existing code that iterates or indexes it keeps working;
    ``total`` is the trace of the union of the blocks estimated from the very same probes (its
    samples are the per-probe sums over blocks, so its error bar accounts for their correlation).

    Examples:
        >>> t = TraceEstimate(1.0, 0.0, 2, "hutchinson", "rademacher")
        >>> res = BlockTraceEstimates({"a": t}, total=t)
        >>> res["a"].value, res.total.value
        (1.0, 1.0)
    """

    def __init__(self, estimates: dict[str, TraceEstimate], *, total: TraceEstimate):
        super().__init__(estimates)
        self.total = total


@dataclass(frozen=True, eq=False)
class DiagonalEstimate(Estimate):
    """An estimate of ``diag(A)`` as a flat float64 ``(d,)`` tensor with per-entry standard errors.

    Attributes:
        value: the estimated diagonal, float64, shape ``(d,)``.
        stderr: per-entry standard errors, same shape (zeros for ``method="exact"``).
        num_matvecs: operator columns spent.
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        distribution: probe distribution (``"unit"`` when exact).
        blocks: the operator's parameter blocks, used by :meth:`per_block`.
        converged: with ``rtol=``, whether ``‖stderr‖ <= rtol·‖value‖`` was reached; else ``None``.
        samples: not kept for diagonals (``None``): they would take ``d`` floats per probe.

    Examples:
        >>> import torch
        >>> from curvature import make_blocks
        >>> est = DiagonalEstimate(torch.arange(6.0), torch.zeros(6), 6, "exact", "unit",
        ...                        make_blocks(["w", "b"], [(2, 2), (2,)]))
        >>> {k: v.tolist() for k, v in est.per_block().items()}
        {'w': [[0.0, 1.0], [2.0, 3.0]], 'b': [4.0, 5.0]}
    """

    value: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str
    distribution: str
    blocks: Tuple[Block, ...] = ()
    converged: bool | None = None
    samples: Tensor | None = field(default=None, repr=False, compare=False)

    def per_block(self) -> dict[str, Tensor]:
        """The diagonal split into parameter-shaped tensors, keyed by block name."""
        return {b.name: self.value[b.slice].reshape(b.shape) for b in self._blocks()}

    def stderr_per_block(self) -> dict[str, Tensor]:
        """The standard errors split into parameter-shaped tensors, keyed by block name."""
        return {b.name: self.stderr[b.slice].reshape(b.shape) for b in self._blocks()}

    def _blocks(self) -> Tuple[Block, ...]:
        if self.blocks:
            return tuple(self.blocks)
        return (Block("all", (self.value.shape[0],), slice(0, self.value.shape[0])),)


@dataclass(frozen=True)
class FrobeniusNormEstimate(Estimate):
    """An estimate of the Frobenius norm ``‖A‖_F`` and of its square.

    ``squared`` (the mean of ``‖Av‖²`` over probes) is the unbiased quantity; ``value`` is its
    square root (clamped at 0), with ``stderr`` from the delta method.

    Attributes:
        value: estimate of ``‖A‖_F``.
        stderr: standard error of ``value``.
        squared: unbiased estimate of ``‖A‖_F²``.
        squared_stderr: standard error of ``squared``.
        num_matvecs, method, distribution, converged, samples: as in :class:`TraceEstimate`
            (``samples`` are the ``‖Av‖²`` values).

    Examples:
        >>> est = FrobeniusNormEstimate(5.0, 0.1, 25.0, 1.0, 10, "hutchinson", "rademacher")
        >>> est.squared_confidence_interval(0.95)
        (23.04..., 26.95...)
    """

    value: float
    stderr: float
    squared: float
    squared_stderr: float
    num_matvecs: int
    method: str
    distribution: str
    converged: bool | None = None
    samples: Tensor | None = field(default=None, repr=False, compare=False)

    def squared_confidence_interval(self, level: float = 0.95) -> Tuple[float, float]:
        """Interval for ``‖A‖_F²``: ``squared ± z·squared_stderr``."""
        half = _z(level) * self.squared_stderr
        return (self.squared - half, self.squared + half)

    def confidence_interval(self, level: float = 0.95) -> Tuple[float, float]:
        """Interval for ``‖A‖_F``: square roots of the squared interval's ends (clamped at 0)."""
        lo, hi = self.squared_confidence_interval(level)
        return (math.sqrt(max(lo, 0.0)), math.sqrt(max(hi, 0.0)))

    def __float__(self) -> float:
        return float(self.value)

