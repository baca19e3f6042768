"""GPT-2 small end to end on one CPU machine: wall time and peak memory of every phase.

Model: ``examples/gpt2_small_problem.py`` (GPT-2 small from a ``transformers.GPT2Config``: 12
layers, width 768, vocabulary 50,257, random initialisation, no download), one batch of
``--batch`` sequences of ``--seq`` tokens, ``TokenCrossEntropyLoss(shift=True)``.

Phases (each in its own process, which reports its wall time and its peak resident set size,
``ru_maxrss``; "above model" subtracts the peak of the ``model`` phase, which only builds the
model and the batch):

* ``model``: build (the floor every phase pays);
* ``gradient``: one loss and gradient;
* ``hessian_product``: two Hessian-vector products (first and repeated);
* ``ggn_product``: two GGN-vector products;
* ``top5``: ``spectra.eigsh(H, k=5)`` at its default basis (memory-capped), ``tol=--eig-tol``;
* ``slq``: ``spectra.slq(H, num_probes=1, num_steps=--slq-steps)`` at its default
  ``reorthogonalize="auto"`` (no reorthogonalization above 4 GiB of basis);
* ``layer_traces``: ``estimators.block_traces(H, num_matvecs=--probes, group_by_module=True)``;
* ``hawq``: ``quant.sensitivity`` of every quantizable layer (``num_matvecs=--probes``);
* ``sophia``: ``--sophia-steps`` Sophia-H steps with ``update_period=2`` (refreshes included);
* ``report``: ``curvature report --problem examples/gpt2_small_problem.py:build --quick`` (the
  problem file's batch of 2 sequences), run in the phase's process (its peak RSS is the
  command's; the time includes building the model). About 690 products at ~12 s: hours.

Run (quiet machine): ``OMP_NUM_THREADS=2 python -m bench.gpt2_small`` (all phases; JSON to
bench/results/gpt2_small.json). Dry run: ``python -m bench.gpt2_small --tiny --seq 32``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PHASES = ("model", "gradient", "hessian_product", "ggn_product", "top5", "slq", "layer_traces", "hawq",
          "sophia", "report")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _say(msg: str) -> None:
    print(f"[gpt2_small {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _problem(args: argparse.Namespace):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt2_small_problem import build

    return build(seed=0, tiny=args.tiny, batch_size=args.batch, seq_len=args.seq)


def run_phase(phase: str, args: argparse.Namespace) -> dict:
    """Run one phase in THIS process; return its figures (called in the child)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out: dict = {}
    start = time.perf_counter()
    if phase == "report":  # the command builds its own problem (the same 2 sequences)
        from curvature.app.cli import main as cli_main

        spec = os.path.join(ROOT, "examples", "gpt2_small_problem.py") + (":build_tiny" if args.tiny else ":build")
        code = cli_main(["report", "--problem", spec, "--quick", "--force",
                         "--out", os.path.join(ROOT, "bench", "results", "gpt2_small_report")])
        if code != 0:
            raise RuntimeError(f"curvature report exited with {code}")
        out["seconds"] = time.perf_counter() - start
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return out
    p = _problem(args)
    model, loss_fn, data = p.model, p.loss_fn, p.data
    gen = torch.Generator().manual_seed(0)
    out["d"] = sum(q.numel() for q in model.parameters())
    start = time.perf_counter()
    if phase == "model":
        pass
    elif phase == "gradient":
        x, y = data
        torch.autograd.grad(loss_fn(model(x).logits, y), list(model.parameters()))
    elif phase in ("hessian_product", "ggn_product"):
        from curvature import GGN, Hessian

        op = (Hessian if phase == "hessian_product" else GGN)(model, loss_fn, data)
        v = torch.randn(op.shape[0], generator=gen)
        for i in range(2):
            t = time.perf_counter()
            w = op @ v
            out[f"product_{i + 1}_s"] = time.perf_counter() - t
            _say(f"{phase}: product {i + 1} in {out[f'product_{i + 1}_s']:.1f} s")
        out["norm"] = float(w.norm())
    elif phase == "top5":
        import spectra
        from curvature import Hessian

        H = Hessian(model, loss_fn, data)
        res = spectra.eigsh(H, k=5, tol=args.eig_tol, max_iter=args.eig_max_iter, generator=gen)
        out.update(eigenvalues=res.eigenvalues.tolist(), converged=res.converged.tolist(),
                   num_matvecs=res.num_matvecs)
    elif phase == "slq":
        import spectra
        from curvature import Hessian

        H = Hessian(model, loss_fn, data)
        dens = spectra.slq(H, num_probes=1, num_steps=args.slq_steps, generator=gen, progress=True)
        out.update(support=list(dens.support()), trace=dens.trace().value, num_matvecs=dens.num_matvecs)
    elif phase == "layer_traces":
        import estimators
        from curvature import Hessian

        H = Hessian(model, loss_fn, data)
        est = estimators.block_traces(H, num_matvecs=args.probes, group_by_module=True, generator=gen,
                                      progress=True)
        out.update(num_layers=len(est), first=str(list(est)[:3]))
    elif phase == "hawq":
        import quant

        s = quant.sensitivity(model, loss_fn, data, num_matvecs=args.probes, generator=gen)
        out.update(num_layers=len(s), kinds=sorted({v.kind for v in s.values()}) if s else [],
                   layers=list(s)[:4])
    elif phase == "sophia":
        from curvature.optim import Sophia

        model.train()
        for m in model.modules():  # dropout off: a deterministic closure
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        opt = Sophia(model.parameters(), lr=1e-4, update_period=2, generator=gen)
        x, y = data

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x).logits, y)
            loss.backward()
            return loss

        losses = []
        for i in range(args.sophia_steps):
            t = time.perf_counter()
            losses.append(float(opt.step(closure).detach()))
            _say(f"sophia: step {i + 1} in {time.perf_counter() - t:.1f} s, loss {losses[-1]:.4f}")
        out["losses"] = losses
    else:
        raise ValueError(f"unknown phase {phase!r}")
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="*", default=list(PHASES), choices=PHASES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--probes", type=int, default=10, help="products per trace / sensitivity")
    parser.add_argument("--slq-steps", type=int, default=30)
    parser.add_argument("--eig-tol", type=float, default=1e-2)
    parser.add_argument("--eig-max-iter", type=int, default=60)
    parser.add_argument("--sophia-steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="2 layers, width 64 (dry run)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per phase")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpt2_small.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_phase(args.child, args)))
        return
    results: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "phases", "out")}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for phase in args.phases:
        _say(f"{phase}: starting")
        cmd = [sys.executable, "-m", "bench.gpt2_small", "--child", phase, "--batch", str(args.batch),
               "--seq", str(args.seq), "--probes", str(args.probes), "--slq-steps", str(args.slq_steps),
               "--eig-tol", str(args.eig_tol), "--eig-max-iter", str(args.eig_max_iter),
               "--sophia-steps", str(args.sophia_steps)] + (["--tiny"] if args.tiny else [])
        t = time.perf_counter()
        try:
            # stderr streams through (progress bars, the report's lines); the child's last stdout line is its JSON.
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[phase] = {"error": f"timed out after {args.timeout} s"}
            _say(f"{phase}: timed out")
            continue
        if proc.returncode != 0:
            results[phase] = {"error": f"exit {proc.returncode} (see stderr above)", "seconds": time.perf_counter() - t}
            _say(f"{phase}: FAILED")
            continue
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[phase]
        base = results.get("model", {}).get("peak_rss_bytes")
        peak = r.get("peak_rss_bytes", 0) / 2**30
        above = "" if base is None or phase == "model" else f", {peak - base / 2**30:.2f} GiB above model"
        _say(f"{phase}: {r.get('seconds', float('nan')):.1f} s, peak {peak:.2f} GiB{above}")
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
