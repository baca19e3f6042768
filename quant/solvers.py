"""Pure bit-allocation solvers on arrays: the exact multiple-choice knapsack and HAWQ-V3's ILP.

Nothing here knows about models: a problem is, per layer (or group of tied layers), a list of
choices with a cost and an objective ``Ω``. One choice per layer; minimise ``Σ Ω`` subject to
``Σ cost <= budget``. The model-facing planner (:mod:`quant.allocation`) builds these arrays.

* :func:`knapsack_frontier` / :func:`solve_knapsack`: HAWQ-V2's Pareto frontier (Dong et al.
  2020) by a sparse dynamic programme over REACHABLE costs: after each layer only the
  (cost, Ω) pairs not dominated by another are kept (a cheaper-or-equal pair with less-or-equal
  Ω). The frontier is exact for any real costs (no integer table, no gcd, no coarsening): costs
  are added in float64, exact for integer costs below ``2**53`` (sizes in bits, BOPs). Its
  length is the number of Pareto-optimal partial plans (for ``L`` layers of ``K`` choices at
  most ``K^L``, in practice thousands); ``max_points`` bounds it, with a named error beyond.
* :func:`solve_ilp`: HAWQ-V3 (Yao et al. 2021), one-hot 0/1 variables per (layer, choice), any
  number of resource constraints and ties, by ``scipy.optimize.milp`` (HiGHS).

These functions are not exported from ``quant``'s root; import them from ``quant.solvers``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

#: Per layer, one value per choice (lists or 1-d arrays).
Table = Sequence[ArrayLike]

__all__ = ["InfeasibleBudgetError", "FrontierTooLargeError", "knapsack_frontier", "solve_knapsack", "solve_ilp"]

logger = logging.getLogger(__name__)

#: Relative slack of a budget comparison (a budget equal to a plan's cost admits it).
BUDGET_RTOL = 1e-9

#: Most Pareto points kept after one layer before :class:`FrontierTooLargeError`.
DEFAULT_MAX_POINTS = 5_000_000


class InfeasibleBudgetError(ValueError):
    """No bit assignment meets the budget (the message states the smallest achievable value)."""


class FrontierTooLargeError(RuntimeError):
    """The exact Pareto frontier has more points than ``max_points`` (use the ILP instead)."""


def _check_instance(costs: Table, omegas: Table) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(costs) != len(omegas) or not len(costs):
        raise ValueError("costs and omegas must be non-empty and have one entry per layer")
    c_out, w_out = [], []
    for i, (c_in, w_in) in enumerate(zip(costs, omegas)):
        c, w = np.asarray(c_in, dtype=np.float64), np.asarray(w_in, dtype=np.float64)
        if c.ndim != 1 or c.shape != w.shape or c.size == 0:
            raise ValueError(f"layer {i}: costs and omegas must be equal-length non-empty 1-d sequences")
        if not np.isfinite(c).all() or (c < 0).any():
            raise ValueError(f"layer {i}: costs must be finite and non-negative")
        if np.isnan(w).any():
            raise ValueError(f"layer {i}: omegas must not be NaN")
        c_out.append(c)
        w_out.append(w)
    return c_out, w_out


def _slack(budget: float) -> float:
    return float(budget) + BUDGET_RTOL * max(abs(float(budget)), 1.0)


def _pareto_dp(
    costs: list[np.ndarray], omegas: list[np.ndarray], budget: float | None, max_points: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The exact frontier after all layers: costs, Ω (cost increasing, Ω strictly decreasing), and
    per layer the (parent index, choice) of every kept point for backtracking."""
    # Plans whose cost cannot stay within the budget even with the cheapest remaining choices
    # are cut early (exact: they could never be completed feasibly).
    rest = np.concatenate([np.cumsum([c.min() for c in costs[::-1]])[::-1][1:], [0.0]])
    cost = np.zeros(1)
    omega = np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (c_i, w_i) in enumerate(zip(costs, omegas)):
        K = c_i.size
        cand_cost = (cost[:, None] + c_i[None, :]).ravel()
        cand_omega = (omega[:, None] + w_i[None, :]).ravel()
        parent = np.repeat(np.arange(cost.size), K)
        choice = np.tile(np.arange(K), cost.size)
        if budget is not None:
            keep = cand_cost + rest[i] <= _slack(budget)
            cand_cost, cand_omega, parent, choice = cand_cost[keep], cand_omega[keep], parent[keep], choice[keep]
        finite = np.isfinite(cand_omega)  # an Ω of +inf marks a choice a layer does not have
        cand_cost, cand_omega, parent, choice = cand_cost[finite], cand_omega[finite], parent[finite], choice[finite]
        if cand_cost.size == 0:
            raise InfeasibleBudgetError("no assignment meets the budget")
        order = np.lexsort((cand_omega, cand_cost))  # by cost, then Ω
        cand_cost, cand_omega = cand_cost[order], cand_omega[order]
        running = np.minimum.accumulate(cand_omega)
        prev = np.concatenate([[np.inf], running[:-1]])
        kept = cand_omega < prev  # strictly better than every cheaper-or-equal plan
        cost, omega = cand_cost[kept], cand_omega[kept]
        trail.append((parent[order][kept], choice[order][kept]))
        if cost.size > max_points:
            raise FrontierTooLargeError(
                f"the exact Pareto frontier has {cost.size} points after layer {i} (max_points={max_points}); "
                "use method='ilp' for one budget, or raise max_points"
            )
    return cost, omega, trail


def _backtrack(trail: list[tuple[np.ndarray, np.ndarray]], point: int) -> tuple[int, ...]:
    choices = [0] * len(trail)
    for i in range(len(trail) - 1, -1, -1):
        parent, choice = trail[i]
        choices[i] = int(choice[point])
        point = int(parent[point])
    return tuple(choices)


def knapsack_frontier(
    costs: Table, omegas: Table, *, max_points: int = DEFAULT_MAX_POINTS
) -> list[tuple[float, float, tuple[int, ...]]]:
    """The exact (cost, Ω) Pareto frontier of the multiple-choice knapsack.

    Returns ``[(cost, Ω, choice index per layer), ...]`` by increasing cost with Ω strictly
    decreasing: every assignment costs at least, and has at least the Ω of, one of these. Of
    assignments equal in both, the first in choice order is kept.

    Examples:
        >>> [(c, w) for c, w, _ in knapsack_frontier([[1, 2], [1, 2]], [[5.0, 1.0], [3.0, 2.0]])]
        [(2.0, 8.0), (3.0, 4.0), (4.0, 3.0)]
    """
    c, w = _check_instance(costs, omegas)
    cost, omega, trail = _pareto_dp(c, w, None, max_points)
    return [(float(cost[j]), float(omega[j]), _backtrack(trail, j)) for j in range(cost.size)]


def solve_knapsack(
    costs: Table,
    omegas: Table,
    budget: float,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
) -> tuple[tuple[int, ...], float]:
    """Exact multiple-choice knapsack: one choice per layer, total cost ``<= budget``, least Ω.

    Returns ``(choice index per layer, objective)``, the cheapest of equally good assignments.
    A budget equal to the smallest achievable cost is feasible.

    Raises:
        InfeasibleBudgetError: when even the cheapest choices exceed ``budget`` (the message
            states the smallest achievable cost, in the costs' units).

    Examples:
        >>> solve_knapsack([[1, 2], [1, 2]], [[5.0, 1.0], [3.0, 2.0]], budget=3)
        ((1, 0), 4.0)
    """
    c, w = _check_instance(costs, omegas)
    minimum = float(sum(ci.min() for ci in c))
    if not np.isfinite(float(budget)) or minimum > _slack(budget):
        raise InfeasibleBudgetError(f"budget {float(budget):.10g} is below the smallest achievable cost {minimum:.10g}")
    cost, omega, trail = _pareto_dp(c, w, float(budget), max_points)
    best = cost.size - 1  # Ω strictly decreases along the frontier: its last point is the optimum
    return _backtrack(trail, best), float(omega[best])


def solve_ilp(
    omegas: np.ndarray,
    resources: Sequence[tuple[np.ndarray, float]] = (),
    *,
    ties: Sequence[tuple[int, int]] = (),
    time_limit: float = 10.0,
) -> tuple[tuple[int, ...], float]:
    """HAWQ-V3's integer program with ``scipy.optimize.milp`` (one-hot ``x_ik``, row-major).

    Args:
        omegas: ``(L, K)`` objective ``Ω_ik``; ``inf`` marks a choice a layer does not have.
        resources: ``(R, limit)`` pairs with ``R`` of shape ``(L, K)``: ``Σ R_ik x_ik <= limit``.
        ties: layer index pairs ``(i, j)`` forced to the same choice.
        time_limit: HiGHS time limit in seconds.

    Returns:
        ``(choice index per layer, objective)``. Raises :class:`InfeasibleBudgetError` when the
        constraints cannot all be met.

    Examples:
        >>> import numpy as np
        >>> solve_ilp(np.array([[5.0, 1.0], [3.0, 2.0]]), [(np.array([[1, 2], [1, 2]]), 3)])
        ((1, 0), 4.0)
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    W = np.asarray(omegas, dtype=np.float64)
    if W.ndim != 2 or W.size == 0:
        raise ValueError(f"omegas must be a non-empty (layers, choices) array, got shape {W.shape}")
    L, K = W.shape
    available = np.isfinite(W)
    if not available.any(axis=1).all():
        raise ValueError("every layer needs at least one available choice")
    c = np.where(available, W, 0.0).ravel()
    ub = available.astype(np.float64).ravel()
    rows = np.repeat(np.arange(L), K)
    one_hot = csr_matrix((np.ones(L * K), (rows, np.arange(L * K))), shape=(L, L * K))
    constraints = [LinearConstraint(one_hot, 1, 1)]
    for R, limit in resources:
        R = np.where(available, np.asarray(R, dtype=np.float64), 0.0)
        if R.shape != (L, K):
            raise ValueError(f"resource table must have shape {(L, K)}, got {R.shape}")
        constraints.append(LinearConstraint(R.ravel()[None, :], -np.inf, _slack(limit)))
    if ties:
        data, r_idx, c_idx = [], [], []
        for t, (i, j) in enumerate(ties):
            for k in range(K):
                row = t * K + k
                data += [1.0, -1.0]
                r_idx += [row, row]
                c_idx += [i * K + k, j * K + k]
        A = csr_matrix((data, (r_idx, c_idx)), shape=(len(ties) * K, L * K))
        constraints.append(LinearConstraint(A, 0, 0))
    res = milp(
        c, integrality=np.ones(L * K), bounds=Bounds(np.zeros(L * K), ub), constraints=constraints,
        options={"time_limit": float(time_limit), "mip_rel_gap": 0.0},
    )
    if res.x is None:
        if res.status == 2:
            raise InfeasibleBudgetError("the integer program is infeasible: no assignment meets the budgets")
        raise RuntimeError(f"milp failed (status {res.status}): {res.message}")
    if res.status != 0:
        logger.warning("milp stopped early (status %d: %s); returning its best feasible plan", res.status, res.message)
    X = np.round(res.x).reshape(L, K)
    if not (X.sum(axis=1) == 1).all():
        raise RuntimeError("milp returned a solution that is not one-hot after rounding")
    choices = tuple(int(k) for k in X.argmax(axis=1))
    return choices, float(sum(W[i, k] for i, k in enumerate(choices)))
