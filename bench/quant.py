"""HAWQ benchmark: per-layer sensitivities from shared probes vs one trace run per layer; ILP solve time.

1. HAWQ-V2 sensitivities (``Tr(H_ii)`` of every quantizable layer) of the bench CNN (~25k
   parameters, 5 layers, 256 images of 3x32x32) with 100 Hutchinson probes:

   * ``ours``: ``quant.sensitivity`` — one set of 100 Hessian products over all layer weights,
     each product giving a sample for every layer (``estimators.block_traces``);
   * ``per_layer_restrict``: the PyHessian-style loop, one 100-probe ``estimators.trace`` per
     layer on ``spectra.restrict(Hessian(model), layer)`` (100 full products per layer);
   * ``ours_per_layer``: ``quant.sensitivity(..., probes="per_layer")`` — one 100-probe trace per
     layer on a Hessian of that layer's weight alone (no cross-block variance);
   * ``pyhessian_per_layer``: PyHessian's own ``hessian(...).trace(maxIter=100, tol=-inf)`` once
     per layer, with only that layer's weight requiring grad (its parameter selection), so its
     double backward stops at that layer.

   Each timing covers the whole job from the model and data (operator and graph construction
   included). The contenders alternate within each repeat; medians are reported.
2. ``quant.solvers.solve_ilp`` (HAWQ-V3 ILP, ``scipy.optimize.milp``/HiGHS) for 50 layers x 4 bit choices
   under a size budget, and the exact Pareto DP (over reachable costs) on the same instance, medians.

Run: ``python -m bench.quant [--repeats 3] [--device cpu]``; JSON goes to bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import estimators
import quant
import spectra
from bench.models import cnn_data, make_cnn, num_params
from bench.timing import environment, print_table, round_robin_times, write_json
from curvature import Hessian
from quant.solvers import solve_ilp, solve_knapsack

log = logging.getLogger("bench.quant")

NUM_MATVECS = 100
TARGETS = {"sensitivity_speedup_vs_per_layer": 5.0, "ilp_50x4_seconds": 1.0}


def sensitivity_contenders(model: nn.Module, loss_fn: nn.Module, data, device, values: dict[str, list[dict]],
                           num_matvecs: int) -> dict[str, Callable[[], Any]]:
    layers = quant.quantizable_layers(model)
    weights = [f"{n}.weight" for n in layers]
    seeds = iter(range(10**6))

    def ours():
        gen = torch.Generator(device=device).manual_seed(next(seeds))
        sens = quant.sensitivity(model, loss_fn, data, num_matvecs=num_matvecs, generator=gen)
        values.setdefault("ours", []).append({n: (s.trace, s.trace_stderr) for n, s in sens.items()})

    def per_layer_restrict():
        gen = torch.Generator(device=device).manual_seed(next(seeds))
        out = {}
        with Hessian(model, loss_fn, data) as H:
            for name, w in zip(layers, weights):
                est = estimators.trace(spectra.restrict(H, w), num_matvecs=num_matvecs, generator=gen)
                out[name] = (est.value, est.stderr)
        values.setdefault("per_layer_restrict", []).append(out)

    def ours_per_layer():
        gen = torch.Generator(device=device).manual_seed(next(seeds))
        sens = quant.sensitivity(model, loss_fn, data, num_matvecs=num_matvecs, probes="per_layer", generator=gen)
        values.setdefault("ours_per_layer", []).append({n: (s.trace, s.trace_stderr) for n, s in sens.items()})

    contenders = {"ours": ours, "per_layer_restrict": per_layer_restrict, "ours_per_layer": ours_per_layer}
    try:
        from pyhessian import hessian as pyhessian_hessian

        def pyhessian_per_layer():
            out = {}
            flags = {p: p.requires_grad for p in model.parameters()}
            try:
                for name, module in layers.items():
                    for p in model.parameters():
                        p.requires_grad_(p is module.weight)
                    hc = pyhessian_hessian(model, loss_fn, data=data, cuda=device.type == "cuda")
                    samples = hc.trace(maxIter=num_matvecs, tol=float("-inf"))
                    out[name] = (float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(len(samples))))
                    del hc
                    model.zero_grad(set_to_none=True)  # PyHessian leaves create-graph grads in .grad
            finally:
                for p, flag in flags.items():
                    p.requires_grad_(flag)
            values.setdefault("pyhessian_per_layer", []).append(out)

        contenders["pyhessian_per_layer"] = pyhessian_per_layer
    except ImportError:
        log.warning("pyhessian not installed; pip install -e '.[bench]'")
    return contenders


def run_sensitivity(*, repeats: int, device: torch.device) -> dict[str, Any]:
    model = make_cnn().to(device)
    x, y = cnn_data()
    data = (x.to(device), y.to(device))
    loss_fn = nn.CrossEntropyLoss()
    values: dict[str, list[dict]] = {}
    contenders = sensitivity_contenders(model, loss_fn, data, device, values, NUM_MATVECS)
    # warm-up: a few probes each (autotuning, allocator, lazy imports)
    for fn in sensitivity_contenders(model, loss_fn, data, device, {}, 4).values():
        fn()
    times = round_robin_times(contenders, rounds=repeats, device=device, warmup=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row: dict[str, Any] = {"model": "bench cnn", "d": num_params(model), "layers": len(quant.quantizable_layers(model)),
                           "samples": len(y), "num_matvecs": NUM_MATVECS, "device": str(device)}
    for name, t in med.items():
        row[f"{name}_s"] = t
        if name != "ours":
            row[f"speedup_vs_{name}"] = t / med["ours"]
    row["times"] = times
    # Agreement: every contender estimates the same Tr(H_ii); compare the means over repeats and
    # the typical standard error of one run (shared probes pay for the cross-block terms in variance).
    row["trace_means"] = {who: {n: statistics.mean(v[n][0] for v in vals) for n in vals[0]}
                          for who, vals in values.items()}
    row["trace_stderr_one_run"] = {who: {n: statistics.median(v[n][1] for v in vals) for n in vals[0]}
                                   for who, vals in values.items()}
    return row


def ilp_instance(rng: np.random.Generator, layers: int, bits: np.ndarray):
    n = rng.integers(1_000, 500_000, size=layers)
    size = n[:, None] * bits[None, :] / 8.0
    score = rng.lognormal(0.0, 2.0, size=layers)
    omega = score[:, None] * n[:, None] * 4.0 ** (-bits[None, :].astype(float))
    alpha = rng.uniform(0.25, 0.75)
    limit = size[:, 0].sum() + alpha * (size[:, -1].sum() - size[:, 0].sum())
    return omega, size, limit


def run_ilp(*, instances: int) -> dict[str, Any]:
    bits = np.array([2, 4, 6, 8])
    rng = np.random.default_rng(0)
    times, dp_times, gaps = [], [], []
    for _ in range(instances):
        omega, size, limit = ilp_instance(rng, 50, bits)
        start = time.perf_counter()
        choice, value = solve_ilp(omega, [(size, limit)])
        times.append(time.perf_counter() - start)
        assert sum(size[i, k] for i, k in enumerate(choice)) <= limit + 1e-6
        # the exact Pareto DP over reachable costs on the same instance (no coarsening)
        start = time.perf_counter()
        _, dp_value = solve_knapsack(list(size), list(omega), limit)
        dp_times.append(time.perf_counter() - start)
        gaps.append((dp_value - value) / max(abs(value), 1e-300))
    return {"layers": 50, "choices": len(bits), "instances": instances,
            "ilp_median_s": statistics.median(times), "ilp_max_s": max(times),
            "dp_median_s": statistics.median(dp_times), "max_relative_gap_dp_vs_ilp": max(gaps)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--instances", type=int, default=10, help="ILP instances")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: sensitivity,ilp")
    parser.add_argument("--out", default="bench/results/quant.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    payload: dict[str, Any] = {"environment": environment(), "targets": TARGETS, "repeats": args.repeats}
    met: dict[str, bool] = {}
    if "sensitivity" not in skip:
        row = run_sensitivity(repeats=args.repeats, device=device)
        payload["sensitivity"] = row
        write_json(args.out, payload)
        peers = [k[len("speedup_vs_"):] for k in row if k.startswith("speedup_vs_")]
        print(f"\nHAWQ-V2 sensitivities of all {row['layers']} layers, {NUM_MATVECS} probes, bench CNN "
              f"(d={row['d']}, {row['samples']} images), {device}, medians of {args.repeats}")
        columns = ["model", "layers", "ours_s", *[f"{p}_s" for p in peers], *[f"speedup_vs_{p}" for p in peers]]
        print_table([row], columns)
        print("Tr(H_ii) per layer: mean over repeats ± median standard error of one run")
        for who, tr in row["trace_means"].items():
            se = row["trace_stderr_one_run"][who]
            print(f"  {who:22s} " + "  ".join(f"{n}: {v:.4g}±{se[n]:.2g}" for n, v in tr.items()))
        met["sensitivity_speedup_vs_per_layer"] = all(
            row[f"speedup_vs_{p}"] >= 5.0 for p in ("per_layer_restrict", "pyhessian_per_layer") if p in peers)
    if "ilp" not in skip:
        res = run_ilp(instances=args.instances)
        payload["ilp"] = res
        print(f"\nILP 50 layers x 4 choices: median {res['ilp_median_s'] * 1e3:.1f} ms, "
              f"max {res['ilp_max_s'] * 1e3:.1f} ms over {res['instances']} instances; "
              f"coarsened DP median {res['dp_median_s'] * 1e3:.1f} ms; "
              f"coarsened DP objective at most {res['max_relative_gap_dp_vs_ilp']:.1e} (relative) above the ILP's")
        met["ilp_50x4_seconds"] = res["ilp_max_s"] < 1.0
    payload["targets_met"] = met
    write_json(args.out, payload)
    print(f"\ntargets met: {met}")


if __name__ == "__main__":
    main()
