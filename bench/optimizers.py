"""Step time and peak memory of the curvature optimizers relative to AdamW, and against
pytorch_optimizer's SophiaH and AdaHessian, on the bench MLP and CNN and a GPT-2 language model
built from a ``transformers`` config (CPU by default).

Each (model, optimizer) measurement runs in its own subprocess so its peak resident memory
(``ru_maxrss``) is its own; configurations run round-robin (A B C … A B C …) and the medians of
the repeats are reported. Every optimizer runs the same loop with the standard closure; the
pytorch_optimizer ones need ``loss.backward(create_graph=True)`` on every step (their documented
usage), ours never do.

The ``lm`` model is GPT-2-shaped (``--lm-layers``, ``--lm-width``, ``--lm-context``,
``--lm-batch``, vocabulary ``--lm-vocab``; GPT-2 small is ``--lm-layers 12 --lm-width 768
--lm-context 256 --lm-vocab 50257``) with eager attention (pytorch_optimizer needs a double
backward through it) and token cross-entropy; the Sophia rows there use ``update_period=10``, the
setting of the Sophia paper, so a refresh's extra closure calls are amortised over 10 steps.

Run: ``flock /tmp/team/bench.lock python bench/optimizers.py [--repeats 3] [--device cuda]
[--models mlp,cnn,lm]``.
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

CONFIGS = ("AdamW", "Sophia-central(k=10)", "Sophia-forward(k=10)", "AdaHessian(k=1)", "pto.SophiaH(k=10)",
           "pto.AdaHessian(k=1)")


def make_optimizer(name, params):
    import torch

    from curvature.optim import AdaHessian, Sophia

    gen = torch.Generator().manual_seed(0)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "Sophia-central(k=10)":
        return Sophia(params, lr=1e-3, update_period=10, fd_scheme="central", generator=gen)
    if name == "Sophia-forward(k=10)":
        return Sophia(params, lr=1e-3, update_period=10, fd_scheme="forward", generator=gen)
    if name == "AdaHessian(k=1)":
        return AdaHessian(params, lr=0.15, update_period=1, generator=gen)
    import pytorch_optimizer as pto

    if name == "pto.SophiaH(k=10)":
        return pto.SophiaH(params, lr=1e-3, update_period=10)
    if name == "pto.AdaHessian(k=1)":
        return pto.AdaHessian(params, lr=0.15, update_period=1)
    raise ValueError(name)


LM_DEFAULTS = dict(lm_layers=2, lm_width=128, lm_context=128, lm_batch=4, lm_vocab=50257)


def make_lm(*, lm_layers, lm_width, lm_context, lm_batch, lm_vocab, seed=0):
    """A GPT-2 LM from a config (no download) and one batch of random tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=lm_vocab, n_positions=lm_context, n_embd=lm_width, n_layer=lm_layers,
                        n_head=max(1, lm_width // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, lm_vocab, (lm_batch, lm_context + 1), generator=g)
    return model, tokens[:, :-1], tokens[:, 1:]


def worker(model_name: str, opt_name: str, steps: int, device: str, lm: dict | None = None) -> dict:
    import torch
    from torch import nn

    from bench.models import cnn_data, make_cnn, make_mlp, mlp_data

    torch.set_num_threads(1)
    ce = nn.CrossEntropyLoss()
    if model_name == "lm":
        model, X, y = make_lm(**(lm or LM_DEFAULTS))

        def loss_fn(out, targets):
            logits = out.logits
            return ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    else:
        model = make_mlp() if model_name == "mlp" else make_cnn()
        X, y = (mlp_data() if model_name == "mlp" else cnn_data())
        loss_fn = ce
    model = model.to(device)
    X, y = X.to(device), y.to(device)
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
    parser.add_argument("--optimizers", default=",".join(CONFIGS), help="a subset of " + ", ".join(CONFIGS))
    parser.add_argument("--json", help="also write the results here")
    for key, value in LM_DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configs = [c for c in args.optimizers.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "AdamW" not in configs:
        parser.error(f"--optimizers must name AdamW and only {', '.join(CONFIGS)}; got unknown {unknown}")
    lm = {key: getattr(args, key) for key in LM_DEFAULTS}
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.device, lm)))
        return
    results: dict = {}
    for _ in range(args.repeats):
        for model in args.models.split(","):
            for name in configs:
                lm_args = [a for key, value in lm.items() for a in ("--" + key.replace("_", "-"), str(value))]
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", model, name, "--steps", str(args.steps),
                     "--device", args.device, *lm_args], capture_output=True, text=True, check=True,
                )
                results.setdefault((model, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    unit = "GPU max allocated" if args.device == "cuda" else "peak RSS"
    print(f"device={args.device}, {args.repeats} round-robin repeats, medians; memory = {unit} (MiB); lm = {lm}")
    print(f"{'model':5s} {'optimizer':22s} {'step ms':>9s} {'x AdamW':>8s} {'peak MiB':>9s} {'x AdamW':>8s} "
          f"{'extra MiB':>10s}")
    for model in args.models.split(","):
        med = {name: {k: statistics.median(r[k] for r in results[(model, name)]) for k in ("step_ms", "peak_mb",
                                                                                          "extra_mb")}
               for name in configs}
        ref = med["AdamW"]
        for name in configs:
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
