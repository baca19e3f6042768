"""GPU benchmark: the batched kernels on an accelerator, in one run of under 8 minutes.

Measures, on a ResNet-18-sized CNN (batch 128, 32x32 inputs, 11M parameters) and a
GPT-2-small-shaped LM (random init, 12 layers, width 768, sequence 256, vocabulary 50,257):

==================  ================================================================================
section             what is timed (median of repeats, CUDA-synchronised), with peak device memory
==================  ================================================================================
``hvp``             ``H @ v`` against one gradient (forward + backward) on the same batch
``block``           ``H @ V`` for k = 1, 4, 16, 64 under every strategy of the automatic choice,
                    against k single products, and the strategy ``auto`` picks
``ggn_lm``          the GGN product (lean cross-entropy path) against hessian-eigenthings' fused kernel
``hutchinson``      100 Hutchinson probes against PyHessian's ``trace(maxIter=100)``
``slq``             SLQ with 8 probes x 100 steps against PyHessian's ``density(iter=100, n_v=8)``
``mfac``            the M-FAC inverse product at d = 1e7, m = 1024 against its memory-bandwidth bound
``optim``           a Sophia and an AdaHessian step (``update_period=10``) against AdamW's
``fd``              the finite-difference Hessian product against the exact one, flash attention on
==================  ================================================================================

It writes ``results.json`` and ``results.md`` into ``--out``. ``--tiny`` shrinks every size so the
whole script runs on a CPU in seconds; CI runs that dry run (``tests/bench/test_gpu_dry_run.py``)
so the script cannot rot. A section that fails records its error and the script exits 1 after
writing everything else.

On a CUDA machine, after the project's own set-up (``pip install -e ".[test,bench]"`` over the
CUDA build of torch that matches the driver)::

    python -m bench.gpu --out bench/results/gpu
    python -m pytest -q -m "gpu or not gpu"      # the whole suite with the GPU tests selected

PyHessian 0.1's ``density()`` calls the removed ``torch.eig``; an ``eigh`` stand-in is patched in
for its calls (``bench.spectra.torch_eig_standin``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

import estimators
import spectra
from bench.models import import_transformers, make_resnet18, num_params
from bench.timing import sync
from curvature import GGN, Hessian, MFACInverse, TokenCrossEntropyLoss

log = logging.getLogger("bench.gpu")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (the full run, or ``--tiny`` for a CPU dry run)."""

    cnn_width: int = 64
    cnn_batch: int = 128
    cnn_image: int = 32
    lm_layers: int = 12
    lm_width: int = 768
    lm_heads: int = 12
    lm_vocab: int = 50257
    lm_seq: int = 256
    lm_batch: int = 4
    block_ks: tuple = (1, 4, 16, 64)
    hutchinson_probes: int = 100
    slq_probes: int = 8
    slq_steps: int = 100
    mfac_d: int = 10_000_000
    mfac_m: int = 1024
    optim_steps: int = 20
    repeats: int = 5
    peer_fused: str = "auto"  # hessian-eigenthings' kernel: Triton on CUDA, else torch.compile


TINY = Sizes(
    cnn_width=4, cnn_batch=4, cnn_image=8, lm_layers=1, lm_width=16, lm_heads=2, lm_vocab=97, lm_seq=8,
    lm_batch=2, block_ks=(1, 4), hutchinson_probes=4, slq_probes=2, slq_steps=5, mfac_d=10_000, mfac_m=8,
    optim_steps=3, repeats=2, peer_fused="eager",  # compiling the peer's kernel would take the dry run's minute
)


# ----------------------------------------------------------------------------------------- tools
def timed(fn: Callable[[], Any], *, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` synchronised calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device, row: dict[str, Any], key: str = "peak_MiB"):
    """Record the peak device memory allocated inside the block (CUDA only; ``None`` on a CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        yield
    finally:
        if device.type == "cuda":
            sync(device)
            row[key] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            row[key] = None


def lm_problem(sizes: Sizes, device: torch.device, *, attn: str = "eager", dtype=torch.float32):
    """A GPT-2-shaped LM from a config (random init) and one padded batch of token ids."""
    transformers = import_transformers()
    config = transformers.GPT2Config(
        n_layer=sizes.lm_layers, n_embd=sizes.lm_width, n_head=sizes.lm_heads, vocab_size=sizes.lm_vocab,
        n_positions=max(sizes.lm_seq, 8), attn_implementation=attn,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sizes.lm_vocab, (sizes.lm_batch, sizes.lm_seq), generator=gen)
    labels = ids.clone()
    labels[:, -max(1, sizes.lm_seq // 8):] = -100  # padded tails, as real batches have
    return model, (ids.to(device), labels.to(device))


def cnn_problem(sizes: Sizes, device: torch.device):
    model = make_resnet18(width=sizes.cnn_width, seed=0).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes.cnn_batch, 3, sizes.cnn_image, sizes.cnn_image, generator=gen)
    y = torch.randint(0, 10, (sizes.cnn_batch,), generator=gen)
    return model, (x.to(device), y.to(device))


def gradient_time(model, loss_fn, batch, *, repeats, device) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch

    def grad():
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        torch.autograd.grad(loss_fn(out, y), params)

    return timed(grad, repeats=repeats, device=device)


def probe(d: int, k: int, device: torch.device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(d, k, generator=gen, device=device, dtype=dtype)


def strategies() -> list[str]:
    """Every strategy the automatic choice picks from (the Hessian's exact backends)."""
    return [b for b in Hessian.backends if b not in ("auto", "finite_difference")]


# -------------------------------------------------------------------------------------- sections
def section_hvp(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for name, (model, batch), loss_fn in [
        ("cnn", cnn_problem(sizes, device), nn.CrossEntropyLoss()),
        ("lm", lm_problem(sizes, device), TokenCrossEntropyLoss(shift=True)),
    ]:
        row: dict[str, Any] = {"model": name, "d": num_params(model)}
        row["grad_s"] = gradient_time(model, loss_fn, batch, repeats=sizes.repeats, device=device)
        H = Hessian(model, loss_fn, batch)
        v = probe(H.shape[0], 1, device)[:, 0]
        with peak_memory(device, row):
            row["hvp_s"] = timed(lambda H=H, v=v: H @ v, repeats=sizes.repeats, device=device)
        row["hvp/grad"] = row["hvp_s"] / row["grad_s"]
        rows.append(row)
    return rows


def section_block(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    model, batch = cnn_problem(sizes, device)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    single_H = Hessian(model, loss_fn, batch, backend="loop")
    v = probe(single_H.shape[0], 1, device)[:, 0]
    single_s = timed(lambda: single_H @ v, repeats=sizes.repeats, device=device)
    for k in sizes.block_ks:
        V = probe(single_H.shape[0], k, device)
        auto = Hessian(model, loss_fn, batch)
        auto @ V  # the automatic choice measures and records its pick on the first products
        choice = auto.backend_choice(k)
        for backend in strategies():
            row: dict[str, Any] = {"k": k, "strategy": backend, "k_singles_s": k * single_s}
            try:
                H = Hessian(model, loss_fn, batch, backend=backend)
                with peak_memory(device, row):
                    row["block_s"] = timed(lambda H=H, V=V: H @ V, repeats=sizes.repeats, device=device)
                row["speedup"] = row["k_singles_s"] / row["block_s"]
            except Exception as exc:  # a strategy may not apply (out of memory, no forward-AD rule)
                row["block_s"] = row["speedup"] = None
                row["note"] = f"{type(exc).__name__}: {str(exc)[:80]}"
            row["auto_picks"] = getattr(choice, "backend", None)
            rows.append(row)
    return rows


def _eigenthings_ggn(model, batch, fused):
    """hessian-eigenthings' GGN with its fused cross-entropy kernel (Triton on CUDA, else compile)."""
    from hessian_eigenthings.loss_fns import hf_lm_loss_of_output
    from hessian_eigenthings.operators import GGNOperator

    ids, labels = batch
    data = [{"input_ids": ids, "labels": labels}]
    return GGNOperator(
        model, data, forward_fn=lambda m, b: m(input_ids=b["input_ids"]).logits,
        loss_of_output_fn=hf_lm_loss_of_output(fused=fused),
    )


def section_ggn_lm(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    model, batch = lm_problem(sizes, device)
    loss_fn = TokenCrossEntropyLoss(shift=True)
    G = GGN(model, loss_fn, batch)
    v = probe(G.shape[0], 1, device)[:, 0]
    rows: list[dict[str, Any]] = []
    row: dict[str, Any] = {"operator": "curvature GGN (lean cross-entropy)", "d": G.shape[0]}
    with peak_memory(device, row):
        row["product_s"] = timed(lambda: G @ v, repeats=sizes.repeats, device=device)
    rows.append(row)
    peer: dict[str, Any] = {"operator": "hessian-eigenthings GGN (fused kernel)", "d": G.shape[0]}
    try:
        E = _eigenthings_ggn(model, batch, sizes.peer_fused)
        with peak_memory(device, peer):
            peer["product_s"] = timed(lambda: E.matvec(v), repeats=sizes.repeats, device=device, warmup=2)
        peer["rel_diff"] = float((E.matvec(v) - G @ v).norm() / (G @ v).norm())
        row["ours/peer"] = row["product_s"] / peer["product_s"]
    except ImportError:
        peer["note"] = "hessian-eigenthings not installed (pip install -e '.[bench]')"
    rows.append(peer)
    return rows


def _pyhessian(model, loss_fn, batch, device):
    from pyhessian import hessian as pyhessian_hessian

    return pyhessian_hessian(model, loss_fn, data=batch, cuda=device.type == "cuda")


def section_hutchinson(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    model, batch = cnn_problem(sizes, device)
    loss_fn = nn.CrossEntropyLoss()
    n = sizes.hutchinson_probes
    row: dict[str, Any] = {"probes": n, "model": "cnn"}
    gen = torch.Generator(device=device)

    def ours():
        H = Hessian(model, loss_fn, batch)
        return estimators.trace(H, num_matvecs=n, generator=gen.manual_seed(0))

    with peak_memory(device, row, "ours_peak_MiB"):
        row["ours_s"] = timed(ours, repeats=max(1, sizes.repeats // 2), device=device)
    try:
        with peak_memory(device, row, "pyhessian_peak_MiB"):
            # tol=-1: never stop early, so both spend exactly n products
            row["pyhessian_s"] = timed(lambda: _pyhessian(model, loss_fn, batch, device).trace(maxIter=n, tol=-1),
                                       repeats=max(1, sizes.repeats // 2), device=device)
        row["speedup"] = row["pyhessian_s"] / row["ours_s"]
    except ImportError:
        row["note"] = "PyHessian not installed (pip install -e '.[bench]')"
    return [row]


def section_slq(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    from bench.spectra import torch_eig_standin

    model, batch = cnn_problem(sizes, device)
    loss_fn = nn.CrossEntropyLoss()
    p, s = sizes.slq_probes, sizes.slq_steps
    row: dict[str, Any] = {"probes x steps": f"{p} x {s}", "model": "cnn"}
    gen = torch.Generator(device=device)

    def ours():
        H = Hessian(model, loss_fn, batch)
        return spectra.slq(H, num_probes=p, num_steps=s, generator=gen.manual_seed(0))

    with peak_memory(device, row, "ours_peak_MiB"):
        row["ours_s"] = timed(ours, repeats=1, device=device, warmup=0)
    try:
        with torch_eig_standin(), peak_memory(device, row, "pyhessian_peak_MiB"):
            row["pyhessian_s"] = timed(lambda: _pyhessian(model, loss_fn, batch, device).density(iter=s, n_v=p),
                                       repeats=1, device=device, warmup=0)
        row["speedup"] = row["pyhessian_s"] / row["ours_s"]
    except ImportError:
        row["note"] = "PyHessian not installed (pip install -e '.[bench]')"
    return [row]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a large device-to-device copy (bytes read plus bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeats=5, device=device)
    return 2 * src.numel() * 4 / seconds


def section_mfac(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    d, m = sizes.mfac_d, sizes.mfac_m
    gen = torch.Generator(device=device).manual_seed(0)
    row: dict[str, Any] = {"d": d, "m": m}
    need = m * d * 4
    if device.type == "cuda" and 1.2 * need > torch.cuda.mem_get_info(device)[0]:
        m = int(0.8 * torch.cuda.mem_get_info(device)[0] / (d * 4))
        row["note"] = f"m lowered to {m} to fit the free device memory"
        row["m"], need = m, m * d * 4
    G = torch.randn(m, d, generator=gen, device=device)
    with peak_memory(device, row, "build_peak_MiB"):
        op = MFACInverse(G, damping=1e-4, inplace=True)  # G becomes the operator's factor: no copy
    x = torch.randn(d, generator=gen, device=device)
    row["ihvp_s"] = timed(lambda: op @ x, repeats=sizes.repeats, device=device)
    bandwidth = copy_bandwidth(device, min(need, 2**31))
    # the product reads the (m, d) factor twice (W x, then W^T c); everything else is O(d + m^2)
    row["bound_s"] = 2 * need / bandwidth
    row["bandwidth_GBps"] = bandwidth / 1e9
    row["ihvp/bound"] = row["ihvp_s"] / row["bound_s"]
    return [row]


def section_optim(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    from curvature.optim import AdaHessian, Sophia

    rows = []
    model, batch = lm_problem(sizes, device)
    loss_fn = TokenCrossEntropyLoss(shift=True)
    ids, labels = batch
    makers = {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-5),
        "Sophia": lambda ps: Sophia(ps, lr=1e-5, update_period=10),
        "AdaHessian": lambda ps: AdaHessian(ps, lr=1e-5, update_period=10),
    }

    def step_time(opt: torch.optim.Optimizer, row: dict[str, Any]) -> float:
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(ids).logits, labels)
            loss.backward()
            return loss

        with peak_memory(device, row):
            # at least one cycle of update_period steps, so the curvature refreshes are in the median
            return timed(lambda: opt.step(closure), repeats=max(sizes.optim_steps, 10), device=device)

    base = None
    for name, make in makers.items():
        row: dict[str, Any] = {"optimizer": name, "update_period": None if name == "AdamW" else 10}
        row["step_s"] = step_time(make(list(model.parameters())), row)
        base = row["step_s"] if name == "AdamW" else base
        row["step/AdamW"] = row["step_s"] / base
        rows.append(row)
    return rows


def section_fd(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    """Finite differences through the fused attention kernels, which have no double backward."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused, batch = lm_problem(sizes, device, attn="sdpa", dtype=dtype)
    reference, _ = lm_problem(sizes, device, attn="eager", dtype=torch.float32)
    loss_fn = TokenCrossEntropyLoss(shift=True)
    exact = Hessian(reference, loss_fn, batch, backend="loop")
    fd = Hessian(fused, loss_fn, batch, backend="finite_difference")
    v = probe(exact.shape[0], 1, device)[:, 0]
    row: dict[str, Any] = {"model": "lm", "fd_dtype": str(dtype).replace("torch.", "")}
    with peak_memory(device, row, "exact_peak_MiB"):
        row["exact_s"] = timed(lambda: exact @ v, repeats=sizes.repeats, device=device)
    with peak_memory(device, row, "fd_peak_MiB"):
        row["fd_s"] = timed(lambda: fd @ v.to(fd.dtype), repeats=sizes.repeats, device=device)
    ref = exact @ v
    row["rel_err"] = float((fd @ v.to(fd.dtype)).float().sub(ref).norm() / ref.norm())
    try:  # the exact backends must refuse the fused kernels by naming the finite-difference backend
        Hessian(fused, loss_fn, batch, backend="loop") @ v.to(fd.dtype)
        row["exact_on_fused"] = "ran"
    except Exception as exc:
        row["exact_on_fused"] = f"{type(exc).__name__}: {str(exc)[:60]}"
    return [row]


SECTIONS: dict[str, Callable[[Sizes, torch.device], list[dict[str, Any]]]] = {
    "hvp": section_hvp,
    "block": section_block,
    "ggn_lm": section_ggn_lm,
    "hutchinson": section_hutchinson,
    "slq": section_slq,
    "mfac": section_mfac,
    "optim": section_optim,
    "fd": section_fd,
}


# ---------------------------------------------------------------------------------------- output
def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    return env


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return str(value)
        return f"{value:.3g}"
    return "" if value is None else str(value)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# GPU benchmark ({'tiny dry run' if results['tiny'] else 'full sizes'})", ""]
    lines += [f"{env['date']}, {env['device']}, torch {env['torch']}, CUDA {env['cuda']}", ""]
    for name, section in results["sections"].items():
        lines += [f"## {name} ({section['seconds']:.1f} s)", ""]
        if "error" in section:
            lines += ["```", section["error"].strip(), "```", ""]
            continue
        rows = section["rows"]
        columns = list(dict.fromkeys(c for row in rows for c in row))
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU dry run in seconds")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = TINY if args.tiny else Sizes()
    names = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    results: dict[str, Any] = {"tiny": args.tiny, "sizes": asdict(sizes), "environment": environment(device),
                               "sections": {}}
    os.makedirs(args.out, exist_ok=True)
    failed = False
    for name in names:
        log.info("[gpu bench] %s ...", name)
        start = time.perf_counter()
        try:
            results["sections"][name] = {"rows": SECTIONS[name](sizes, device)}
        except Exception:
            failed = True
            results["sections"][name] = {"error": traceback.format_exc()}
            log.error("[gpu bench] %s failed:\n%s", name, results["sections"][name]["error"])
        results["sections"][name]["seconds"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # write after every section: a run cut short keeps what it finished
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(results))
    print(markdown(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
