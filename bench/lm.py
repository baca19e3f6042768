"""Language-model curvature products: our Hessian/GGN/Fisher/empirical Fisher against
hessian-eigenthings 1.0 and a hand-written reverse-over-reverse HVP (issue 22, items 1 and 7).

Models: GPT-2 built from a ``transformers.GPT2Config`` (no download), vocabulary 50,257, padded
batches (labels ``-100`` past each sequence's random length), ``TokenCrossEntropyLoss(shift=True)``.

* ``memory``: d = 6.9M (2 layers, width 128), batch 4x256. Every job runs ONE product in its own
  subprocess, which resets its peak-RSS mark (``/proc/self/clear_refs``) after loading the model
  and data and reports ``VmHWM - VmRSS`` (peak memory above the loaded model), divided by the
  ``gradient`` job's figure (one ``torch.autograd.grad`` of the loss).
* ``time``: d = 3.3M (2 layers, width 64), batch 2x128, four products per operator at the same
  parameters (as Lanczos uses them), operators interleaved round-robin; medians of the
  repeated products (2-4) and of the first product of a fresh operator (graph built inside).

eigenthings: ``HessianOperator(method="autograd")`` and ``GGNOperator`` with
``hf_lm_loss_of_output(fused="compile")`` (its fused kernel; ``torch.compile`` on the CPU).

Times need a quiet machine; memory does not (each job is alone in its process)::

    OMP_NUM_THREADS=2 python -m bench.lm --mode time --rounds 7 --out bench/results/lm_time.json
    OMP_NUM_THREADS=2 python -m bench.lm --mode memory --repeats 3 --out bench/results/lm_memory.json

``--tiny`` runs both modes at toy sizes (vocabulary 1,000, seconds) as a dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

MEMORY_JOBS = (
    "gradient", "hvp", "hessian", "ggn", "fisher", "empirical_fisher", "eigen_hessian", "eigen_ggn",
)
TIME_JOBS = ("hvp", "hessian", "ggn", "eigen_hessian", "eigen_ggn")
TARGETS = {"hessian": 2.2, "ggn": 1.6, "fisher": 1.6, "empirical_fisher": 1.6}


@dataclass(frozen=True)
class Size:
    layers: int
    width: int
    batch: int
    seq: int
    vocab: int = 50257


MEMORY_SIZE = Size(2, 128, 4, 256)
TIME_SIZE = Size(2, 64, 2, 128)
TINY = Size(1, 16, 2, 16, 1000)


def build(size: Size, seed: int = 0) -> tuple[Any, dict, Any]:
    """GPT-2 from a config, a padded batch ``{"input_ids", "attention_mask"}`` and labels."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=size.layers, n_head=2, n_embd=size.width, vocab_size=size.vocab, n_positions=size.seq,
        attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    lengths = torch.randint(size.seq // 2, size.seq + 1, (size.batch,), generator=g)
    lengths[0] = size.seq
    mask = (torch.arange(size.seq)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask}, labels


def _jobs(model: Any, inputs: dict, labels: Any) -> dict[str, Callable[[], Callable[[Any], Any]]]:
    """Per job a factory of ``product(v)`` (a fresh operator: the first call builds its graph)."""
    import torch

    from curvature import GGN, EmpiricalFisher, Fisher, Hessian
    from curvature.losses import TokenCrossEntropyLoss

    loss_fn = TokenCrossEntropyLoss(shift=True)
    params = [p for p in model.parameters() if p.requires_grad]
    data = (inputs, labels)

    def loss() -> Any:
        return loss_fn(model(**inputs).logits, labels)

    def gradient() -> Callable[[Any], Any]:
        return lambda v: torch.autograd.grad(loss(), params)

    def hvp() -> Callable[[Any], Any]:
        def product(v: Any) -> Any:
            grads = torch.autograd.grad(loss(), params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, _split(v, params)))
            return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])
        return product

    def ours(cls: type, **kw: Any) -> Callable[[], Callable[[Any], Any]]:
        def make() -> Callable[[Any], Any]:
            op = cls(model, loss_fn, data, **kw)  # auto: one column is the loop, no timing
            return lambda v: op @ v
        return make

    def eigen_hessian() -> Callable[[Any], Any]:
        from hessian_eigenthings.loss_fns.huggingface import hf_lm_loss
        from hessian_eigenthings.operators.hessian import HessianOperator

        batch = {**inputs, "labels": labels}
        op = HessianOperator(model, [batch], hf_lm_loss(), method="autograd")
        return op.matvec

    def eigen_ggn() -> Callable[[Any], Any]:
        from hessian_eigenthings.loss_fns.huggingface import hf_lm_forward, hf_lm_loss_of_output
        from hessian_eigenthings.operators.ggn import GGNOperator

        batch = {**inputs, "labels": labels}
        op = GGNOperator(model, [batch], hf_lm_forward(), hf_lm_loss_of_output(fused="compile"))
        return op.matvec

    return {
        "gradient": gradient, "hvp": hvp, "hessian": ours(Hessian), "ggn": ours(GGN), "fisher": ours(Fisher),
        "empirical_fisher": ours(EmpiricalFisher), "eigen_hessian": eigen_hessian, "eigen_ggn": eigen_ggn,
    }


def _split(v: Any, params: list) -> list:
    out, offset = [], 0
    for p in params:
        out.append(v[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_job(job: str, size: Size) -> dict:
    """One product of ``job`` in THIS process: peak RSS above the loaded model (the child's work)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, inputs, labels = build(size)
    d = sum(p.numel() for p in model.parameters())
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    make = _jobs(model, inputs, labels)[job]
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
        fh.write("5")
    loaded = _status_kib("VmRSS")
    start = time.perf_counter()
    make()(v)
    seconds = time.perf_counter() - start
    return {"job": job, "params": d, "peak_above_loaded_mib": (_status_kib("VmHWM") - loaded) / 1024,
            "seconds": seconds}


def run_memory(size: Size, jobs: tuple[str, ...], repeats: int) -> dict:
    figures: dict[str, list[float]] = {j: [] for j in jobs}
    params = 0
    for _ in range(repeats):
        for job in jobs:
            cmd = [sys.executable, "-m", "bench.lm", "--child", job, "--size", json.dumps(asdict(size))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            figures[job].append(res["peak_above_loaded_mib"])
            params = res["params"]
    med = {j: statistics.median(f) for j, f in figures.items()}
    grad = med.get("gradient")
    return {
        "size": asdict(size), "params": params, "peak_above_loaded_mib": med,
        "times_gradient": {j: (m / grad if grad else None) for j, m in med.items()},
    }


def run_time(size: Size, rounds: int, products: int = 4) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, inputs, labels = build(size)
    d = sum(p.numel() for p in model.parameters())
    vs = [torch.randn(d, generator=torch.Generator().manual_seed(10 + i)) for i in range(products)]
    makers = _jobs(model, inputs, labels)
    first: dict[str, list[float]] = {j: [] for j in TIME_JOBS}
    repeated: dict[str, list[float]] = {j: [] for j in TIME_JOBS}
    for j in TIME_JOBS:  # warm-up (torch.compile of eigenthings' kernel, allocator)
        p = makers[j]()
        p(vs[0])
    for r in range(rounds):
        for j in TIME_JOBS[r % len(TIME_JOBS):] + TIME_JOBS[: r % len(TIME_JOBS)]:
            start = time.perf_counter()
            product = makers[j]()
            product(vs[0])
            first[j].append(time.perf_counter() - start)
            for v in vs[1:]:
                start = time.perf_counter()
                product(v)
                repeated[j].append(time.perf_counter() - start)
    med_first = {j: statistics.median(t) for j, t in first.items()}
    med_rep = {j: statistics.median(t) for j, t in repeated.items()}
    ratio = {
        "hessian_vs_eigen": {"first": med_first["hessian"] / med_first["eigen_hessian"],
                             "repeated": med_rep["hessian"] / med_rep["eigen_hessian"]},
        "ggn_vs_eigen": {"first": med_first["ggn"] / med_first["eigen_ggn"],
                         "repeated": med_rep["ggn"] / med_rep["eigen_ggn"]},
    }
    return {"size": asdict(size), "params": d, "first_s": med_first, "repeated_s": med_rep, "ratios": ratio}


def markdown(result: dict) -> str:
    lines = []
    if "memory" in result:
        m = result["memory"]
        lines += [f"Peak memory above the loaded model, one product per process (d = {m['params']:,}):", "",
                  "| job | MiB | x gradient | target |", "|---|---:|---:|---:|"]
        for j, mib in m["peak_above_loaded_mib"].items():
            lines.append(f"| {j} | {mib:.0f} | {m['times_gradient'][j]:.2f} | {TARGETS.get(j, '')} |")
        lines.append("")
    if "time" in result:
        t = result["time"]
        lines += [f"Seconds per product, round-robin medians (d = {t['params']:,}):", "",
                  "| job | first | repeated |", "|---|---:|---:|"]
        for j in t["first_s"]:
            lines.append(f"| {j} | {t['first_s'][j]:.3f} | {t['repeated_s'][j]:.3f} |")
        for name, r in t["ratios"].items():
            lines.append(f"| {name} (ratio, target <= 0.8) | {r['first']:.2f} | {r['repeated']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("memory", "time", "all"), default="all")
    ap.add_argument("--jobs", nargs="*", default=list(MEMORY_JOBS), help="memory jobs")
    ap.add_argument("--repeats", type=int, default=1, help="memory: subprocesses per job (medians)")
    ap.add_argument("--rounds", type=int, default=5, help="time: round-robin rounds")
    ap.add_argument("--tiny", action="store_true", help="dry run at toy sizes")
    ap.add_argument("--out", default=None, help="JSON output (a .md table is written beside it)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(memory_job(args.child, Size(**json.loads(args.size)))))
        return 0
    result: dict[str, Any] = {"omp_threads": os.environ.get("OMP_NUM_THREADS")}
    if args.mode in ("memory", "all"):
        result["memory"] = run_memory(TINY if args.tiny else MEMORY_SIZE, tuple(args.jobs), args.repeats)
    if args.mode in ("time", "all"):
        result["time"] = run_time(TINY if args.tiny else TIME_SIZE, args.rounds)
    table = markdown(result)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
