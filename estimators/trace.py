"""Randomised trace estimation: Girard-Hutchinson, Hutch++, XTrace, and an automatic choice."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

import curvature
from curvature import as_operator
from curvature.checks import check_choice, check_rtol
from curvature.probes import make_generator

from ._products import (
    MIN_SAMPLES_FOR_RTOL,
    ProductRunner,
    SampleStream,
    block_sizes,
    column_dots,
    exact_diagonal,
    itemsize,
    mean_and_stderr,
    run_blocks,
)
from ._validation import check_distribution, check_num_matvecs, check_probe_batch_size, require_symmetric
from .lowrank import OrthonormalBasis, XTraceSketch
from .probes import default_probe_batch_size
from .results import TraceEstimate

__all__ = ["trace", "TRACE_METHODS"]

logger = logging.getLogger(__name__)

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "auto")

__all__ += ["MIN_SAMPLES_FOR_RTOL"]

#: Below this budget ``method="auto"`` uses Hutchinson: the pilot would cost too large a share.
AUTO_MIN_MATVECS = 16

#: ``method="auto"`` keeps XTrace when its pilot error is below this fraction of Hutchinson's on
#: the same test vectors.  On flat spectra the pilot ratio sits near 1 (5-95 % range 0.8-1.5 at
#: 60 matvecs); on decaying ones it falls with the budget (exponential decay with scale 8: 0.26-0.76
#: at 60 matvecs).  Measured at 60 matvecs over 40-60 seeds (tests/estimators, fresh spectra): on
#: flat spectra XTrace's mean squared error is ~4.5x Hutchinson's, on exponential decay ~0.01x, so
#: a wrong Hutchinson choice costs far more than a wrong XTrace one.  The margin 1/√2 (break-even at
#: equal matvecs) let 10 % of the exponential-decay runs fall back (auto's MSE 13x XTrace's); 0.85
#: keeps auto within 1.0x of the better method there and within 1.1-2.4x on flat spectra (no margin
#: does better on both with a pilot of M/6 test vectors).
AUTO_XTRACE_MARGIN = 0.85

#: The auto pilot uses ``clamp(M // AUTO_PILOT_DIVISOR, 4, 32)`` XTrace test vectors.
AUTO_PILOT_DIVISOR = 6


def trace(
    op: Any,
    *,
    num_matvecs: int,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    probe_batch_size: int | None = None,
    rtol: float | None = None,
    progress: bool = False,
) -> TraceEstimate:
    """Estimate ``tr(A)`` from products ``A @ V`` with blocks of random probes.

    Args:
        op: a square operator: any :class:`curvature.LinearOperator` (``Hessian``, ``GGN``, ...), a
            square ``torch.Tensor``, a SciPy ``LinearOperator``/NumPy array, or any object with
            ``shape``, ``dtype``, ``device`` and ``@``.
        num_matvecs: the budget of operator columns (with ``rtol=``, the most that may be spent).
            ``"hutch++"`` needs a multiple of 3 and ``"xtrace"`` an even number.
        method: ``"hutchinson"`` (``mean vᵀAv``; unbiased for any ``A``); ``"hutch++"`` (exact trace
            on a sketch of ``min(M/3, d)`` columns, Hutchinson on the rest; Meyer et al. 2021; a
            sketch of all ``d`` columns is exact and ends the run);
            ``"xtrace"`` (exchangeable leave-one-out sketch, ``M/2`` test vectors; Epperly, Tropp,
            Webber 2024; symmetric operators); or ``"auto"``, which
            (1) computes the exact trace from ``d`` unit vectors when ``num_matvecs >= d``,
            (2) uses Hutchinson when ``num_matvecs < 16``, the operator is not symmetric, or
            XTrace's state at the full budget (its float64 test vectors and basis, ``8 d M``
            bytes) would exceed 4 GiB (30 GB at GPT-2 small's d = 124M and M = 30), else
            (3) runs an XTrace pilot of ``k = clamp(M // 6, 4, 32)`` test vectors and keeps XTrace
            if its error estimate is below ``0.85`` times the Hutchinson error of the same vectors
            (a decaying spectrum), otherwise continues with
            Hutchinson, reusing the pilot's ``vᵀAv`` samples (its ``k`` basis products are then
            lost).
        distribution: ``"rademacher"`` (lower variance) or ``"normal"``.  XTrace (also in
            ``"auto"``) uses ``"normal"`` as Gaussian vectors rescaled to norm ``sqrt(d)``, its
            "improved" estimator.
        generator: the only source of randomness (a ``torch.Generator`` on the operator's device).
            ``None`` creates a fresh generator seeded from OS entropy; the global RNG is never used.
        probe_batch_size: most columns per product; the probes are split into equal blocks.
            Default: 64 (32 with ``rtol=``), lowered so a ``(d, k)`` block in the operator's dtype
            stays within 1 GiB.
        rtol: stop once ``stderr <= rtol * |value|`` (checked after each block, from 10 samples on);
            ``num_matvecs`` is then the maximum.  Hutch++ always spends its ``2M/3`` sketch
            products and stops early only in the residual phase.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`TraceEstimate`.  ``stderr`` is: the sample standard error (Hutchinson); the
        standard error of the residual samples (Hutch++; given the sketch the low-rank part is
        exact, so this estimates the full error variance without bias); XTrace's own estimate,
        ``std(leave-one-out estimates)/sqrt(k)``, which tends to be optimistic.

    Examples:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> est = trace(A, num_matvecs=8, generator=torch.Generator().manual_seed(0))
        >>> est.value, est.stderr, est.num_matvecs
        (10.0, 0.0, 8)
    """
    A = as_operator(op)
    method = check_choice(method, name="method", choices=TRACE_METHODS)
    distribution = check_distribution(distribution)
    multiple = {"hutch++": 3, "xtrace": 2}.get(method, 1)
    num_matvecs = check_num_matvecs(num_matvecs, method=method, multiple=multiple, minimum=multiple)
    batch = check_probe_batch_size(probe_batch_size)
    rtol = check_rtol(rtol)
    d = A.shape[0]
    if method == "xtrace":
        require_symmetric(A, method)
        if num_matvecs // 2 > d:
            raise ValueError(f"num_matvecs must be <= 2 d = {2 * d} for method='xtrace', got {num_matvecs}")
    gen = make_generator(generator, A.device)
    batch = batch or default_probe_batch_size(d, num_matvecs, itemsize=itemsize(A.dtype), rtol=rtol is not None)

    with ProductRunner(A, total=min(num_matvecs, d) if method == "auto" else num_matvecs,
                       progress=progress, desc=f"trace ({method})") as run:
        if method == "hutchinson":
            return _hutchinson(run, num_matvecs, distribution, gen, batch, rtol, name="hutchinson")
        if method == "hutch++":
            return _hutchpp(run, num_matvecs, distribution, gen, batch, rtol)
        if method == "xtrace":
            return _xtrace(run, XTraceSketch(run, gen, _xtrace_distribution(distribution)), num_matvecs,
                           batch, rtol, name="xtrace")
        return _auto(run, num_matvecs, distribution, gen, batch, rtol)


def _xtrace_distribution(distribution: str) -> str:
    return "sphere" if distribution == "normal" else "rademacher"


def _hutchinson(
    run: ProductRunner,
    budget: int,
    distribution: str,
    gen: torch.Generator,
    batch: int,
    rtol: float | None,
    *,
    name: str,
    samples: Tensor | None = None,
) -> TraceEstimate:
    stream = SampleStream(samples)

    def step(size: int) -> None:
        V = run.probes(size, distribution, gen)
        stream.add(column_dots(V, run(V)))

    met = run_blocks(budget - run.num_matvecs, batch, step, rtol=rtol, status=stream.status,
                     check_first=samples is not None, what=f"trace ({name})")
    value, stderr = stream.mean_and_stderr()
    return TraceEstimate(value, stderr, run.num_matvecs, name, distribution, met, stream.samples)


def _hutchpp(
    run: ProductRunner, budget: int, distribution: str, gen: torch.Generator, batch: int, rtol: float | None
) -> TraceEstimate:
    op = run.op
    d = op.shape[0]
    # A sketch of d columns already spans everything: the trace is then exact, with no residual.
    k = min(budget // 3, d)
    basis = OrthonormalBasis(op.shape[0], op.device, gen)
    for size in block_sizes(k, batch):
        basis.extend(run(run.probes(size, distribution, gen)))
    Q = basis.Q
    t_low = 0.0
    start = 0
    for size in block_sizes(Q.shape[1], batch):
        Qb = Q[:, start:start + size]
        t_low += float(column_dots(Qb, run(Qb.to(op.dtype))).sum())
        start += size
    if k == d:
        return TraceEstimate(t_low, 0.0, run.num_matvecs, "hutch++", distribution, True if rtol is not None else None,
                             torch.zeros(0, dtype=torch.float64))
    residual = SampleStream(offset=t_low)

    def step(size: int) -> None:
        G = run.probes(size, distribution, gen).double()
        G -= Q @ (Q.T @ G)
        G = G.to(op.dtype)
        residual.add(column_dots(G, run(G)))

    met = run_blocks(budget - run.num_matvecs, batch, step, rtol=rtol, status=residual.status, what="trace (hutch++)")
    value, stderr = residual.mean_and_stderr()
    return TraceEstimate(value, stderr, run.num_matvecs, "hutch++", distribution, met, residual.samples)


def _xtrace(
    run: ProductRunner, sketch: XTraceSketch, budget: int, batch: int, rtol: float | None, *, name: str
) -> TraceEstimate:
    target = sketch.size + (budget - run.num_matvecs) // 2

    def status() -> tuple[float, float, int]:
        est = sketch.estimates()
        return (*mean_and_stderr(est), est.numel())

    met = run_blocks(target - sketch.size, batch, sketch.add, rtol=rtol, status=status,
                     check_first=sketch.size > 0, what=f"trace ({name})")
    est = sketch.estimates()
    value, stderr = mean_and_stderr(est)
    return TraceEstimate(value, stderr, run.num_matvecs, name, sketch.distribution, met, est)


def _auto(
    run: ProductRunner, budget: int, distribution: str, gen: torch.Generator, batch: int, rtol: float | None
) -> TraceEstimate:
    d = run.op.shape[0]
    if budget >= d:
        diag = exact_diagonal(run, batch)
        return TraceEstimate(float(diag.sum()), 0.0, run.num_matvecs, "auto:exact", "unit",
                             True if rtol is not None else None, diag)
    if budget < AUTO_MIN_MATVECS or not getattr(run.op, "is_symmetric", True):
        return _hutchinson(run, budget, distribution, gen, batch, rtol, name="auto:hutchinson")
    if 8 * d * budget > curvature.BASIS_BUDGET:  # XTrace keeps 8 d bytes per matvec (float64)
        logger.info("trace(auto): Hutchinson, as XTrace would keep %.1f GiB of test vectors and basis (d = %d)",
                    8 * d * budget / 2**30, d)
        return _hutchinson(run, budget, distribution, gen, batch, rtol, name="auto:hutchinson")
    pilot_dist = _xtrace_distribution(distribution)
    sketch = XTraceSketch(run, gen, pilot_dist)
    pilot = min(max(4, budget // AUTO_PILOT_DIVISOR), 32)
    for size in block_sizes(pilot, batch):
        sketch.add(size)
    _, err_x = mean_and_stderr(sketch.estimates())
    _, err_h = mean_and_stderr(sketch.hutchinson_samples)
    use_xtrace = err_x < AUTO_XTRACE_MARGIN * err_h
    logger.debug("trace(auto): pilot of %d test vectors, XTrace error %.3g vs Hutchinson %.3g -> %s",
                 pilot, err_x, err_h, "xtrace" if use_xtrace else "hutchinson")
    if use_xtrace:
        return _xtrace(run, sketch, budget, batch, rtol, name="auto:xtrace")
    # The fallback keeps drawing from the pilot's distribution, so its samples stay exchangeable.
    return _hutchinson(run, budget, pilot_dist, gen, batch, rtol, name="auto:hutchinson",
                       samples=sketch.hutchinson_samples)
