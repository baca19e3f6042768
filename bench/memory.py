"""Peak memory of a Hutchinson trace: our Hessian backends against PyHessian, one process per job.

Job: the bench CNN (~25k parameters) on ONE batch of 512 images, ``estimators.trace`` with 20
Rademacher probes (PyHessian: ``hessian(...).trace(maxIter=20, tol=0)``, which also keeps the
single batch's graph). Every job runs in a fresh subprocess, which reports its own peak resident
set size (``ru_maxrss``) and its wall time, so one job's allocations cannot hide another's; the
jobs run ``--repeats`` times round-robin and medians are reported (the allocator adds ~50 MiB of
run-to-run noise). The
``baseline`` job only builds the model and data and runs one gradient (the floor every job pays).

Run: ``python -m bench.memory [--jobs ...] [--batch 512] [--probes 20]``; JSON goes to
bench/results/memory.json. Targets (issues 9 and 21): the default ``auto`` backend's peak within 1.2x of
PyHessian's on every run (``over_pyhessian_runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

JOBS = ("baseline", "pyhessian", "auto", "loop", "vmap", "forward_over_reverse")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_job(job: str, batch: int, probes: int) -> dict:
    """Run one job in THIS process and return its figures (called in the child)."""
    import torch
    from torch import nn

    from bench.models import cnn_data, make_cnn

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = make_cnn()
    x, y = cnn_data(num_samples=batch)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    value = None
    if job == "baseline":
        torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    elif job == "pyhessian":
        from pyhessian import hessian as pyhessian_hessian

        hc = pyhessian_hessian(model, loss_fn, data=(x, y), cuda=False)
        value = float(sum(hc.trace(maxIter=probes, tol=0.0)) / probes)
    else:
        import estimators
        from curvature import Hessian

        backend = "auto" if job == "auto" else job
        with Hessian(model, loss_fn, (x, y), backend=backend) as H:
            estimate = estimators.trace(H, num_matvecs=probes, generator=torch.Generator().manual_seed(0))
            value = float(estimate.value)
            choice = H.backend_choice(probes)
        if choice is not None:
            return {
                "job": job, "peak_rss_gib": _peak_rss_bytes() / 2**30, "seconds": time.perf_counter() - start,
                "trace": value, "backend": choice.backend, "choice": choice.reason,
            }
    return {"job": job, "peak_rss_gib": _peak_rss_bytes() / 2**30, "seconds": time.perf_counter() - start,
            "trace": value}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per job (medians are reported)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_job(args.child, args.batch, args.probes)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    jobs = args.jobs.split(",")
    runs: dict[str, list[dict]] = {job: [] for job in jobs}
    errors: dict[str, list[str]] = {}
    for rep in range(args.repeats):  # round-robin over the jobs: the allocator's noise is spread evenly
        for job in jobs[rep % len(jobs):] + jobs[: rep % len(jobs)]:
            cmd = [sys.executable, "-m", "bench.memory", "--child", job, "--batch", str(args.batch),
                   "--probes", str(args.probes)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                errors[job] = done.stderr.strip().splitlines()[-1:]
            else:
                runs[job].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(runs[job][-1], flush=True)
    rows = []
    for job in jobs:
        if not runs[job]:
            rows.append({"job": job, "error": errors.get(job)})
            continue
        row = dict(runs[job][-1])
        row["peak_rss_gib"] = statistics.median(r["peak_rss_gib"] for r in runs[job])
        row["peak_rss_gib_runs"] = [round(r["peak_rss_gib"], 3) for r in runs[job]]
        row["seconds"] = statistics.median(r["seconds"] for r in runs[job])
        rows.append(row)
    ref = next((r["peak_rss_gib"] for r in rows if r["job"] == "pyhessian" and "peak_rss_gib" in r), None)
    if ref:
        paired = [r["peak_rss_gib"] for r in runs.get("pyhessian", [])]
        for r in rows:
            if "peak_rss_gib" in r:
                r["over_pyhessian"] = r["peak_rss_gib"] / ref
                # the target is per run: each run against PyHessian's run of the same round
                r["over_pyhessian_runs"] = [round(a / b, 3) for a, b in zip(r["peak_rss_gib_runs"], paired)]
    from bench.timing import environment, print_table, write_json

    print_table(rows, ["job", "peak_rss_gib", "over_pyhessian", "over_pyhessian_runs", "peak_rss_gib_runs", "seconds",
                       "backend", "choice"])
    write_json(args.out, {"environment": environment(), "batch": args.batch, "probes": args.probes, "rows": rows})


if __name__ == "__main__":
    main()
