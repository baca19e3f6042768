"""Operator-core benchmark: Hessian products against hand-written HVPs and the peer libraries.

For the MLP (~400k parameters, 512 samples) and the CNN (~25k parameters, 256 images), each as
one batch and as 4 batches, prints (times relative to one full gradient over the data):

* ``H @ v`` (a fresh product: forward, create-graph backward, second backward) against a
  hand-written double-backward HVP, a ``torch.func`` forward-over-reverse HVP, curvlinops'
  ``HessianLinearOperator`` and PyHessian's HVP;
* ``H @ v`` with the first-order graph kept (what Lanczos and repeated probes pay on one batch),
  against PyHessian's single-batch HVP, which keeps the graph too;
* ``H @ V`` for ``k=16`` against 16 single products, and against curvlinops on the same block.

Run: ``python -m bench.operators [--repeats 5] [--device cpu]``; JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from bench.models import CASES, num_params, split_batches
from bench.timing import environment, median_time, print_table, write_json
from curvature import GGN, Hessian

log = logging.getLogger("bench.operators")


def hand_double_backward(model, loss_fn, batches, v):
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    n = sum(y.shape[0] for _, y in batches)
    for x, y in batches:
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        hv = torch.autograd.grad(g, params, v)
        for t, h in zip(total, hv):
            t.add_(h, alpha=y.shape[0] / n)
    return total


def hand_forward_over_reverse(model, loss_fn, batches, v):
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in model.parameters())
    total = [torch.zeros_like(p) for p in primals]
    n = sum(y.shape[0] for _, y in batches)
    for x, y in batches:

        def loss(*ps):
            return loss_fn(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

        grad_fn = torch.func.grad(loss, argnums=tuple(range(len(primals))))
        hv = torch.func.jvp(grad_fn, primals, tuple(v))[1]
        for t, h in zip(total, hv):
            t.add_(h, alpha=y.shape[0] / n)
    return total


def peers(model, loss_fn, batches, single):
    """Callables for the peers' HVPs, or an empty dict when a peer is not installed."""
    out = {}
    params = list(model.parameters())
    try:
        from curvlinops import HessianLinearOperator

        op = HessianLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
        out["curvlinops"] = op
    except ImportError:
        log.warning("curvlinops not installed; pip install -e '.[bench]'")
    try:
        from pyhessian import hessian as pyhessian_hessian
        from pyhessian.utils import hessian_vector_product

        if single:
            hc = pyhessian_hessian(model, loss_fn, data=batches[0], cuda=params[0].is_cuda)
            out["pyhessian"] = lambda v: hessian_vector_product(hc.gradsH, hc.params, v)
        else:
            hc = pyhessian_hessian(model, loss_fn, dataloader=batches, cuda=params[0].is_cuda)
            out["pyhessian"] = lambda v: hc.dataloader_hv_product(v)
    except ImportError:
        log.warning("pyhessian not installed; pip install -e '.[bench]'")
    return out


def run_case(name, num_batches, *, repeats, device, k=16):
    make_model, make_data = CASES[name]
    model = make_model().to(device)
    x, y = make_data()
    data = (x.to(device), y.to(device))
    batches = [data] if num_batches == 1 else [(a.to(device), b.to(device)) for a, b in split_batches(data, num_batches)]
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    d = num_params(model)
    gen = torch.Generator(device=device).manual_seed(0)
    v = torch.randn(d, generator=gen, device=device)
    V = torch.randn(d, k, generator=gen, device=device)
    v_list = [t.contiguous() for t in Hessian(model, loss_fn, data).unflatten(v)]
    op_data = data if num_batches == 1 else batches
    t = lambda fn, reps=repeats: median_time(fn, repeats=reps, device=device)  # noqa: E731

    def gradient():
        for xb, yb in batches:
            torch.autograd.grad(loss_fn(model(xb), yb), params)

    row = {"model": name, "batches": num_batches, "d": d}
    t_grad = t(gradient)
    row["grad_ms"] = 1e3 * t_grad
    fresh = Hessian(model, loss_fn, op_data, cache_graph=False)
    t_hv = t(lambda: fresh @ v)
    row["ours_Hv"] = t_hv / t_grad
    row["hand_RoR"] = t(lambda: hand_double_backward(model, loss_fn, batches, v_list)) / t_grad
    row["hand_FoR"] = t(lambda: hand_forward_over_reverse(model, loss_fn, batches, v_list)) / t_grad
    row["Hv_vs_best_hand"] = row["ours_Hv"] / min(row["hand_RoR"], row["hand_FoR"])
    results = {}
    for backend in ("double_backward", "double_backward_vmap"):
        op = Hessian(model, loss_fn, op_data, cache_graph=False, backend=backend)
        results[backend] = t(lambda op=op: op @ V, max(2, repeats // 2))
    auto = Hessian(model, loss_fn, op_data, cache_graph=False)
    t_block = t(lambda: auto @ V, max(2, repeats // 2))
    row["auto_backend"] = auto.resolved_backend(k) if hasattr(auto, "resolved_backend") else auto.backend
    row["HV16_loop"] = results["double_backward"] / t_grad
    row["HV16_vmap"] = results["double_backward_vmap"] / t_grad
    row["HV16_speedup"] = 16 * t_hv / t_block
    if num_batches == 1:
        cached = Hessian(model, loss_fn, data)
        cached @ v
        row["ours_cached_Hv"] = t(lambda: cached @ v) / t_grad
        cached.release()
    ggn = GGN(model, loss_fn, op_data, cache_graph=False)
    row["ours_GGNv"] = t(lambda: ggn @ v) / t_grad
    for peer, fn in peers(model, loss_fn, batches, num_batches == 1).items():
        if peer == "curvlinops":
            row["curvlinops_Hv"] = t(lambda fn=fn: fn @ v) / t_grad
            t_peer_block = t(lambda fn=fn: fn @ V, max(2, repeats // 2))
            row["curvlinops_HV16_over_ours"] = t_peer_block / t_block
        else:
            row["pyhessian_Hv"] = t(lambda fn=fn: fn(v_list)) / t_grad
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--out", default="bench/results/operators.json")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.models.split(","):
        for num_batches in (1, 4):
            rows.append(run_case(name, num_batches, repeats=args.repeats, device=torch.device(args.device)))
            print_table(rows[-1:], list(rows[-1]))
    print()
    columns = [
        "model", "batches", "grad_ms", "ours_Hv", "hand_RoR", "hand_FoR", "Hv_vs_best_hand", "pyhessian_Hv",
        "curvlinops_Hv", "ours_cached_Hv", "HV16_loop", "HV16_vmap", "auto_backend", "HV16_speedup",
        "curvlinops_HV16_over_ours", "ours_GGNv",
    ]
    print_table(rows, columns)
    write_json(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
