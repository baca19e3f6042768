"""Norm estimates from operator products."""

from __future__ import annotations

import math
from typing import Any

import torch

from curvature import as_operator
from curvature.checks import check_rtol
from curvature.probes import make_generator

from ._products import ProductRunner, SampleStream, column_dots, itemsize, run_blocks
from ._validation import check_distribution, check_num_matvecs, check_probe_batch_size
from .probes import default_probe_batch_size
from .results import FrobeniusNormEstimate

__all__ = ["frobenius_norm"]


def frobenius_norm(
    op: Any,
    *,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    probe_batch_size: int | None = None,
    rtol: float | None = None,
    progress: bool = False,
) -> FrobeniusNormEstimate:
    """Estimate the Frobenius norm ``‖A‖_F`` and its square from ``‖Av‖²`` over random probes.

    ``E‖Av‖² = tr(AᵀA) = ‖A‖_F²`` for probes with ``E[vvᵀ] = I`` (any square ``A``), so the
    result's ``squared`` field is an unbiased Hutchinson estimate of ``‖A‖_F²``, with standard
    error ``squared_stderr``; ``value = sqrt(squared)`` estimates ``‖A‖_F`` (delta-method
    ``stderr``).  For symmetric ``A``, ``‖A‖_F² = Σ λ_i²``.

    Args:
        op: a square operator (see :func:`estimators.trace`).
        num_matvecs: number of probes (one product each; with ``rtol=``, the maximum).
        distribution, generator, probe_batch_size, progress: as in :func:`estimators.trace`.
        rtol: stop once ``squared_stderr <= rtol * squared`` (from 10 samples on).

    Examples:
        >>> A = torch.diag(torch.tensor([3.0, 4.0]))
        >>> est = frobenius_norm(A, num_matvecs=4, generator=torch.Generator().manual_seed(0))
        >>> est.value, est.squared, est.squared_stderr
        (5.0, 25.0, 0.0)
    """
    A = as_operator(op)
    num_matvecs = check_num_matvecs(num_matvecs, method="hutchinson")
    distribution = check_distribution(distribution)
    batch = check_probe_batch_size(probe_batch_size)
    rtol = check_rtol(rtol)
    gen = make_generator(generator, A.device)
    batch = batch or default_probe_batch_size(
        A.shape[0], num_matvecs, itemsize=itemsize(A.dtype), rtol=rtol is not None
    )
    stream = SampleStream()
    with ProductRunner(A, total=num_matvecs, progress=progress, desc="Frobenius norm") as run:

        def step(size: int) -> None:
            AV = run(run.probes(size, distribution, gen))
            stream.add(column_dots(AV, AV))

        met = run_blocks(num_matvecs, batch, step, rtol=rtol, status=stream.status, what="Frobenius norm")
    sq, sq_err = stream.mean_and_stderr()
    norm = math.sqrt(max(sq, 0.0))
    stderr = sq_err / (2 * norm) if norm > 0 else (0.0 if sq_err == 0 else math.inf)
    return FrobeniusNormEstimate(norm, stderr, sq, sq_err, run.num_matvecs, "hutchinson", distribution, met,
                                 stream.samples)
