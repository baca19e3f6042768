"""Operator products in blocks, with a matvec counter, an optional progress bar and float64 reductions."""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from curvature import LinearOperator
from curvature.probes import draw_probes

logger = logging.getLogger(__name__)

#: With ``rtol=``, the error estimate is trusted only from this many samples on.
MIN_SAMPLES_FOR_RTOL = 10


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class ProductRunner:
    """Applies ``op`` to ``(d, k)`` blocks and counts the columns (matvecs) it used."""

    def __init__(self, op: LinearOperator, *, total: int, progress: bool, desc: str):
        self.op = op
        self.num_matvecs = 0
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="matvec")
        else:
            self._bar = _NoBar()

    def __call__(self, V: Tensor) -> Tensor:
        if V.dtype != self.op.dtype:
            V = V.to(self.op.dtype)
        out = self.op @ V
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(V.shape):
            raise ValueError(
                f"op @ V must return a tensor of shape {tuple(V.shape)}, got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        self.num_matvecs += V.shape[1]
        self._bar.update(V.shape[1])
        return out

    def probes(self, num: int, distribution: str, generator: torch.Generator) -> Tensor:
        d = self.op.shape[0]
        return draw_probes(d, num, distribution, dtype=self.op.dtype, device=self.op.device, generator=generator)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProductRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def block_sizes(total: int, batch: int) -> Iterator[int]:
    """Sizes of ``ceil(total / batch)`` near-equal blocks (each at most ``batch``) adding up to ``total``.

    Even blocks avoid a small, poorly batched last product (100 by 32 gives 4 x 25, not 32, 32, 32, 4).
    """
    if total <= 0:
        return
    n = -(-total // batch)
    base, extra = divmod(total, n)
    for i in range(n):
        yield base + (1 if i < extra else 0)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def column_dots(A: Tensor, B: Tensor) -> Tensor:
    """Per-column dot products ``(A ⊙ B).sum(0)``, summed in float64 -> ``(k,)``.

    The elementwise products stay in the operands' dtype (exact for ±1 probes) and only the sum
    is widened, which measured several times faster than converting both blocks (or ``einsum``).
    """
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return (A * B).sum(dim=0)
    if A.dtype != B.dtype:
        A, B = A.double(), B.double()
    return (A * B).sum(dim=0, dtype=torch.float64)


def exact_diagonal(run: ProductRunner, batch: int) -> Tensor:
    """The diagonal of ``run.op`` from ``d`` unit vectors, applied ``batch`` at a time (float64)."""
    op = run.op
    d = op.shape[0]
    diag = torch.empty(d, dtype=torch.float64, device=op.device)
    start = 0
    for size in block_sizes(d, batch):
        E = torch.zeros(d, size, dtype=op.dtype, device=op.device)
        idx = torch.arange(size, device=op.device)
        E[start + idx, idx] = 1
        diag[start:start + size] = run(E)[start + idx, idx].double()
        start += size
    return diag


def mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error (``inf`` with a single sample, ``nan`` mean with none)."""
    n = samples.numel()
    if n == 0:
        return math.nan, math.inf
    mean = float(samples.mean())
    if n < 2:
        return mean, math.inf
    return mean, float(samples.std(correction=1)) / math.sqrt(n)


def rtol_met(value: float, stderr: float, n: int, rtol: float | None) -> bool:
    """The early-stopping rule of every estimator: ``stderr <= rtol·|value|`` from 10 samples on."""
    return rtol is not None and n >= MIN_SAMPLES_FOR_RTOL and stderr <= rtol * abs(value)


def run_blocks(
    total: int,
    batch: int,
    step: Callable[[int], None],
    *,
    rtol: float | None = None,
    status: Callable[[], tuple[float, float, int]] | None = None,
    check_first: bool = False,
    what: str = "estimate",
) -> bool | None:
    """The one estimator driver: ``step(size)`` for near-equal blocks adding up to ``total``.

    With ``rtol``, ``status()`` returns ``(value, stderr, num_samples)`` and the loop stops as soon
    as :func:`rtol_met` holds (also before the first block when ``check_first``, for estimators
    that resume from a pilot). Returns whether the rule was met, or ``None`` without ``rtol``.
    """
    met = rtol is not None and check_first and rtol_met(*status(), rtol)
    if not met:
        for size in block_sizes(total, batch):
            step(size)
            if rtol is not None and rtol_met(*status(), rtol):
                met = True
                break
    if rtol is None:
        return None
    if not met:
        logger.info("%s: rtol=%g not reached within the matvec budget", what, rtol)
    return met


class SampleStream:
    """Per-probe float64 samples gathered block by block; ``status()`` feeds :func:`run_blocks`."""

    def __init__(self, initial: Tensor | None = None, *, offset: float = 0.0):
        self.parts: list[Tensor] = [] if initial is None else [initial]
        self.offset = offset

    def add(self, x: Tensor) -> None:
        self.parts.append(x)

    @property
    def samples(self) -> Tensor:
        if len(self.parts) != 1:
            self.parts = [torch.cat(self.parts)] if self.parts else [torch.zeros(0, dtype=torch.float64)]
        return self.parts[0]

    def status(self) -> tuple[float, float, int]:
        x = self.samples
        mean, err = mean_and_stderr(x)
        return self.offset + mean, err, x.numel()

    def mean_and_stderr(self) -> tuple[float, float]:
        value, err, _ = self.status()
        return value, err
