"""Pruner benchmark: quant.prune's cost against its O(dm) bound.

One M-FAC OBS step on ``d`` weights with ``m`` gradients does: the inverse (``MFACInverse``,
``O(dm²)`` as two GEMMs), the diagonal (``O(dm)``), a sort of ``d`` saliencies, and one
product ``F⁻¹u`` (``O(dm)``). For each ``(d, m)`` (float32, gradients passed in, so collection is
excluded) this prints:

* ``prune_s``: one-shot ``quant.prune(..., gradients=G)``;
* ``pre_s``: building ``MFACInverse`` alone, and ``floor_s``: one ``G @ x`` plus one ``Gᵀ @ a`` (the
  ``O(dm)`` floor of a product);
* ``prune/(pre+3·floor)``: the pruner against inverse + diagonal + correction product + copies
  (target <= 2: no hidden ``O(d²)`` or extra passes);
* with ``--blocked``, the same with ``block_size=128``.

A second table times whole prunes of the 407k-parameter MLP (``bench.models.make_mlp``) with
``r`` recomputations and ``m`` gradients collected from data: ``total_s`` against
``r · (collect_s + prune_s)``, the gradients collected once per recomputation.

``--memory`` instead measures, each in a fresh subprocess, the peak resident memory of one prune
of the MLP with ``m`` collected gradients against the baseline (model and data only) and against
the ``m·d`` float32 gradient matrix, the one ``O(dm)`` buffer the pruner needs (target: extra peak
<= 2 ``m·d``; the copy of the unpruned columns at a recomputation is the second).

Run: ``python -m bench.pruning [--device cuda] [--dims 1e5,1e6] [--grads 32,128] [--blocked]``;
``--dry-run`` for tiny sizes (a check that it runs). Results go to bench/results/pruning.json.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import quant
from bench.models import make_mlp, mlp_data
from bench.timing import environment, median_time, print_table, sync, write_json
from curvature import MFACInverse, collect_gradients

DAMPING = 1e-4


def _layer_model(d: int, device: torch.device) -> nn.Module:
    width = 1000 if d >= 1000 else d
    return nn.Sequential(nn.Linear(width, d // width, bias=False)).to(device)


def one_step_rows(dims: list[int], grads: list[int], device: torch.device, blocked: bool, repeats: int) -> list[dict]:
    rows = []
    for d in dims:
        model = _layer_model(d, device)
        d = model[0].weight.numel()
        for m in grads:
            gen = torch.Generator(device=device).manual_seed(0)
            G = torch.randn(m, d, generator=gen, device=device)
            G.add_(torch.randn(1, d, generator=gen, device=device), alpha=0.5)
            x = torch.randn(d, device=device)
            for block in ([None, 128] if blocked else [None]):
                def run_prune(block=block, model=model, G=G):
                    quant.prune(copy.deepcopy(model), gradients=G, sparsity=0.5, damping=DAMPING, block_size=block)

                prune_s = median_time(run_prune, repeats=repeats, device=device)
                pre_s = median_time(lambda block=block, G=G: MFACInverse(G, damping=DAMPING, block_size=block),
                                    repeats=repeats, device=device)
                floor_s = median_time(lambda G=G, x=x: G.T @ (G @ x), repeats=repeats, device=device)
                rows.append({"d": d, "m": m, "block": block or "full", "prune_s": prune_s, "pre_s": pre_s,
                             "floor_s": floor_s, "prune/(pre+3·floor)": prune_s / (pre_s + 3 * floor_s)})
                print_table(rows[-1:], list(rows[-1]))
    return rows


def recomputation_rows(grads: list[int], recomps: list[int], device: torch.device, repeats: int) -> list[dict]:
    model = make_mlp().to(device)
    x, y = mlp_data(num_samples=32 * max(grads))
    data = list(zip(x.to(device).split(32), y.to(device).split(32)))
    loss_fn = nn.CrossEntropyLoss()
    weights = list(quant.prunable_weights(model).values())
    rows = []
    for m in grads:
        collect_s = median_time(lambda m=m: collect_gradients(model, loss_fn, data, num_grads=m, params=weights),
                                repeats=repeats, device=device)
        G = collect_gradients(model, loss_fn, data, num_grads=m, params=weights)
        prune_s = median_time(lambda G=G: quant.prune(copy.deepcopy(model), gradients=G, sparsity=0.5, damping=DAMPING,
                                                  block_size=128), repeats=repeats, device=device)
        for r in recomps:
            total_s = median_time(lambda r=r, m=m: quant.prune(copy.deepcopy(model), loss_fn, data, sparsity=0.9,
                                                               num_gradients=m, damping=DAMPING, block_size=128,
                                                               recomputations=r),
                                  repeats=max(1, repeats // 2), device=device)
            rows.append({"model": "mlp 407k", "m": m, "r": r, "collect_s": collect_s, "step_s": prune_s,
                         "total_s": total_s, "total/(r·(collect+step))": total_s / (r * (collect_s + prune_s))})
            print_table(rows[-1:], list(rows[-1]))
    return rows


def memory_job(job: str, m: int, recomputations: int) -> dict:
    """Peak RSS of one job in THIS process (called in the child)."""
    import resource

    torch.set_num_threads(1)
    model = make_mlp()
    x, y = mlp_data(num_samples=32 * m)
    data = list(zip(x.split(32), y.split(32)))
    d = sum(w.numel() for w in quant.prunable_weights(model).values())
    if job == "prune":
        quant.prune(model, nn.CrossEntropyLoss(), data, sparsity=0.9, num_gradients=m, damping=DAMPING,
                    block_size=128, recomputations=recomputations)
    return {"job": job, "m": m, "d": d, "r": recomputations,
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def memory_rows(grads: list[int], recomps: list[int]) -> list[dict]:
    import json
    import subprocess
    import sys

    rows = []
    for m in grads:
        for r in recomps:
            out = {}
            for job in ("baseline", "prune"):
                call = f"memory_job({job!r}, {m}, {r})"
                code = f"import json; from bench.pruning import memory_job; print(json.dumps({call}))"
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                out[job] = json.loads(res.stdout.strip().splitlines()[-1])
            md = out["prune"]["m"] * out["prune"]["d"] * 4
            extra = out["prune"]["peak_bytes"] - out["baseline"]["peak_bytes"]
            rows.append({"m": m, "d": out["prune"]["d"], "r": r, "baseline_MiB": out["baseline"]["peak_bytes"] / 2**20,
                         "prune_MiB": out["prune"]["peak_bytes"] / 2**20, "m·d_MiB": md / 2**20,
                         "extra/(m·d)": extra / md})
            print_table(rows[-1:], list(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", default="1e4,1e5,1e6")
    parser.add_argument("--grads", default="32,128")
    parser.add_argument("--recomputations", default="1,4")
    parser.add_argument("--blocked", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--memory", action="store_true", help="peak memory in subprocesses instead of times")
    parser.add_argument("--out", default="bench/results/pruning.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dims = [int(float(v)) for v in args.dims.split(",")]
    grads = [int(v) for v in args.grads.split(",")]
    recomps = [int(v) for v in args.recomputations.split(",")]
    if args.memory:
        rows = memory_rows(grads, recomps)
        write_json(args.out.replace(".json", "_memory.json"), {"environment": environment(), "memory": rows})
        return
    if args.dry_run:
        dims, grads, recomps, args.repeats = [2000], [8], [1, 2], 1
    step = one_step_rows(dims, grads, device, args.blocked or args.dry_run, args.repeats)
    whole = recomputation_rows(grads, recomps, device, args.repeats)
    sync(device)
    if not args.dry_run:
        write_json(args.out, {"environment": environment(), "one_step": step, "recomputations": whole})


if __name__ == "__main__":
    main()
