"""Spectral-analyses benchmark: ``batch_size_scaling`` against independent ``eigsh`` calls.

Work: ``λ_max`` of the mini-batch Hessian for 5 batch sizes × 8 batches (40 eigenvalues) of a
64-H-10 ReLU MLP trained on scikit-learn's digits (30 full-batch SGD steps, lr 0.5, momentum 0.9).

* ``scaling``: ``spectra.analysis.batch_size_scaling(smallest=False, adam=False,
  full_data=False)``: one operator per batch, ``eigsh`` with a small basis (10 vectors) warm-
  started from the previous batch's top eigenvector.
* ``independent``: for the SAME 40 batches, a fresh ``curvature.Hessian`` and a cold
  ``spectra.eigsh(k=1)`` (default basis, random start) each.

Both at ``tol=1e-5``. Calls are interleaved (A B A B ...) in one process; medians, ratios, total
products and the largest relative difference between the two sets of eigenvalues are reported.
The full analysis (``λ_min`` and Adam too) is timed once for reference.

Run: ``python -m bench.analysis [--hidden 32,128] [--repeats 3]``; JSON goes to
bench/results/analysis.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

import spectra
from bench.timing import environment, print_table, write_json
from curvature import Hessian
from spectra import analysis

SIZES = (16, 32, 64, 128, 256)
NUM_BATCHES = 8
TOL = 1e-5


def trained_digits_mlp(hidden: int, seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float64), torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[1] ** 0.5)
            else:
                p.zero_()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    return model.eval(), loss_fn, X, y


def run_scaling(model, loss_fn, X, y, seed: int):
    return analysis.batch_size_scaling(
        model, loss_fn, (X, y), batch_sizes=SIZES, num_batches=NUM_BATCHES, smallest=False, adam=False,
        full_data=False, tol=TOL, generator=torch.Generator().manual_seed(seed),
    )


def run_independent(model, loss_fn, X, y, indices, seed: int):
    g = torch.Generator().manual_seed(seed)
    values, products = [], 0
    for idx_B in indices:
        for idx in idx_B:
            res = spectra.eigsh(Hessian(model, loss_fn, (X[idx], y[idx])), k=1, which="LA", tol=TOL, generator=g)
            values.append(float(res.eigenvalues[0]))
            products += res.num_matvecs
    return torch.tensor(values, dtype=torch.float64).reshape(len(indices), -1), products


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="32,128", help="hidden widths of the MLP, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs both contenders)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/analysis.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("spectra").setLevel(logging.ERROR)
    rows = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        model, loss_fn, X, y = trained_digits_mlp(hidden)
        d = sum(p.numel() for p in model.parameters())
        t_scaling, t_indep = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = run_scaling(model, loss_fn, X, y, seed=r)
            t_scaling.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            values, products = run_independent(model, loss_fn, X, y, res.batch_indices, seed=r)
            t_indep.append(time.perf_counter() - t0)
        diff = float(((res.lambda_max - values).abs() / values.abs()).max())
        t0 = time.perf_counter()
        full = analysis.batch_size_scaling(model, loss_fn, (X, y), batch_sizes=SIZES, num_batches=NUM_BATCHES,
                                           tol=TOL, generator=torch.Generator().manual_seed(0))
        t_full = time.perf_counter() - t0
        a, b = statistics.median(t_scaling), statistics.median(t_indep)
        rows.append({
            "model": f"MLP 64-{hidden}-10", "d": d, "scaling_s": a, "independent_s": b, "speedup": b / a,
            "scaling_products": res.num_matvecs, "independent_products": products,
            "max_rel_diff": diff, "all_converged": bool(res.converged.all()),
            "full_analysis_s": t_full, "full_analysis_products": full.num_matvecs,
        })
    print(f"batch_size_scaling ({len(SIZES)} sizes x {NUM_BATCHES} batches, λ_max, tol {TOL:g}) vs "
          f"{len(SIZES) * NUM_BATCHES} independent eigsh; medians of {args.repeats} interleaved rounds, "
          f"{args.threads} thread(s); the machine is shared, so absolute times are noisy")
    print_table(rows, list(rows[0]))
    write_json(args.out, {"environment": environment(), "sizes": SIZES, "num_batches": NUM_BATCHES, "tol": TOL,
                          "rows": rows})


if __name__ == "__main__":
    main()
