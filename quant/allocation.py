"""The model-facing bit planner: per-layer costs, plans, budgets, ties and fixed layers.

The arrays it builds are solved by :mod:`quant.solvers` (pure, model-free). Both methods minimise
``Ω(b) = Σ_i Ω_i(b_i)`` with ``Ω_i(b) = score_i · ‖Q_b(W_i) − W_i‖²`` over one
bit-width per layer:

* ``method="pareto"`` (Dong et al. 2020): the multiple-choice knapsack solved exactly by a sparse
  dynamic programme over reachable costs (size in bits, or BOPs; see
  :func:`quant.solvers.knapsack_frontier`), which also yields the whole (size, Ω) Pareto frontier.
* ``method="ilp"`` (Yao et al. 2021): a 0/1 integer program with one-hot variables per
  (layer, choice), any of size / BOPs / latency constraints and tied layers, solved by
  ``scipy.optimize.milp`` (HiGHS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .layers import channel_axis, quantizable_layers
from .plan import BitPlan
from .quantizers import check_bits, perturbation_norm_sq
from .sensitivity import LayerSensitivity
from .solvers import DEFAULT_MAX_POINTS, InfeasibleBudgetError, knapsack_frontier, solve_ilp, solve_knapsack

__all__ = [
    "LayerCosts",
    "layer_costs",
    "make_plan",
    "allocate_bits",
    "pareto_frontier",
    "sample_plans",
    "ALLOCATION_METHODS",
]

ALLOCATION_METHODS = ("ilp", "pareto")


# ----------------------------------------------------------------------------------------------
# Model-level costs and plans
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCosts:
    """The per-choice numbers of one layer.

    Attributes:
        name: the layer.
        num_params: weight entries ``n_i``.
        bit_choices: candidate bit-widths.
        perturbation: ``‖Q_b(W_i) − W_i‖²`` per choice.
        omega: ``score_i · perturbation`` per choice.
        size_bits: ``n_i · b`` per choice.
        bops: ``MACs_i · b · b_a`` per choice.
    """

    name: str
    num_params: int
    bit_choices: tuple[int, ...]
    perturbation: tuple[float, ...]
    omega: tuple[float, ...]
    size_bits: tuple[int, ...]
    bops: tuple[float, ...]


def _check_bit_choices(bit_choices: Sequence[int]) -> tuple[int, ...]:
    try:
        choices = tuple(bit_choices)
    except TypeError:
        raise TypeError(f"bit_choices must be a sequence of integers, got {type(bit_choices).__name__}") from None
    if not choices:
        raise ValueError("bit_choices must not be empty")
    for b in choices:
        check_bits(b, name="bit_choices")
    return tuple(sorted(set(choices)))


def _fixed_param_bits(model: nn.Module, layer_names: Sequence[str]) -> int:
    """Bits of all parameters that are not quantized weights, at their storage dtype."""
    quantized = {id(m.weight) for m in quantizable_layers(model, list(layer_names)).values()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in quantized or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size() * 8
    return total


def layer_costs(
    model: nn.Module,
    sensitivities: Mapping[str, LayerSensitivity],
    *,
    bit_choices: Sequence[int] = (2, 4, 8),
    fixed: Mapping[str, int] | None = None,
    symmetric: bool = True,
    per_channel: bool = True,
    activation_bits: int | None = None,
) -> list[LayerCosts]:
    """Per-layer choices with their perturbation, Ω, size and BOPs (``fixed`` layers: one choice).

    Examples:
        >>> m = nn.Sequential(nn.Linear(3, 2))
        >>> s = {"0": LayerSensitivity("0", "Linear", 6, "trace", 6.0, 0.0, None, None, 6, 1)}
        >>> layer_costs(m, s, bit_choices=(4, 8))[0].size_bits
        (24, 48)
    """
    choices = _check_bit_choices(bit_choices)
    if not isinstance(sensitivities, Mapping) or not sensitivities:
        raise ValueError("sensitivities must be a non-empty mapping from layer name to LayerSensitivity")
    if activation_bits is not None:
        check_bits(activation_bits, name="activation_bits")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(sensitivities)
    if unknown:
        raise ValueError(f"fixed names layers without a sensitivity: {sorted(unknown)}")
    layers = quantizable_layers(model, list(sensitivities))
    out = []
    for name, module in layers.items():
        s = sensitivities[name]
        w = module.weight.detach()
        if s.num_params != w.numel():
            raise ValueError(
                f"layer {name!r}: the sensitivity is for {s.num_params} weights, the model has {w.numel()}"
            )
        layer_choices = (check_bits(fixed[name], name=f"fixed[{name!r}]"),) if name in fixed else choices
        pert = tuple(perturbation_norm_sq(w, b, symmetric=symmetric, per_channel=per_channel,
                                          channel_axis=channel_axis(module)) for b in layer_choices)
        out.append(LayerCosts(
            name=name,
            num_params=w.numel(),
            bit_choices=layer_choices,
            perturbation=pert,
            omega=tuple(s.score * p for p in pert),
            size_bits=tuple(w.numel() * b for b in layer_choices),
            bops=tuple(float(s.macs) * b * (activation_bits or b) for b in layer_choices),
        ))
    return out


def _plan_from_choices(
    costs: list[LayerCosts], choices: Sequence[int], fixed_bits: int, *, metric: str, symmetric: bool,
    per_channel: bool, activation_bits: int | None, method: str,
) -> BitPlan:
    bits = {lc.name: lc.bit_choices[k] for lc, k in zip(costs, choices)}
    omega = {lc.name: lc.omega[k] for lc, k in zip(costs, choices)}
    size = (fixed_bits + sum(lc.size_bits[k] for lc, k in zip(costs, choices))) / 8
    bops = sum(lc.bops[k] for lc, k in zip(costs, choices))
    return BitPlan(bits, size_bytes=size, bops=bops, omega=sum(omega.values()), omega_per_layer=omega,
                   metric=metric, symmetric=symmetric, per_channel=per_channel,
                   activation_bits=activation_bits, method=method)


def _metric_of(sensitivities: Mapping[str, LayerSensitivity]) -> str:
    metrics = {s.metric for s in sensitivities.values()}
    if len(metrics) != 1:
        raise ValueError(f"sensitivities mix metrics {sorted(metrics)}")
    return metrics.pop()


def make_plan(
    model: nn.Module,
    sensitivities: Mapping[str, LayerSensitivity],
    bits: Mapping[str, int] | int,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    activation_bits: int | None = None,
    method: str = "manual",
) -> BitPlan:
    """The :class:`BitPlan` of a given assignment (``bits``: per layer, or one int for all).

    Examples:
        >>> m = nn.Sequential(nn.Linear(3, 2))
        >>> s = {"0": LayerSensitivity("0", "Linear", 6, "trace", 6.0, 0.0, None, None, 6, 1)}
        >>> make_plan(m, s, 4).size_bytes       # 6 weights at 4 bits + 2 float32 biases
        11.0
    """
    if isinstance(bits, int):
        bits = {name: bits for name in sensitivities}
    missing = set(sensitivities) - set(bits)
    extra = set(bits) - set(sensitivities)
    if missing or extra:
        raise ValueError(f"bits must name exactly the layers of sensitivities (missing {sorted(missing)}, "
                         f"unknown {sorted(extra)})")
    costs = layer_costs(model, sensitivities, bit_choices=sorted(set(bits.values())), fixed=bits,
                        symmetric=symmetric, per_channel=per_channel, activation_bits=activation_bits)
    return _plan_from_choices(costs, [0] * len(costs), _fixed_param_bits(model, list(sensitivities)),
                              metric=_metric_of(sensitivities), symmetric=symmetric, per_channel=per_channel,
                              activation_bits=activation_bits, method=method)


def _groups(names: list[str], tied: Sequence[Sequence[str]]) -> list[list[int]]:
    """Union of tied layers into groups of indices, in order of first member."""
    parent = list(range(len(names)))
    index = {n: i for i, n in enumerate(names)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in tied:
        group = list(group)
        for n in group:
            if n not in index:
                raise ValueError(f"tied: unknown layer {n!r}; layers: {names}")
        for a, b in zip(group, group[1:]):
            parent[find(index[b])] = find(index[a])
    out: dict[int, list[int]] = {}
    for i in range(len(names)):
        out.setdefault(find(i), []).append(i)
    return sorted(out.values(), key=lambda g: g[0])


def _merge_groups(
    costs: list[LayerCosts], groups: list[list[int]]
) -> tuple[list[list[tuple[int, ...]]], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Tied layers become one super-layer whose choices are the bit-widths all members share."""
    options, size, bops, omega = [], [], [], []
    for g in groups:
        common = reduce(lambda a, b: a & b, (set(costs[i].bit_choices) for i in g))
        if not common:
            raise ValueError(f"tied layers {[costs[i].name for i in g]} share no bit-width")
        bits = sorted(common)
        opts = [tuple(costs[i].bit_choices.index(b) for i in g) for b in bits]
        options.append(opts)
        size.append(np.array([sum(costs[i].size_bits[k] for i, k in zip(g, o)) for o in opts], dtype=np.int64))
        bops.append(np.array([sum(costs[i].bops[k] for i, k in zip(g, o)) for o in opts]))
        omega.append(np.array([sum(costs[i].omega[k] for i, k in zip(g, o)) for o in opts]))
    return options, size, bops, omega


def _budget_message(kind: str, minimum: float, limit: float, unit: str) -> str:
    return f"{kind} budget {limit:.6g} {unit} is below the smallest achievable {kind}: {minimum:.6g} {unit}"


def allocate_bits(
    model: nn.Module,
    sensitivities: Mapping[str, LayerSensitivity],
    *,
    bit_choices: Sequence[int] = (2, 4, 8),
    max_size_bytes: float | None = None,
    max_bops: float | None = None,
    max_latency: float | None = None,
    latency_table: Mapping[str, Mapping[int, float]] | None = None,
    method: str = "ilp",
    tied: Sequence[Sequence[str]] = (),
    fixed: Mapping[str, int] | None = None,
    symmetric: bool = True,
    per_channel: bool = True,
    activation_bits: int | None = None,
    time_limit: float = 10.0,
    max_points: int = DEFAULT_MAX_POINTS,
) -> BitPlan:
    """The bit plan of least predicted Ω within the budgets.

    Args:
        model: the network whose weights are quantized (for ``‖Q_b(W) − W‖²`` and sizes).
        sensitivities: from :func:`quant.sensitivity`.
        bit_choices: candidate weight bit-widths (each in 1..32).
        max_size_bytes: total model size budget (quantized weights plus the other parameters at
            their dtype, as :attr:`BitPlan.size_bytes`).
        max_bops: budget on bit operations per sample.
        max_latency: budget on the summed per-layer latency from ``latency_table``
            (``{layer: {bits: latency}}``, measured on the target; ``method="ilp"`` only).
        method: ``"ilp"`` (HAWQ-V3; any combination of budgets and ties) or ``"pareto"``
            (HAWQ-V2's exact Pareto DP over reachable costs; one budget, size or BOPs). Both
            are exact and return the same least Ω.
        tied: groups of layer names that must share a bit-width (e.g. residual pairs).
        fixed: ``{layer: bits}`` for layers kept out of the search (often the first and last).
        symmetric, per_channel: the weight quantizer.
        activation_bits: activation bit-width for BOPs (default: the layer's weight bits).
        time_limit: ILP time limit in seconds.
        max_points: most Pareto points the exact DP keeps (``method="pareto"``; beyond it
            :class:`quant.solvers.FrontierTooLargeError` suggests the ILP).

    Raises:
        InfeasibleBudgetError: (a ``ValueError``) when a budget is below the smallest achievable
            value, which the message states (in bytes for size). A budget equal to it is met.

    Examples:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> s = {n: LayerSensitivity(n, "Linear", k, "trace", t, 0.0, None, None, k, 1)
        ...      for n, k, t in [("0", 16, 16.0), ("2", 8, 80.0)]}
        >>> plan = allocate_bits(m, s, bit_choices=(4, 8), max_size_bytes=40)
        >>> dict(plan.bits), plan.size_bytes
        ({'0': 4, '2': 8}, 40.0)
    """
    if method not in ALLOCATION_METHODS:
        raise ValueError(f"method must be one of {ALLOCATION_METHODS}, got {method!r}")
    if max_size_bytes is None and max_bops is None and max_latency is None:
        raise ValueError("give a budget: max_size_bytes, max_bops or max_latency")
    if max_latency is not None and latency_table is None:
        raise ValueError("max_latency needs latency_table={layer: {bits: latency}}")
    costs = layer_costs(model, sensitivities, bit_choices=bit_choices, fixed=fixed, symmetric=symmetric,
                        per_channel=per_channel, activation_bits=activation_bits)
    names = [lc.name for lc in costs]
    fixed_bits = _fixed_param_bits(model, names)
    groups = _groups(names, tied)
    options, size, bops, omega = _merge_groups(costs, groups)
    lat: list[np.ndarray] | None = None
    if latency_table is not None:
        lat = []
        for g, opts in zip(groups, options):
            row = []
            for o in opts:
                total = 0.0
                for i, k in zip(g, o):
                    table = latency_table.get(names[i])
                    b = costs[i].bit_choices[k]
                    if table is None or b not in table:
                        raise ValueError(f"latency_table has no entry for layer {names[i]!r} at {b} bits")
                    total += float(table[b])
                row.append(total)
            lat.append(np.array(row))

    # Feasibility first, so an impossible budget gets the smallest achievable value.
    checks = [("size", max_size_bytes, [s / 8 for s in size], fixed_bits / 8, "bytes"),
              ("BOPs", max_bops, bops, 0.0, "BOPs"),
              ("latency", max_latency, lat, 0.0, "")]
    for kind, limit, table, offset, unit in checks:
        if limit is None:
            continue
        if not math.isfinite(float(limit)):
            raise ValueError(f"the {kind} budget must be a finite number, got {limit}")
        minimum = offset + sum(float(t.min()) for t in table)  # type: ignore[union-attr]
        if limit < minimum - 1e-9 * max(abs(minimum), 1.0):
            raise InfeasibleBudgetError(_budget_message(kind, minimum, float(limit), unit))

    common = dict(metric=_metric_of(sensitivities), symmetric=symmetric, per_channel=per_channel,
                  activation_bits=activation_bits)
    if method == "pareto":
        used = [(k, lim) for k, lim in (("size", max_size_bytes), ("bops", max_bops)) if lim is not None]
        if len(used) != 1 or max_latency is not None:
            raise ValueError("method='pareto' takes exactly one budget (max_size_bytes or max_bops); use method='ilp'")
        kind, limit = used[0]
        values = size if kind == "size" else bops
        budget = (float(limit) * 8 - fixed_bits) if kind == "size" else float(limit)
        group_choice, _ = solve_knapsack(values, omega, budget, max_points=max_points)
    else:
        L, K = len(groups), max(len(o) for o in options)
        W = np.full((L, K), np.inf)
        for i, w in enumerate(omega):
            W[i, : len(w)] = w
        resources = []
        budgets = ((max_size_bytes, size, fixed_bits / 8), (max_bops, bops, 0.0), (max_latency, lat, 0.0))
        for limit, table, offset in budgets:
            if limit is None:
                continue
            R = np.zeros((L, K))
            for i, t in enumerate(table):  # type: ignore[arg-type]
                R[i, : len(t)] = t / 8 if table is size else t
            resources.append((R, float(limit) - offset))
        group_choice, _ = solve_ilp(W, resources, time_limit=time_limit)
    choices = [0] * len(costs)
    for g, opts, k in zip(groups, options, group_choice):
        for i, ki in zip(g, opts[k]):
            choices[i] = ki
    return _plan_from_choices(costs, choices, fixed_bits, method=method, **common)


def pareto_frontier(
    model: nn.Module,
    sensitivities: Mapping[str, LayerSensitivity],
    *,
    bit_choices: Sequence[int] = (2, 4, 8),
    cost: str = "size",
    tied: Sequence[Sequence[str]] = (),
    fixed: Mapping[str, int] | None = None,
    symmetric: bool = True,
    per_channel: bool = True,
    activation_bits: int | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
) -> list[BitPlan]:
    """HAWQ-V2's Pareto frontier: every plan not dominated in (size or BOPs, Ω), by increasing cost.

    Exact (:func:`quant.solvers.knapsack_frontier`, a DP over reachable costs: no rounding of
    sizes). Ω strictly decreases along it.

    Examples:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> s = {n: LayerSensitivity(n, "Linear", k, "trace", t, 0.0, None, None, k, 1)
        ...      for n, k, t in [("0", 16, 16.0), ("2", 8, 80.0)]}
        >>> frontier = pareto_frontier(m, s, bit_choices=(4, 8))
        >>> frontier[0].size_bytes, frontier[-1].size_bytes, dict(frontier[-1].bits)
        (36.0, 48.0, {'0': 8, '2': 8})
    """
    if cost not in ("size", "bops"):
        raise ValueError(f"cost must be 'size' or 'bops', got {cost!r}")
    costs = layer_costs(model, sensitivities, bit_choices=bit_choices, fixed=fixed, symmetric=symmetric,
                        per_channel=per_channel, activation_bits=activation_bits)
    names = [lc.name for lc in costs]
    fixed_bits = _fixed_param_bits(model, names)
    groups = _groups(names, tied)
    options, size, bops, omega = _merge_groups(costs, groups)
    values = size if cost == "size" else bops
    common = dict(metric=_metric_of(sensitivities), symmetric=symmetric, per_channel=per_channel,
                  activation_bits=activation_bits)
    plans = []
    for _, _, group_choice in knapsack_frontier(values, omega, max_points=max_points):
        choices = [0] * len(costs)
        for g, opts, k in zip(groups, options, group_choice):
            for i, ki in zip(g, opts[k]):
                choices[i] = ki
        plans.append(_plan_from_choices(costs, choices, fixed_bits, method="pareto", **common))
    return plans


def sample_plans(
    model: nn.Module,
    sensitivities: Mapping[str, LayerSensitivity],
    *,
    num_plans: int,
    bit_choices: Sequence[int] = (2, 4, 8),
    max_size_bytes: float | None = None,
    min_size_bytes: float | None = None,
    generator: torch.Generator | None = None,
    max_tries: int = 100_000,
    symmetric: bool = True,
    per_channel: bool = True,
) -> list[BitPlan]:
    """Random plans (uniform bit per layer), kept if their size lies in ``[min_size, max_size]``.

    Used as baselines for allocated plans of the same size. Returns fewer than ``num_plans``
    plans if ``max_tries`` draws do not find enough.

    Examples:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> s = {n: LayerSensitivity(n, "Linear", k, "trace", 1.0, 0.0, None, None, k, 1)
        ...      for n, k in [("0", 16), ("2", 8)]}
        >>> plans = sample_plans(m, s, num_plans=3, generator=torch.Generator().manual_seed(0))
        >>> len(plans), plans[0].method
        (3, 'random')
    """
    costs = layer_costs(model, sensitivities, bit_choices=bit_choices, symmetric=symmetric, per_channel=per_channel)
    fixed_bits = _fixed_param_bits(model, [lc.name for lc in costs])
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    hi = math.inf if max_size_bytes is None else float(max_size_bytes) * 8
    lo = -math.inf if min_size_bytes is None else float(min_size_bytes) * 8
    metric = _metric_of(sensitivities)
    plans: list[BitPlan] = []
    K = len(costs[0].bit_choices)
    sizes = np.array([lc.size_bits for lc in costs], dtype=np.float64)  # (L, K)
    rows = np.arange(len(costs))
    tries = 0
    while len(plans) < num_plans and tries < max_tries:
        batch = torch.randint(0, K, (1024, len(costs)), generator=generator).numpy()
        tries += batch.shape[0]
        total = fixed_bits + sizes[rows, batch].sum(axis=1)
        for choices in batch[(total >= lo) & (total <= hi)]:
            plans.append(_plan_from_choices(costs, list(choices), fixed_bits, metric=metric, symmetric=symmetric,
                                            per_channel=per_channel, activation_bits=None, method="random"))
            if len(plans) == num_plans:
                break
    return plans
