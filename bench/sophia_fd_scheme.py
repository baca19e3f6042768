"""Sophia-H training curves with central against forward finite differences (and exact products)
on a small GPT-2 language model: does the cheaper scheme (one extra closure call per refresh
instead of two) cost anything in training?

Deterministic: fixed seeds for the model, the data order and the probes, so the curves are
reproducible losses per step, not timings (safe on a loaded machine). The text is CPython's own
reference documentation (``pydoc_data.topics``), byte-level, offline.

Run: ``python bench/sophia_fd_scheme.py [--steps 300] [--seeds 0,1,2] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def corpus():
    from pydoc_data.topics import topics

    import torch

    text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8", errors="replace")
    return torch.tensor(list(text), dtype=torch.long)


def make_model(seed: int, *, layers: int, width: int, context: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=width, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def train(scheme: str, seed: int, *, steps: int, layers: int, width: int, context: int, batch: int,
          lr: float, rho: float, update_period: int) -> list[float]:
    import torch
    from torch import nn

    import curvature
    from curvature.optim import Sophia

    data = corpus()
    model = make_model(seed, layers=layers, width=width, context=context)
    model.eval()  # no dropout (p = 0 above); eval mode also lets the exact operator run
    opt = Sophia(model.parameters(), lr=lr, rho=rho, weight_decay=0.1, update_period=update_period,
                 fd_scheme="central" if scheme == "exact" else scheme,
                 generator=torch.Generator().manual_seed(1000 + seed))
    order = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()

    def lm_loss(out, y):
        logits = curvature.select_output(out)
        return loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    losses = []
    for _ in range(steps):
        start = torch.randint(0, data.numel() - context - 1, (batch,), generator=order)
        x = torch.stack([data[s : s + context] for s in start.tolist()])
        y = torch.stack([data[s + 1 : s + context + 1] for s in start.tolist()])

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = lm_loss(model(x), y)
            loss.backward()
            return loss

        kwargs = {}
        if scheme == "exact" and opt.curvature_due:
            kwargs["curvature"] = curvature.Hessian(model, lm_loss, (x, y))
        losses.append(float(opt.step(closure, **kwargs).detach()))
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--schemes", default="central,forward")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--update-period", type=int, default=10)
    parser.add_argument("--json", help="also write the curves here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    schemes = args.schemes.split(",")
    curves = {}
    for scheme in schemes:
        for seed in seeds:
            curves[(scheme, seed)] = train(
                scheme, seed, steps=args.steps, layers=args.layers, width=args.width, context=args.context,
                batch=args.batch, lr=args.lr, rho=args.rho, update_period=args.update_period,
            )
    tail = max(1, args.steps // 10)
    print(f"GPT-2 {args.layers} layers, width {args.width}, context {args.context}, batch {args.batch}, "
          f"{args.steps} steps, Sophia lr={args.lr} rho={args.rho} k={args.update_period}; "
          f"mean loss of the last {tail} steps")
    print(f"{'seed':>4s} " + " ".join(f"{s:>10s}" for s in schemes) + "   max |diff| per step vs first")
    for seed in seeds:
        finals = [statistics.fmean(curves[(s, seed)][-tail:]) for s in schemes]
        diff = max(abs(a - b) for s in schemes[1:] for a, b in zip(curves[(s, seed)], curves[(schemes[0], seed)]))
        print(f"{seed:4d} " + " ".join(f"{f:10.4f}" for f in finals) + f"   {diff:.4f}")
    means = [statistics.fmean(statistics.fmean(curves[(s, seed)][-tail:]) for seed in seeds) for s in schemes]
    print("mean " + " ".join(f"{m:10.4f}" for m in means))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}/{seed}": c for (s, seed), c in curves.items()}))


if __name__ == "__main__":
    main()
