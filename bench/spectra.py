"""Spectra benchmark: SLQ densities and top eigenvalues against PyHessian and curvlinops.

Same model, data and process for every contender (models from bench/models.py):

1. density: ``spectra.slq(num_probes=1, num_steps=100)`` against PyHessian's
   ``hessian(...).density(iter=100, n_v=1)`` and curvlinops' ``lanczos_approximate_spectrum``
   (``ncv=100``; it also spends ARPACK products on the spectral boundaries), on one batch and on
   4 batches. Times include building the operator (PyHessian's constructor runs the first
   backward). Ours on 4 batches is run twice: with the operator's default (the first-order
   graphs of a small data set are kept, as PyHessian does for one batch) and with
   ``cache_graph=False`` (graphs rebuilt per product, as both peers do for several batches).
2. top-3 eigenvalues on one batch: ``spectra.eigsh(k=3, which="LM")`` (default ``tol=1e-6``,
   and ``1e-3``, a residual tolerance that already gives ~1e-6 eigenvalue accuracy) and
   ``spectra.power_iteration`` against PyHessian's ``eigenvalues(top_n=3)``
   (power iteration with deflation, ``maxIter=100, tol=1e-3``; power iteration finds the
   largest-MAGNITUDE eigenvalues, hence ``which="LM"``): wall time, products and relative error
   against a tight reference (``eigsh(k=3, which="LM", tol=1e-10)``).
3. lockstep probes: ``slq(num_probes=8)`` with all 8 probes in one block (one ``H @ V`` per
   step) against 8 sequential single-probe runs, over 4 batches, with the graphs rebuilt per
   product (``cache_graph=False``, data too big to keep) and with the operator's default.

PyHessian 0.1 calls ``torch.eig``, which current PyTorch removed; an ``eigh``-based stand-in
with the old return format is patched in for the duration of its calls (its tridiagonal matrix
is symmetric, so this is also what it should have used).

Run: ``python -m bench.spectra [--models mlp,cnn] [--repeats 1] [--steps 100]``; JSON goes to
bench/results/spectra.json.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from typing import Any, Callable

import torch
from torch import nn

import spectra
from bench.models import CASES, num_params, split_batches
from bench.timing import environment, print_table, round_robin_times, sync, write_json
from curvature import Hessian

log = logging.getLogger("bench.spectra")


# ---------------------------------------------------------------------------------------- peers
@contextlib.contextmanager
def torch_eig_standin():
    """Give PyHessian the removed ``torch.eig(A, eigenvectors=True) -> ((n, 2) values, vectors)``."""

    def eig(A, eigenvectors=False):
        values, vectors = torch.linalg.eigh(A)
        stacked = torch.stack([values, torch.zeros_like(values)], dim=1)
        return stacked, (vectors if eigenvectors else torch.empty(0, dtype=A.dtype))

    saved = getattr(torch, "eig", None)
    torch.eig = eig
    try:
        yield
    finally:
        if saved is None:
            del torch.eig
        else:
            torch.eig = saved


class Counter:
    def __init__(self):
        self.n = 0


@contextlib.contextmanager
def count_pyhessian_products(counter: Counter):
    """Count PyHessian's Hessian-vector products (single-batch and data-loader paths)."""
    import importlib

    # pyhessian/__init__ rebinds the name ``pyhessian.hessian`` to the class; get the module.
    ph = importlib.import_module("pyhessian.hessian")

    single, loader = ph.hessian_vector_product, ph.hessian.dataloader_hv_product

    def single_counted(gradsH, params, v):
        counter.n += 1
        return single(gradsH, params, v)

    def loader_counted(self, v):
        counter.n += 1
        return loader(self, v)

    ph.hessian_vector_product, ph.hessian.dataloader_hv_product = single_counted, loader_counted
    try:
        yield
    finally:
        ph.hessian_vector_product, ph.hessian.dataloader_hv_product = single, loader


def pyhessian_object(model, loss_fn, batches):
    from pyhessian import hessian

    cuda = next(model.parameters()).is_cuda
    if len(batches) == 1:
        return hessian(model, loss_fn, data=batches[0], cuda=cuda)
    return hessian(model, loss_fn, dataloader=batches, cuda=cuda)


def clear_grads(model: nn.Module) -> None:
    # PyHessian leaves create-graph gradients in .grad; drop them so they hold no memory.
    for p in model.parameters():
        p.grad = None


def counted_curvlinops(model, loss_fn, batches, counter: Counter):
    from curvlinops import HessianLinearOperator

    op = HessianLinearOperator(model, loss_fn, list(model.parameters()), batches, check_deterministic=False)
    matmat = op._matmat

    def counted(M):
        counter.n += M[0].shape[-1]
        return matmat(M)

    op._matmat = counted
    return op


# ---------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], *, repeats: int, device) -> tuple[float, Any]:
    """Best wall time over ``repeats`` runs (the machine is shared; the minimum is the least noisy)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def rel_err(values, ref) -> float:
    """Worst relative error of the reference eigenvalues, each matched to the nearest value found."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    ref = torch.as_tensor(ref, dtype=torch.float64).flatten()
    return float(max(float((values - r).abs().min() / r.abs()) for r in ref))


def table(rows, columns):
    if rows:
        print_table(rows, columns)


# ---------------------------------------------------------------------------------------- sections
def bench_density(name, model, loss_fn, batches, *, steps, repeats, device):
    rows = []
    nb = len(batches)
    data = batches[0] if nb == 1 else batches

    def ours(cache_graph=None):
        H = Hessian(model, loss_fn, data, cache_graph=cache_graph)
        try:
            return spectra.slq(H, num_probes=1, num_steps=steps, generator=torch.Generator().manual_seed(0))
        finally:
            H.release()

    t_ours, dens = timed(ours, repeats=repeats, device=device)
    rows.append({"case": f"{name}/{nb}b", "method": "spectra.slq", "seconds": t_ours, "matvecs": dens.num_matvecs})
    if nb > 1:
        t_fresh, dens_f = timed(lambda: ours(False), repeats=repeats, device=device)
        rows.append({"case": f"{name}/{nb}b", "method": "spectra.slq cache_graph=False", "seconds": t_fresh,
                     "matvecs": dens_f.num_matvecs})
    try:
        import pyhessian  # noqa: F401

        counter = Counter()

        def theirs():
            counter.n = 0
            with torch_eig_standin(), count_pyhessian_products(counter):
                out = pyhessian_object(model, loss_fn, batches).density(iter=steps, n_v=1)
            clear_grads(model)
            return out

        t_ph, _ = timed(theirs, repeats=repeats, device=device)
        rows.append({"case": f"{name}/{nb}b", "method": "pyhessian.density", "seconds": t_ph, "matvecs": counter.n})
    except ImportError:
        log.warning("pyhessian not installed; pip install -e '.[bench]'")
    try:
        from curvlinops import lanczos_approximate_spectrum

        counter = Counter()

        def curvlinops_density():
            counter.n = 0
            op = counted_curvlinops(model, loss_fn, batches, counter)
            return lanczos_approximate_spectrum(op, steps, num_repeats=1)

        t_cl, _ = timed(curvlinops_density, repeats=repeats, device=device)
        rows.append({"case": f"{name}/{nb}b", "method": "curvlinops.lanczos_approximate_spectrum",
                     "seconds": t_cl, "matvecs": counter.n})
    except ImportError:
        log.warning("curvlinops not installed; pip install -e '.[bench]'")
    base = next((r["seconds"] for r in rows if r["method"] == "pyhessian.density"), None)
    for r in rows:
        r["vs_pyhessian"] = r["seconds"] / base if base else None
    return rows


def bench_slq_round_robin(name, model, loss_fn, data, *, steps, rounds, device):
    """``spectra.slq`` (1 probe) against PyHessian's ``density(iter=steps, n_v=1)`` on one batch,
    alternated A B A B ... for ``rounds`` rounds; medians and the median of per-round ratios.

    Both build their operator inside the timed call (PyHessian's constructor runs the first
    backward; ours caches the graph on the first product), so each pays its graph once.
    """
    import statistics

    def ours():
        H = Hessian(model, loss_fn, data)
        try:
            return spectra.slq(H, num_probes=1, num_steps=steps, generator=torch.Generator().manual_seed(0))
        finally:
            H.release()

    def theirs():
        with torch_eig_standin():
            out = pyhessian_object(model, loss_fn, [data]).density(iter=steps, n_v=1)
        clear_grads(model)
        return out

    times = round_robin_times({"ours": ours, "pyhessian": theirs}, rounds=rounds, device=device)
    t_ours, t_theirs = times["ours"], times["pyhessian"]
    ratios = [a / b for a, b in zip(t_ours, t_theirs)]
    return {"case": f"{name}/1b", "steps": steps, "rounds": rounds, "ours_s": statistics.median(t_ours),
            "pyhessian_s": statistics.median(t_theirs), "ratio": statistics.median(ratios)}


def bench_eigs(name, model, loss_fn, batches, *, repeats, device):
    data = batches[0]
    rows = []
    H = Hessian(model, loss_fn, data)
    try:
        ref = spectra.eigsh(H, k=3, which="LM", tol=1e-10, max_iter=3000,
                            generator=torch.Generator().manual_seed(1))
        ref_vals = ref.eigenvalues
        for tol in (1e-6, 1e-3):

            def ours(tol=tol):
                return spectra.eigsh(H, k=3, which="LM", tol=tol, generator=torch.Generator().manual_seed(0))

            t, res = timed(ours, repeats=repeats, device=device)
            rows.append({"case": f"{name}/1b", "method": f"spectra.eigsh LM tol={tol:g}", "seconds": t,
                         "matvecs": res.num_matvecs, "rel_err": rel_err(res.eigenvalues, ref_vals)})
        t, res = timed(lambda: spectra.power_iteration(H, k=3, generator=torch.Generator().manual_seed(0)),
                       repeats=repeats, device=device)
        rows.append({"case": f"{name}/1b", "method": "spectra.power_iteration", "seconds": t,
                     "matvecs": res.num_matvecs, "rel_err": rel_err(res.eigenvalues, ref_vals)})
    finally:
        H.release()
    try:
        import pyhessian  # noqa: F401

        counter = Counter()

        def theirs():
            counter.n = 0
            with count_pyhessian_products(counter):
                values, _ = pyhessian_object(model, loss_fn, [data]).eigenvalues(top_n=3)
            clear_grads(model)
            return values

        t, values = timed(theirs, repeats=repeats, device=device)
        rows.append({"case": f"{name}/1b", "method": "pyhessian.eigenvalues", "seconds": t, "matvecs": counter.n,
                     "rel_err": rel_err(values, ref_vals)})
    except ImportError:
        log.warning("pyhessian not installed; pip install -e '.[bench]'")
    base = next((r for r in rows if r["method"] == "pyhessian.eigenvalues"), None)
    for r in rows:
        r["vs_pyhessian"] = r["seconds"] / base["seconds"] if base else None
    return rows, [float(v) for v in ref_vals]


def bench_lockstep(name, model, loss_fn, batches, *, steps, repeats, device):
    """8 probes in one lockstep block against 8 single-probe blocks, with and without graph caching.

    ``cache_graph=False`` is the regime of data that does not fit in memory: every product redoes
    the forward and first backward of each batch, which a lockstep block shares among its
    columns. With the operator's default (graphs of a small data set cached) only the second
    backward is paid per column either way.
    """
    rows = []
    for cache_graph in (False, None):
        H = Hessian(model, loss_fn, batches, cache_graph=cache_graph)
        results = {}
        for block in (8, 1):
            t, dens = timed(
                lambda block=block, H=H: spectra.slq(H, num_probes=8, num_steps=steps, probe_batch_size=block,
                                                generator=torch.Generator().manual_seed(0)),
                repeats=repeats, device=device,
            )
            results[block] = (t, dens)
        H.release()
        (t8, d8), (t1, d1) = results[8], results[1]
        rows.append({
            "case": f"{name}/{len(batches)}b", "cache_graph": str(cache_graph), "lockstep_s": t8,
            "sequential_s": t1, "speedup": t1 / t8, "matvecs": d8.num_matvecs,
            "max_node_diff": float((d8.nodes - d1.nodes).abs().max()),
        })
    return rows


LOCKSTEP_COLUMNS = ["case", "cache_graph", "lockstep_s", "sequential_s", "speedup", "matvecs", "max_node_diff"]


SLQ_RR_COLUMNS = ["case", "steps", "rounds", "ours_s", "pyhessian_s", "ratio"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="Lanczos steps for the density section")
    parser.add_argument("--lockstep-steps", type=int, default=30)
    parser.add_argument("--lockstep-models", default="mlp", help="models for the lockstep section")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default="density,eigs,lockstep,slq_rr",
                        help="comma list: density, eigs, lockstep, slq_rr (round-robin SLQ vs PyHessian)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the round-robin section")
    parser.add_argument("--samples", type=int, default=None, help="use only this many samples per model")
    parser.add_argument("--out", default="bench/results/spectra.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    loss_fn = nn.CrossEntropyLoss()
    payload: dict[str, Any] = {"environment": environment(), "args": vars(args), "density": [], "eigs": [],
                               "lockstep": [], "slq_rr": [], "reference_eigenvalues": {}}
    for name in args.models.split(","):
        make_model, make_data = CASES[name]
        model = make_model().to(device)
        x, y = make_data()
        if args.samples:
            x, y = x[: args.samples], y[: args.samples]
        data = (x.to(device), y.to(device))
        four = [(a.to(device), b.to(device)) for a, b in split_batches(data, 4)]
        log.warning("%s: d = %d", name, num_params(model))
        if "density" in sections:
            for batches in ([data], four):
                payload["density"] += bench_density(name, model, loss_fn, batches, steps=args.steps,
                                                    repeats=args.repeats, device=device)
                table(payload["density"][-4:], ["case", "method", "seconds", "matvecs", "vs_pyhessian"])
                print()
        if "eigs" in sections:
            rows, ref = bench_eigs(name, model, loss_fn, [data], repeats=args.repeats, device=device)
            payload["eigs"] += rows
            payload["reference_eigenvalues"][name] = ref
            table(rows, ["case", "method", "seconds", "matvecs", "rel_err", "vs_pyhessian"])
            print()
        if "slq_rr" in sections:
            row = bench_slq_round_robin(name, model, loss_fn, data, steps=args.steps, rounds=args.rounds,
                                        device=device)
            payload["slq_rr"].append(row)
            table([row], SLQ_RR_COLUMNS)
            print()
        if "lockstep" in sections and name in args.lockstep_models.split(","):
            rows = bench_lockstep(name, model, loss_fn, four, steps=args.lockstep_steps, repeats=args.repeats,
                                  device=device)
            payload["lockstep"] += rows
            table(rows, LOCKSTEP_COLUMNS)
            print()
    print("== density ==")
    table(payload["density"], ["case", "method", "seconds", "matvecs", "vs_pyhessian"])
    print("\n== top-3 eigenvalues ==")
    table(payload["eigs"], ["case", "method", "seconds", "matvecs", "rel_err", "vs_pyhessian"])
    print("\n== SLQ vs PyHessian, round-robin ==")
    table(payload["slq_rr"], SLQ_RR_COLUMNS)
    print("\n== lockstep probes ==")
    table(payload["lockstep"], LOCKSTEP_COLUMNS)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
