"""Operator-core benchmark: Hessian products against hand-written HVPs and the peer libraries.

All compared functions of a case are timed ROUND-ROBIN (A B C A B C ..., the starting function
rotating every round) in the same process and reported as medians, because a shared machine drifts
by 20-30% within a minute. Times are relative to one full gradient over the data.

Cases (``--cases``):

* ``products``: for the MLP (~400k parameters, 512 samples) and the CNN (~25k parameters, 256
  images), each as one batch and as 4 batches: a fresh ``H @ v`` (forward, create-graph backward,
  second backward) against a hand-written double-backward HVP, a ``torch.func`` forward-over-reverse
  HVP, curvlinops and PyHessian; ``H @ v`` with the cached graph; ``H @ V`` for ``k=16`` (loop,
  vmapped, auto) against 16 single products; the GGN product.
* ``overhead``: the hot path. ``H @ v`` through the operator's cached graph against a raw second
  backward (``torch.autograd.grad(g, params, v)``) through the very same graph (ReLU/MaxPool CNN,
  11.6k parameters, one batch of 128).
* ``auto``: repeatability of the ``"auto"`` choice on a GELU/AvgPool CNN: the choice is made
  afresh ``--auto-repeats`` times (registry cleared), then every strategy's ``H @ V`` (k=16) is
  timed round-robin; reports the kept strategy's median over the best median per repeat.

Run: ``python -m bench.operators [--cases products,overhead,auto] [--repeats 7]``; JSON goes to
bench/results/operators.json.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch import nn

from bench.models import CASES, make_cnn, num_params, split_batches
from bench.timing import environment, print_table, round_robin, write_json
from curvature import GGN, Hessian, backends

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

        def loss(*ps, x=x, y=y):
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

        out["curvlinops"] = HessianLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
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


def products_case(name, num_batches, *, rounds, device, k=16):
    make_model, make_data = CASES[name]
    model = make_model().to(device)
    x, y = make_data()
    data = (x.to(device), y.to(device))
    batches = [data] if num_batches == 1 else [(a, b) for a, b in split_batches(data, num_batches)]
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    d = num_params(model)
    v = torch.randn(d, generator=gen, device=device)
    V = torch.randn(d, k, generator=gen, device=device)
    op_data = data if num_batches == 1 else batches
    v_list = [t.contiguous() for t in Hessian(model, loss_fn, op_data).unflatten(v)]

    def gradient():
        for xb, yb in batches:
            torch.autograd.grad(loss_fn(model(xb), yb), params)

    fresh = Hessian(model, loss_fn, op_data, cache_graph=False)
    ggn = GGN(model, loss_fn, op_data, cache_graph=False)
    single = {
        "grad": gradient,
        "ours_Hv": lambda: fresh @ v,
        "hand_RoR": lambda: hand_double_backward(model, loss_fn, batches, v_list),
        "hand_FoR": lambda: hand_forward_over_reverse(model, loss_fn, batches, v_list),
        "ours_GGNv": lambda: ggn @ v,
    }
    if num_batches == 1:
        cached = Hessian(model, loss_fn, data)
        single["ours_cached_Hv"] = lambda: cached @ v
    peer_ops = peers(model, loss_fn, batches, num_batches == 1)
    if "curvlinops" in peer_ops:
        single["curvlinops_Hv"] = lambda: peer_ops["curvlinops"] @ v
    if "pyhessian" in peer_ops:
        single["pyhessian_Hv"] = lambda: peer_ops["pyhessian"](v_list)
    med = round_robin(single, rounds=rounds, device=device)
    block_ops = {b: Hessian(model, loss_fn, op_data, cache_graph=False, backend=b) for b in ("loop", "vmap")}
    blocks = {f"HV16_{b}": (lambda op=op: op @ V) for b, op in block_ops.items()}
    backends.clear()
    auto = Hessian(model, loss_fn, op_data, cache_graph=False)
    blocks["HV16_auto"] = lambda: auto @ V
    med.update(round_robin(blocks, rounds=max(3, rounds // 2), device=device))
    t_grad = med.pop("grad")
    row = {"model": name, "batches": num_batches, "d": d, "grad_ms": 1e3 * t_grad}
    row.update({key: value / t_grad for key, value in med.items()})
    row["Hv_vs_best_hand"] = med["ours_Hv"] / min(med["hand_RoR"], med["hand_FoR"])
    row["auto_backend"] = auto.backend_choice(k).backend
    row["HV16_speedup"] = 16 * med["ours_Hv"] / med["HV16_auto"]
    return row


def overhead_model() -> nn.Module:
    """ReLU/MaxPool CNN for 3x32x32 images with 11,602 parameters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 8), nn.ReLU(), nn.Linear(8, 10),
    ).eval()


def overhead_case(*, rounds, device, batch=128):
    model = overhead_model().to(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)
    H = Hessian(model, nn.CrossEntropyLoss(), (x, y))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    H @ v  # builds and caches the first-order graph
    grads = H._cache[0].value  # the operator's own cached gradient graph (a bench may peek)
    params = list(model.parameters())
    v_list = [t.contiguous() for t in H.unflatten(v)]
    med = round_robin(
        {
            "raw_second_backward": lambda: torch.autograd.grad(grads, params, v_list, retain_graph=True),
            "ours_cached_Hv": lambda: H @ v,
        },
        rounds=rounds, device=device,
    )
    return {
        "case": "overhead", "d": H.shape[0], "batch": batch, "raw_ms": 1e3 * med["raw_second_backward"],
        "ours_ms": 1e3 * med["ours_cached_Hv"], "ratio": med["ours_cached_Hv"] / med["raw_second_backward"],
    }


def auto_case(*, repeats, rounds, device, k=16, batch=128):
    model = make_cnn(activation="gelu", pool="avg").to(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    V = torch.randn(num_params(model), k, generator=torch.Generator().manual_seed(2)).to(device)
    strategies = {
        b: Hessian(model, loss_fn, (x, y), backend=b, memory_budget=1 << 34)
        for b in ("loop", "vmap", "forward_over_reverse")
    }
    rows = []
    for r in range(repeats):
        backends.clear()
        H = Hessian(model, loss_fn, (x, y))
        H @ V
        choice = H.backend_choice(k)
        med = round_robin({b: (lambda op=op: op @ V) for b, op in strategies.items()}, rounds=rounds, device=device)
        best = min(med.values())
        rows.append({
            "case": "auto", "repeat": r, "kept": choice.backend, "source": choice.source,
            "kept_over_best": med[choice.backend] / best, **{f"{b}_ms": 1e3 * t for b, t in med.items()},
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="products,overhead,auto")
    parser.add_argument("--repeats", type=int, default=7, help="round-robin rounds per comparison")
    parser.add_argument("--auto-repeats", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--out", default="bench/results/operators.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cases = args.cases.split(",")
    payload: dict[str, Any] = {"environment": environment()}
    if "overhead" in cases:
        row = overhead_case(rounds=max(args.repeats, 30), device=device)
        print_table([row], list(row))
        payload["overhead"] = row
    if "auto" in cases:
        rows = auto_case(repeats=args.auto_repeats, rounds=args.repeats, device=device)
        print_table(rows, list(rows[0]))
        payload["auto"] = rows
    if "products" in cases:
        rows = []
        for name in args.models.split(","):
            for num_batches in (1, 4):
                rows.append(products_case(name, num_batches, rounds=args.repeats, device=device))
                print_table(rows[-1:], list(rows[-1]))
        columns = [
            "model", "batches", "grad_ms", "ours_Hv", "hand_RoR", "hand_FoR", "Hv_vs_best_hand", "pyhessian_Hv",
            "curvlinops_Hv", "ours_cached_Hv", "HV16_loop", "HV16_vmap", "HV16_auto",
            "auto_backend", "HV16_speedup", "ours_GGNv",
        ]
        print()
        print_table(rows, columns)
        payload["products"] = rows
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
