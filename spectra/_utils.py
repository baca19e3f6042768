"""Private numerics shared by the spectra modules: precision, breakdown thresholds, orthogonalization.

Operator adaptation, argument checks and probes come from the core (``curvature.as_operator``,
``curvature.checks``, ``curvature.probes``), like everywhere else in the toolkit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__: list[str] = []


def eps_of(dtype: torch.dtype) -> float:
    return (
        float(torch.finfo(dtype).eps)
        if dtype.is_floating_point
        else float(torch.finfo(torch.float32).eps)
    )


def default_breakdown_tol(dtype: torch.dtype) -> float:
    # After an invariant subspace the computed beta is round-off, ~eps * ||H||; the margin keeps
    # genuine small couplings (which carry real spectral information) above the threshold.
    return max(1e-10, 100 * eps_of(dtype))


#: Memory the lockstep Lanczos bases of one block of probes or columns may take by default
#: (bytes): more run in turns. Wider blocks only share passes over the data; the budget that
#: guards against running out of memory is :data:`curvature.BASIS_BUDGET`.
LOCKSTEP_BUDGET = 1 << 30

#: DGKS threshold (as in ARPACK): a second Gram–Schmidt pass runs when the first one removed
#: more than ~30 % of the vector's norm, the sign that cancellation may have spoiled it.
DGKS_ETA = 1 / 2**0.5


def orthogonalize_(W: Tensor, Q: Tensor) -> Tensor:
    """Remove from each row ``W[p]`` its components along the rows of ``Q[p]`` (in place).

    ``W`` is ``(p, d)`` and ``Q`` is ``(p, j, d)`` (row-orthonormal per probe), both contiguous
    along ``d``. Classical Gram–Schmidt as two batched matrix products per pass (no Python loop
    over basis vectors), repeated once more whenever the DGKS test says the first pass lost
    accuracy ("twice is enough"). Inside Lanczos, after the three-term recurrence, the first pass
    only removes rounding-level components and the second is skipped; that halves the traffic
    over the basis, which dominates the cost of a step for large ``d``.
    """
    if Q.shape[1] == 0:
        return W
    # Row-vector form, (p, 1, d) @ (p, d, j): batched matrix-vector products written with the
    # vector on the left run ~9x faster on CPU than (p, j, d) @ (p, d, 1), which falls back to
    # a slow batched-GEMM path for a single column.
    Wr = W.unsqueeze(1)  # (p, 1, d), a view of W
    # The norms only steer the DGKS test, so the working precision is enough.
    before = torch.linalg.vector_norm(W, dim=1)
    for _ in range(2):
        coeff = torch.bmm(Wr, Q.transpose(1, 2))  # (p, 1, j)
        Wr.sub_(torch.bmm(coeff, Q))
        after = torch.linalg.vector_norm(W, dim=1)
        if bool((after >= DGKS_ETA * before).all()):
            break
        before = after
    return W


def row_dot64(A: Tensor, B: Tensor) -> Tensor:
    """Row-wise dot products of two ``(p, d)`` matrices, accumulated in float64.

    The products are formed in the working dtype (a float32 product carries the same relative
    error as its float32 factors) and summed in float64, which avoids two float64 copies of
    ``(p, d)`` per call.
    """
    return (A * B).sum(1, dtype=torch.float64)


def row_norm64(A: Tensor) -> Tensor:
    return torch.linalg.vector_norm(A.to(torch.float64), dim=1)


def column_norm64(A: Tensor) -> Tensor:
    return torch.linalg.vector_norm(A.to(torch.float64), dim=0)


#: Bytes of the temporary of one column chunk in :func:`combine_rows`.
_CHUNK_BYTES = 64 << 20


def combine_rows(coeffs: Tensor, rows: Tensor, out: Tensor) -> Tensor:
    """``out = coeffs @ rows`` (``(r, n) @ (n, d) -> (r, d)``) a chunk of columns at a time, so the
    only temporary is one chunk; ``out`` may overlap ``rows`` (a basis rotated in place, as a
    thick restart does), since each chunk is read whole before it is written.

    Examples:
        >>> Q = torch.arange(12.0).reshape(3, 4)
        >>> C = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
        >>> expected = C @ Q
        >>> combine_rows(C, Q, Q[:2]) is not None and bool(torch.equal(Q[:2], expected))
        True
    """
    coeffs = coeffs.to(rows.dtype)
    d = rows.shape[1]
    step = max(1, _CHUNK_BYTES // max(1, max(rows.shape[0], coeffs.shape[0]) * rows.element_size()))
    for start in range(0, d, step):
        cols = slice(start, min(start + step, d))
        out[:, cols] = coeffs @ rows[:, cols]
    return out
