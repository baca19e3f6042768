"""Diagonal estimation: Hutchinson-type (Bekas et al. 2007), XDiag, and exact."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvature import as_operator
from curvature.checks import check_choice, check_rtol
from curvature.probes import make_generator

from ._products import ProductRunner, block_sizes, exact_diagonal, itemsize, run_blocks
from ._validation import check_distribution, check_num_matvecs, check_probe_batch_size, require_symmetric
from .lowrank import OrthonormalBasis, leave_one_out_directions
from .probes import default_probe_batch_size
from .results import DiagonalEstimate

__all__ = ["diagonal", "DIAGONAL_METHODS"]

DIAGONAL_METHODS = ("hutchinson", "xdiag", "exact")

#: Rows per chunk for the float64 per-entry accumulation.
_ROW_CHUNK = 1 << 18


def diagonal(
    op: Any,
    *,
    num_matvecs: int | None = None,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    probe_batch_size: int | None = None,
    rtol: float | None = None,
    progress: bool = False,
) -> DiagonalEstimate:
    """Estimate ``diag(A)`` as a flat float64 ``(d,)`` tensor with per-entry standard errors.

    Args:
        op: a square operator (see :func:`estimators.trace`).
        num_matvecs: the budget; required except for ``method="exact"`` (which spends exactly
            ``d``; if given there it must be at least ``d``).  ``"xdiag"`` needs an even number.
        method: ``"hutchinson"``: ``mean v ⊙ Av`` (unbiased; with Rademacher probes the
            variance of entry ``j`` is ``Σ_{l≠j} A_jl² / m``); ``"xdiag"``: exchangeable
            leave-one-out low-rank sketch plus a diagonal estimate of the remainder (Epperly, Tropp,
            Webber 2024; symmetric operators; much better when the spectrum decays fast);
            ``"exact"``: products with all ``d`` unit vectors, in blocks (small operators; the
            reference for tests).
        distribution: ``"rademacher"`` (recommended) or ``"normal"`` (plain ``1/m`` average, unbiased).
        generator, probe_batch_size, progress: as in :func:`estimators.trace`.
        rtol: (Hutchinson only) stop once the whole diagonal's relative error
            ``‖stderr‖ / ‖value‖`` is at most ``rtol`` (checked after each block, from 10 probes on);
            ``num_matvecs`` is then the maximum.

    Returns:
        A :class:`DiagonalEstimate`; ``.per_block()`` splits it into parameter-shaped tensors.

    Examples:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> diagonal(A, method="exact").value.tolist()
        [2.0, 3.0]
    """
    A = as_operator(op)
    method = check_choice(method, name="method", choices=DIAGONAL_METHODS)
    distribution = check_distribution(distribution)
    batch = check_probe_batch_size(probe_batch_size)
    rtol = check_rtol(rtol)
    if rtol is not None and method != "hutchinson":
        raise ValueError(f"rtol= needs method='hutchinson' (got method={method!r})")
    d = A.shape[0]
    if method == "exact":
        if num_matvecs is not None:
            num_matvecs = check_num_matvecs(num_matvecs, method=method)
            if num_matvecs < d:
                raise ValueError(f"num_matvecs must be >= d = {d} for method='exact' (or None), got {num_matvecs}")
        with ProductRunner(A, total=d, progress=progress, desc="diagonal (exact)") as run:
            value = exact_diagonal(run, batch or default_probe_batch_size(d, d, itemsize=itemsize(A.dtype)))
        return DiagonalEstimate(value, torch.zeros_like(value), run.num_matvecs, "exact", "unit", A.blocks)
    if num_matvecs is None:
        raise TypeError(f"num_matvecs is required for method={method!r}")
    num_matvecs = check_num_matvecs(num_matvecs, method=method, multiple=2 if method == "xdiag" else 1,
                                    minimum=2 if method == "xdiag" else 1)
    if method == "xdiag":
        require_symmetric(A, method)
        if num_matvecs // 2 > d:
            raise ValueError(f"num_matvecs must be <= 2 d = {2 * d} for method='xdiag', got {num_matvecs}")
    gen = make_generator(generator, A.device)
    batch = batch or default_probe_batch_size(d, num_matvecs, itemsize=itemsize(A.dtype), rtol=rtol is not None)
    met = None
    with ProductRunner(A, total=num_matvecs, progress=progress, desc=f"diagonal ({method})") as run:
        if method == "hutchinson":
            acc = _DiagonalAccumulator(d, A.device)

            def step(size: int) -> None:
                V = run.probes(size, distribution, gen)
                acc.add(V, run(V))

            met = run_blocks(num_matvecs, batch, step, rtol=rtol, status=acc.status, what="diagonal")
            value, stderr = acc.result()
        else:
            value, stderr = _xdiag(run, num_matvecs // 2, distribution, gen, batch)
    return DiagonalEstimate(value, stderr, run.num_matvecs, method, distribution, A.blocks, met)


class _DiagonalAccumulator:
    """Running per-entry mean and sum of squared deviations of ``v ⊙ Av``, merged per block (Chan
    et al.): stable even when the per-probe samples barely vary, e.g. a nearly diagonal matrix."""

    def __init__(self, d: int, device: torch.device):
        self.mean = torch.zeros(d, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(d, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, V: Tensor, AV: Tensor) -> None:
        d, size = V.shape
        for start in range(0, d, _ROW_CHUNK):
            rows = slice(start, start + _ROW_CHUNK)
            X = (V[rows] * AV[rows]).double()
            b_mean = X.mean(dim=1)
            b_m2 = ((X - b_mean[:, None]) ** 2).sum(dim=1)
            delta = b_mean - self.mean[rows]
            tot = self.n + size
            self.mean[rows] += delta * (size / tot)
            self.m2[rows] += b_m2 + delta**2 * (self.n * size / tot)
        self.n += size

    def result(self) -> tuple[Tensor, Tensor]:
        if self.n < 2:
            return self.mean, torch.full_like(self.mean, math.inf)
        return self.mean, (self.m2 / (self.n - 1)).sqrt() / math.sqrt(self.n)

    def status(self) -> tuple[float, float, int]:
        value, stderr = self.result()
        return float(value.norm()), float(stderr.norm()), self.n


def _xdiag(
    run: ProductRunner, k: int, distribution: str, gen: torch.Generator, batch: int
) -> tuple[Tensor, Tensor]:
    op = run.op
    d = op.shape[0]
    basis = OrthonormalBasis(d, op.device, gen)
    omegas = []
    for size in block_sizes(k, batch):
        omega = run.probes(size, distribution, gen)
        basis.extend(run(omega))
        omegas.append(omega.double())
    omega = torch.cat(omegas, dim=1)
    Q, R = basis.Q, basis.R
    Z = torch.cat([run(Q[:, s:s + b].to(op.dtype)).double() for s, b in _offsets(k, batch)], dim=1)
    S = leave_one_out_directions(R)
    # Estimate i: diag(Π_i A) + ω_i ⊙ (I - Π_i)Aω_i with Π_i = Q(I - s_i s_iᵀ)Qᵀ.  Since
    # Aω_i = Q r_i, the residual product is (s_iᵀ r_i) Q s_i, so no further products are needed.
    c = (S * R).sum(dim=0)
    QS = Q @ S
    E = QS * (omega * c - Z @ S)
    base = (Q * Z).sum(dim=1)
    if k < 2:
        return base + E[:, 0], torch.full((d,), math.inf, dtype=torch.float64, device=op.device)
    std, mean = torch.std_mean(E, dim=1, correction=1)
    return base + mean, std / math.sqrt(k)


def _offsets(total: int, batch: int):
    start = 0
    for size in block_sizes(total, batch):
        yield start, size
        start += size
