"""Step time and peak memory of the curvature optimizers relative to AdamW, and against
pytorch_optimizer's SophiaH and AdaHessian, on the bench MLP and CNN (CPU by default).

Each (model, optimizer) measurement runs in its own subprocess so its peak resident memory
(``ru_maxrss``) is its own; configurations run round-robin (A B C … A B C …) and the medians of
the repeats are reported. Every optimizer runs the same loop with the standard closure; the
pytorch_optimizer ones need ``loss.backward(create_graph=True)`` on every step (their documented
usage), ours never do.

Run: ``flock /tmp/team/bench.lock python bench/optimizers.py [--repeats 3] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ("AdamW", "Sophia(k=10)", "Sophia(k=10,fwd)", "AdaHessian(k=1)", "pto.SophiaH(k=10)",
           "pto.AdaHessian(k=1)")


def make_optimizer(name, params):
    import torch

    from curvature.optim import AdaHessian, Sophia

    gen = torch.Generator().manual_seed(0)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "Sophia(k=10)":
        return Sophia(params, lr=1e-3, update_period=10, generator=gen)
    if name == "Sophia(k=10,fwd)":
        return Sophia(params, lr=1e-3, update_period=10, fd_scheme="forward", generator=gen)
    if name == "AdaHessian(k=1)":
        return AdaHessian(params, lr=0.15, update_period=1, generator=gen)
    import pytorch_optimizer as pto

    if name == "pto.SophiaH(k=10)":
        return pto.SophiaH(params, lr=1e-3, update_period=10)
    if name == "pto.AdaHessian(k=1)":
        return pto.AdaHessian(params, lr=0.15, update_period=1)
    raise ValueError(name)


def worker(model_name: str, opt_name: str, steps: int, device: str) -> dict:
    import torch
    from torch import nn

    from bench.models import cnn_data, make_cnn, make_mlp, mlp_data

    torch.set_num_threads(1)
    model = (make_mlp() if model_name == "mlp" else make_cnn()).to(device)
    X, y = (mlp_data() if model_name == "mlp" else cnn_data())
    X, y = X.to(device), y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    create_graph = opt_name.startswith("pto.")
    for _ in range(2):  # baseline: a plain forward/backward, no optimizer state
        model.zero_grad()
        loss_fn(model(X), y).backward()
    model.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / 2**20
    opt = make_optimizer(opt_name, list(model.parameters()))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward(create_graph=create_graph)
        return loss

    warmup = 10 if "k=10" in opt_name else 2  # one full refresh period before timing
    for _ in range(warmup):
        opt.step(closure)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"step_ms": 1e3 * elapsed, "peak_mb": peak, "extra_mb": peak - base}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (a multiple of 10)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.device)))
        return
    results: dict = {}
    for _ in range(args.repeats):
        for model in args.models.split(","):
            for name in CONFIGS:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", model, name, "--steps", str(args.steps),
                     "--device", args.device], capture_output=True, text=True, check=True,
                )
                results.setdefault((model, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    unit = "GPU max allocated" if args.device == "cuda" else "peak RSS"
    print(f"device={args.device}, {args.repeats} round-robin repeats, medians; memory = {unit} (MiB)")
    print(f"{'model':5s} {'optimizer':22s} {'step ms':>9s} {'x AdamW':>8s} {'peak MiB':>9s} {'x AdamW':>8s} "
          f"{'extra MiB':>10s}")
    for model in args.models.split(","):
        med = {name: {k: statistics.median(r[k] for r in results[(model, name)]) for k in ("step_ms", "peak_mb",
                                                                                          "extra_mb")}
               for name in CONFIGS}
        ref = med["AdamW"]
        for name in CONFIGS:
            m = med[name]
            row = dict(model=model, optimizer=name, **m, time_ratio=m["step_ms"] / ref["step_ms"],
                       peak_ratio=m["peak_mb"] / ref["peak_mb"])
            rows.append(row)
            print(f"{model:5s} {name:22s} {m['step_ms']:9.2f} {row['time_ratio']:8.2f} {m['peak_mb']:9.1f} "
                  f"{row['peak_ratio']:8.2f} {m['extra_mb']:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
