import itertools
import time

import numpy as np
import pytest
import torch
from torch import nn

import quant
from quant import LayerSensitivity, solvers


def brute_force(costs, omegas, budget):
    best, arg = np.inf, None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[k] for c, k in zip(costs, choice))
        value = sum(w[k] for w, k in zip(omegas, choice))
        if cost <= budget and value < best - 1e-15:
            best, arg = value, choice
    return arg, best


def random_instance(rng, layers, choices):
    costs = [np.sort(rng.choice(np.arange(1, 20), size=choices, replace=False)) for _ in range(layers)]
    # more bits: larger cost, smaller error (like quantization), plus some random instances
    omegas = [np.sort(rng.random(choices))[::-1] * rng.uniform(0.1, 10) for _ in range(layers)]
    return costs, omegas


@pytest.mark.parametrize("seed", range(12))
def test_dp_and_ilp_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers, choices = int(rng.integers(1, 7)), int(rng.integers(2, 4))
    costs, omegas = random_instance(rng, layers, choices)
    lo, hi = sum(int(c.min()) for c in costs), sum(int(c.max()) for c in costs)
    for budget in sorted({lo, (lo + hi) // 2, int(rng.integers(lo, hi + 1)), hi}):
        _, expected = brute_force(costs, omegas, budget)
        dp_choice, dp_value = solvers.solve_knapsack(costs, omegas, budget)
        W = np.array(omegas)
        ilp_choice, ilp_value = solvers.solve_ilp(W, [(np.array(costs), budget)])
        assert abs(dp_value - expected) < 1e-12 and abs(ilp_value - expected) < 1e-12
        for choice in (dp_choice, ilp_choice):
            assert sum(c[k] for c, k in zip(costs, choice)) <= budget
            assert abs(sum(w[k] for w, k in zip(omegas, choice)) - expected) < 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_dp_frontier_is_the_exact_pareto_set(seed):
    rng = np.random.default_rng(100 + seed)
    costs, omegas = random_instance(rng, int(rng.integers(2, 7)), 3)
    frontier = solvers.knapsack_frontier(costs, omegas)
    points = []
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        points.append((sum(c[k] for c, k in zip(costs, choice)), sum(w[k] for w, k in zip(omegas, choice))))
    expected = []
    for cost, value in sorted(points):
        if not expected or value < expected[-1][1] - 1e-15:
            if expected and expected[-1][0] == cost:
                continue
            expected.append((cost, value))
    assert [c for c, _, _ in frontier] == [c for c, _ in expected]
    assert np.allclose([w for _, w, _ in frontier], [w for _, w in expected], rtol=0, atol=1e-12)
    values = [w for _, w, _ in frontier]
    assert all(a > b for a, b in zip(values, values[1:]))
    for cost, value, choice in frontier:
        assert sum(c[k] for c, k in zip(costs, choice)) == cost
        assert abs(sum(w[k] for w, k in zip(omegas, choice)) - value) < 1e-12


def test_ilp_ties_are_respected_and_infeasible_is_reported():
    rng = np.random.default_rng(7)
    W = rng.random((6, 3))
    size = np.tile([2.0, 4.0, 8.0], (6, 1))
    choice, _ = solvers.solve_ilp(W, [(size, 30.0)], ties=[(0, 3), (1, 5)])
    assert choice[0] == choice[3] and choice[1] == choice[5]
    assert sum(size[i, k] for i, k in enumerate(choice)) <= 30
    with pytest.raises(quant.InfeasibleBudgetError):
        solvers.solve_ilp(W, [(size, 11.0)])


def test_ilp_50_layers_4_choices_is_fast():
    rng = np.random.default_rng(3)
    n = rng.integers(1000, 100000, size=50)
    bits = np.array([2, 4, 6, 8])
    size = n[:, None] * bits[None, :] / 8.0
    W = (rng.random(50)[:, None] * n[:, None]) * 4.0 ** (-bits[None, :])
    start = time.perf_counter()
    choice, _ = solvers.solve_ilp(W, [(size, 0.5 * size.sum(axis=0)[[0, 3]].sum())])
    assert time.perf_counter() - start < 5.0  # the bench measures the < 1 s target; this guards regressions
    assert len(choice) == 50


# -- model-level allocation ------------------------------------------------------------------------
def tiny_model():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=g)
    sens = {}
    for (name, m), t in zip([("0", model[0]), ("2", model[2]), ("4", model[4])], (50.0, 2.0, 30.0)):
        sens[name] = LayerSensitivity(name, "Linear", m.weight.numel(), "trace", t, 0.1, None, None,
                                      m.weight.numel(), 10)
    return model, sens


@pytest.mark.parametrize("method", ["ilp", "pareto"])
def test_allocate_bits_meets_budgets_and_equals_brute_force(method):
    model, sens = tiny_model()
    choices = (2, 4, 8)
    costs = quant.layer_costs(model, sens, bit_choices=choices)
    all_plans = [quant.make_plan(model, sens, dict(zip(sens, bits))) for bits in itertools.product(choices, repeat=3)]
    sizes = sorted({p.size_bytes for p in all_plans})
    for budget in sizes[::3] + [sizes[-1]]:
        plan = quant.allocate_bits(model, sens, bit_choices=choices, max_size_bytes=budget, method=method)
        assert plan.size_bytes <= budget
        best = min(p.omega for p in all_plans if p.size_bytes <= budget)
        assert abs(plan.omega - best) < 1e-12
        assert abs(plan.omega - sum(plan.omega_per_layer.values())) < 1e-12
    assert costs[0].size_bits == tuple(48 * b for b in choices)
    # exact budget: the size of a frontier plan is reachable exactly
    mid = quant.pareto_frontier(model, sens, bit_choices=choices)[2]
    plan = quant.allocate_bits(model, sens, bit_choices=choices, max_size_bytes=mid.size_bytes, method=method)
    assert plan.size_bytes == mid.size_bytes and abs(plan.omega - mid.omega) < 1e-12


def test_bops_budget_and_ties_and_fixed_layers():
    model, sens = tiny_model()
    full = quant.make_plan(model, sens, 8)
    plan = quant.allocate_bits(model, sens, max_bops=full.bops * 0.6, tied=[("0", "4")], fixed={"2": 8})
    assert plan.bops <= full.bops * 0.6 and plan.bits["0"] == plan.bits["4"] and plan.bits["2"] == 8
    dp = quant.allocate_bits(model, sens, max_bops=full.bops * 0.6, method="pareto", tied=[("0", "4")], fixed={"2": 8})
    assert abs(dp.omega - plan.omega) < 1e-12
    # BOPs: MACs * weight bits * activation bits
    assert full.bops == sum(s.macs * 64 for s in sens.values())
    latency = {name: {2: 1.0, 4: 2.0, 8: 4.0} for name in sens}
    lat_plan = quant.allocate_bits(model, sens, max_latency=7.0, latency_table=latency)
    assert sum(latency[n][b] for n, b in lat_plan.bits.items()) <= 7.0


def test_budget_below_minimum_states_smallest_size():
    model, sens = tiny_model()
    smallest = quant.make_plan(model, sens, 2).size_bytes
    for method in ("ilp", "pareto"):
        with pytest.raises(ValueError, match=f"smallest achievable size: {smallest:.6g} bytes"):
            quant.allocate_bits(model, sens, max_size_bytes=smallest - 1, method=method)
    plan = quant.allocate_bits(model, sens, max_size_bytes=smallest)
    assert set(plan.bits.values()) == {2}


def test_bad_arguments():
    model, sens = tiny_model()
    for bad in ((0, 4), (4, 33), ()):
        with pytest.raises(ValueError):
            quant.allocate_bits(model, sens, bit_choices=bad, max_size_bytes=1e6)
    with pytest.raises(ValueError, match="budget"):
        quant.allocate_bits(model, sens)
    with pytest.raises(ValueError, match="method"):
        quant.allocate_bits(model, sens, max_size_bytes=1e6, method="greedy")
    with pytest.raises(ValueError, match="no module named 'nope'"):
        quant.allocate_bits(model, {**sens, "nope": sens["0"]}, max_size_bytes=1e6)
    with pytest.raises(ValueError, match="exactly one budget"):
        quant.allocate_bits(model, sens, max_size_bytes=1e6, max_bops=1e9, method="pareto")


def test_sample_plans_respect_size_window():
    model, sens = tiny_model()
    u4 = quant.make_plan(model, sens, 4)
    plans = quant.sample_plans(model, sens, num_plans=20, max_size_bytes=u4.size_bytes,
                               min_size_bytes=0.8 * u4.size_bytes, generator=torch.Generator().manual_seed(0))
    assert len(plans) == 20
    assert all(0.8 * u4.size_bytes <= p.size_bytes <= u4.size_bytes for p in plans)
