"""Estimator benchmark: Hutchinson trace against PyHessian and curvlinops, block traces, time-to-accuracy.

1. Hutchinson trace of the Hessian with 100 Rademacher probes on the bench MLP (~407k parameters,
   512 samples) and CNN (~25k parameters, 256 images), each with the data as one batch and as 4
   batches, against PyHessian's ``hessian(...).trace(maxIter=100, tol=-inf)`` (``data=`` for one
   batch, ``dataloader=`` for 4) and curvlinops' ``hutchinson_trace(HessianLinearOperator(...), 100)``.
   Each timing covers the whole job from the model and data (operator construction included), so
   the graph each library builds is paid for; the contenders alternate within each repeat.
2. ``block_traces`` over every parameter block against one ``trace`` with the same 100 matvecs.
3. Time-to-accuracy: the matvecs Hutchinson, Hutch++ and XTrace need for a root-mean-square
   relative error of 2% (over seeds) on the Hessian of a small MLP (~2k parameters) at
   initialisation and after training, whose exact trace comes from ``diagonal(method="exact")``.

Run: ``python -m bench.estimators [--repeats 3] [--device cpu]``; JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
from typing import Any, Callable

import torch
from torch import nn

import estimators
from bench.models import CASES, num_params, split_batches
from bench.timing import environment, print_table, round_robin, write_json
from curvature import DenseOperator, Hessian

log = logging.getLogger("bench.estimators")

NUM_MATVECS = 100
TARGETS = {
    "one_batch_vs_pyhessian": 1.2,  # ours / PyHessian time, at most
    "four_batches_speedup_vs_pyhessian": 1.1,  # PyHessian / ours, at least
    "vs_curvlinops": 1.0,  # ours / curvlinops, below
    "block_traces_over_trace": 1.2,  # at most
}


def trace_contenders(model: nn.Module, loss_fn: nn.Module, data, batches, device, values: dict[str, list[float]],
                     backends: list[str]):
    single = len(batches) == 1
    params = list(model.parameters())
    op_data = data if single else batches
    seed = iter(range(10**6))
    out: dict[str, Callable[[], Any]] = {}

    for backend in backends:
        key = "ours" if backend == "auto" else f"ours[{backend}]"

        def ours(backend=backend, key=key):
            with Hessian(model, loss_fn, op_data, backend=backend) as H:
                gen = torch.Generator(device=device).manual_seed(next(seed))
                est = estimators.trace(H, num_matvecs=NUM_MATVECS, generator=gen)
            values.setdefault(key, []).append(est.value)

        out[key] = ours
    try:
        from pyhessian import hessian as pyhessian_hessian

        def pyhessian():
            if single:
                hc = pyhessian_hessian(model, loss_fn, data=data, cuda=device.type == "cuda")
            else:
                hc = pyhessian_hessian(model, loss_fn, dataloader=batches, cuda=device.type == "cuda")
            samples = hc.trace(maxIter=NUM_MATVECS, tol=float("-inf"))
            # PyHessian leaves create-graph gradients in .grad; drop them between runs.
            model.zero_grad(set_to_none=True)
            values.setdefault("pyhessian", []).append(sum(samples) / len(samples))

        out["pyhessian"] = pyhessian
    except ImportError:
        log.warning("pyhessian not installed; pip install -e '.[bench]'")
    try:
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.hutchinson import hutchinson_trace

        def curvlinops():
            op = HessianLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
            values.setdefault("curvlinops", []).append(float(hutchinson_trace(op, NUM_MATVECS)))

        out["curvlinops"] = curvlinops
    except ImportError:
        log.warning("curvlinops not installed; pip install -e '.[bench]'")
    return out


def run_trace_case(name: str, num_batches: int, *, repeats: int, device: torch.device,
                   backends: list[str]) -> dict[str, Any]:
    make_model, make_data = CASES[name]
    model = make_model().to(device)
    x, y = make_data()
    data = (x.to(device), y.to(device))
    batches = [data] if num_batches == 1 else split_batches(data, num_batches)
    loss_fn = nn.CrossEntropyLoss()
    values: dict[str, list[float]] = {}
    contenders = trace_contenders(model, loss_fn, data, batches, device, values, backends)
    t = round_robin(contenders, rounds=repeats, device=device)
    row: dict[str, Any] = {"model": name, "batches": num_batches, "d": num_params(model), "ours_s": t["ours"]}
    for key in t:
        if key.startswith("ours["):
            row[f"{key}_s"] = t[key]
    for peer in ("pyhessian", "curvlinops"):
        if peer in t:
            row[f"{peer}_s"] = t[peer]
            row[f"ours/{peer}"] = t["ours"] / t[peer]
    for who, vals in values.items():
        row[f"trace_{who}"] = statistics.mean(vals)
    return row


def run_block_traces(*, repeats: int, device: torch.device) -> dict[str, Any]:
    make_model, make_data = CASES["mlp"]
    model = make_model().to(device)
    x, y = make_data()
    data = (x.to(device), y.to(device))
    loss_fn = nn.CrossEntropyLoss()

    def one(fn):
        def go():
            with Hessian(model, loss_fn, data) as H:
                return fn(H, num_matvecs=NUM_MATVECS, generator=torch.Generator(device=device).manual_seed(0))
        return go

    t = round_robin({"trace": one(estimators.trace), "block_traces": one(estimators.block_traces)},
                            rounds=repeats, device=device)
    with Hessian(model, loss_fn, data) as H:
        nblocks = len(H.blocks)
    return {"model": "mlp", "blocks": nblocks, "trace_s": t["trace"], "block_traces_s": t["block_traces"],
            "ratio": t["block_traces"] / t["trace"]}


def small_mlp(device: torch.device, *, train_steps: int):
    """A ~2k-parameter tanh MLP on 256 synthetic samples, optionally trained with Adam (float64)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10)).double().to(device)
    x = torch.randn(256, 20, dtype=torch.float64, generator=g).to(device)
    y = (x[:, :10].argmax(1) + (x[:, 10] > 1).long()) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(train_steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.eval(), loss_fn, (x, y)


def budget_grid(limit: int) -> list[int]:
    grid, b = [], 6.0
    while b <= limit:
        grid.append(6 * max(1, round(b / 6)))
        b *= math.sqrt(2)
    return sorted(set(grid))


def run_time_to_accuracy(*, seeds: int, device: torch.device, train_steps: int, target: float = 0.02):
    model, loss_fn, data = small_mlp(device, train_steps=train_steps)
    with Hessian(model, loss_fn, data) as H:
        exact = float(estimators.diagonal(H, method="exact").value.sum())
        # The estimators only see products; the dense matrix gives the same products faster for the sweep.
        dense = DenseOperator(H.to_dense())
    d = dense.shape[0]
    out: dict[str, Any] = {"train_steps": train_steps, "d": d, "exact_trace": exact,
                           "exact_vs_dense_trace": exact - float(dense.matrix.trace()),
                           "target_rel_error": target, "needed_matvecs": {}, "curves": {}}
    for method in ("hutchinson", "hutch++", "xtrace"):
        needed = None
        curve = []
        for budget in budget_grid(d):
            errs = [
                (estimators.trace(dense, num_matvecs=budget, method=method,
                                  generator=torch.Generator(device=device).manual_seed(s)).value - exact) / exact
                for s in range(seeds)
            ]
            rms = math.sqrt(sum(e * e for e in errs) / len(errs))
            curve.append((budget, rms))
            if rms <= target:
                needed = budget
                break
        out["needed_matvecs"][method] = needed
        out["curves"][method] = curve
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--seeds", type=int, default=12, help="seeds per budget in the time-to-accuracy sweep")
    parser.add_argument("--backends", default="auto",
                        help="comma list of Hessian backends to time for ours ('auto' is the headline row)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: trace,blocks,accuracy")
    parser.add_argument("--out", default="bench/results/estimators.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    backends = list(dict.fromkeys(["auto", *filter(None, args.backends.split(","))]))
    payload: dict[str, Any] = {}
    if skip and os.path.exists(args.out):
        # Parts skipped this time keep their previous results.
        with open(args.out) as f:
            previous = json.load(f)
        sections = {"trace": ["trace", "targets_met"], "blocks": ["block_traces"], "accuracy": ["time_to_accuracy"]}
        payload.update({k: previous[k] for part in skip for k in sections.get(part, []) if k in previous})
    payload.update({"environment": environment(), "num_matvecs": NUM_MATVECS, "repeats": args.repeats,
                    "targets": TARGETS})

    def save():
        write_json(args.out, payload)

    if "trace" not in skip:
        rows = payload["trace"] = []
        for name in args.models.split(","):
            for nb in (1, 4):
                log.info("trace: %s, %d batch(es) ...", name, nb)
                rows.append(run_trace_case(name, nb, repeats=args.repeats, device=device, backends=backends))
                save()  # keep what finished if interrupted
        print("\nHutchinson trace, 100 matvecs (seconds; ratios < 1 mean ours is faster)")
        extra = [f"ours[{b}]_s" for b in backends if b != "auto"]
        print_table(rows, ["model", "batches", "d", "ours_s", *extra, "pyhessian_s", "curvlinops_s", "ours/pyhessian",
                           "ours/curvlinops", "trace_ours", "trace_pyhessian", "trace_curvlinops"])
        payload["targets_met"] = {**payload.get("targets_met", {}), **targets_met(rows)}
    if "blocks" not in skip:
        log.info("block_traces vs trace ...")
        payload["block_traces"] = run_block_traces(repeats=args.repeats, device=device)
        save()
        print("\nblock_traces (all parameter blocks) vs one trace, same 100 matvecs")
        print_table([payload["block_traces"]], ["model", "blocks", "trace_s", "block_traces_s", "ratio"])
        payload.setdefault("targets_met", {})["block_traces_over_trace"] = (
            payload["block_traces"]["ratio"] <= TARGETS["block_traces_over_trace"])
    if "accuracy" not in skip:
        accs = payload["time_to_accuracy"] = []
        for steps in (0, 300):
            log.info("time-to-accuracy (%d training steps) ...", steps)
            accs.append(run_time_to_accuracy(seeds=args.seeds, device=device, train_steps=steps))
            save()
        print(f"\nMatvecs to reach 2% RMS relative error over {args.seeds} seeds "
              f"(small MLP 20-64-10, d={accs[0]['d']}; budgets on a sqrt(2) grid)")
        rows = [{"model": "init" if a["train_steps"] == 0 else f"trained {a['train_steps']} steps",
                 "exact_trace": a["exact_trace"],
                 **{m: (n if n is not None else f"> {a['d']}") for m, n in a["needed_matvecs"].items()}}
                for a in accs]
        print_table(rows, ["model", "exact_trace", "hutchinson", "hutch++", "xtrace"])
    if "targets_met" in payload:
        print("\nTargets met:", payload["targets_met"])
    save()
    print(f"\nwrote {args.out}")


def targets_met(rows: list[dict[str, Any]]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    for r in rows:
        key = f"{r['model']}_{r['batches']}b"
        if "ours/pyhessian" in r:
            if r["batches"] == 1:
                met[f"{key}_within_1.2x_pyhessian"] = r["ours/pyhessian"] <= TARGETS["one_batch_vs_pyhessian"]
            else:
                met[f"{key}_1.1x_faster_than_pyhessian"] = (
                    1 / r["ours/pyhessian"] >= TARGETS["four_batches_speedup_vs_pyhessian"])
        if "ours/curvlinops" in r:
            met[f"{key}_faster_than_curvlinops"] = r["ours/curvlinops"] < TARGETS["vs_curvlinops"]
    return met


if __name__ == "__main__":
    main()
