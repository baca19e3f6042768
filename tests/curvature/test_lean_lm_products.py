"""Lean cross-entropy products (issue 22 item 1): the closed-form, chunked output Hessian in the
GGN/Fisher and the Hessian's double backward give the products of plain autograd (float64, 1e-12)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature import GGN, EmpiricalFisher, Fisher, Hessian
from curvature.losses import TokenCrossEntropyLoss, _cross_entropy
from tests.cases import IGNORE, concatenated, problem

f64 = torch.float64
TOL = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _flat_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _dense_truths(model, loss_fn, batches):
    """Dense float64 Hessian and GGN of the full-batch loss, by torch.func (independent of the library)."""
    x, y = concatenated(batches)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = _flat_params(model)
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def unflat(t):
        return {n: c.view_as(p) for n, c, p in zip(names, t.split(sizes), params)}

    def logits_of(t):
        return torch.func.functional_call(model, unflat(t), (x,))

    H = torch.func.hessian(lambda t: loss_fn(logits_of(t), y))(theta)
    out = logits_of(theta).detach()
    J = torch.func.jacrev(logits_of)(theta).reshape(out.numel(), -1)
    Hout = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return H, J.T @ Hout @ J


@pytest.mark.parametrize("layout", ["single_batch", "uneven", "fully_padded"])
def test_registry_tied_lm_equals_dense_truth_and_generic_path(layout):
    p = problem("tied_lm", "token_ce", layout)
    lean_loss = TokenCrossEntropyLoss()  # recognised: the lean path
    H_true, G_true = _dense_truths(p.model, p.loss_fn, p.batches)
    V = torch.randn(H_true.shape[0], 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    for cls, truth in ((Hessian, H_true), (GGN, G_true), (Fisher, G_true)):
        lean = cls(p.model, lean_loss, p.data, deterministic=True) @ V
        generic = cls(p.model, p.loss_fn, p.data, deterministic=True) @ V if cls is not Fisher else None
        assert _rel(lean, truth @ V) < 1e-10, cls.__name__
        if generic is not None:
            assert _rel(lean, generic) < TOL, cls.__name__


def _tiny_gpt2(vocab=13):
    from tests.app.cli_problems import import_transformers

    transformers = import_transformers()
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=vocab, n_positions=8,
                                  attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(f64).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    return model, {"input_ids": ids, "attention_mask": mask}, labels


def _hand_written_hvp(model, inputs, labels, V):
    """Reverse-over-reverse on the shifted cross-entropy as Hugging Face computes it."""
    params = _flat_params(model)
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    cols = []
    for v in V.T:
        vs = v.split([p.numel() for p in params])
        dot = sum((g * u.view_as(g)).sum() for g, u in zip(grads, vs))
        cols.append(torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params, retain_graph=True)]))
    return torch.stack(cols, 1)


def test_gpt2_hessian_equals_hand_written_hvp_and_ggn_the_generic_path():
    model, inputs, labels = _tiny_gpt2()
    d = sum(p.numel() for p in _flat_params(model))
    V = torch.randn(d, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    loss = TokenCrossEntropyLoss(shift=True)
    truth = _hand_written_hvp(model, inputs, labels, V)
    for backend in ("loop", "vmap"):
        assert _rel(Hessian(model, loss, (inputs, labels), backend=backend) @ V, truth) < TOL, backend

    def generic(o, t):  # a lambda: the generic (autograd) output Hessian and recorded normalizer
        return F.cross_entropy(o[:, :-1].reshape(-1, o.shape[-1]), t[:, 1:].reshape(-1))

    lean = GGN(model, loss, (inputs, labels), deterministic=True) @ V
    assert _rel(lean, GGN(model, generic, (inputs, labels), deterministic=True) @ V) < TOL
    # The empirical Fisher of token cross-entropy: (1/Z) sum over counted tokens of g_u g_u^T.
    params = _flat_params(model)
    logits = model(**inputs).logits[:, :-1]
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    counted = (targets.reshape(-1) != IGNORE).nonzero().flatten().tolist()
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll[u], params, retain_graph=True)])
                     for u in counted])
    ef = EmpiricalFisher(model, loss, (inputs, labels)) @ V
    assert _rel(ef, G.T @ (G @ V) / len(counted)) < TOL
    # The exact Fisher of cross-entropy is its GGN.
    assert _rel(Fisher(model, loss, (inputs, labels)) @ V, GGN(model, generic, (inputs, labels)) @ V) < TOL


@pytest.mark.parametrize("options", [
    {"label_smoothing": 0.1},
    {"weight": torch.linspace(0.5, 2.0, 5, dtype=f64)},
    {"weight": torch.linspace(0.5, 2.0, 5, dtype=f64), "label_smoothing": 0.2, "reduction": "sum"},
])
def test_cross_entropy_options_equal_plain_autograd(options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(f64)
    x = torch.randn(9, 3, dtype=f64)
    y = torch.tensor([0, 1, 2, 3, 4, IGNORE, 1, 2, IGNORE])
    loss = nn.CrossEntropyLoss(ignore_index=IGNORE, **options)
    d = sum(p.numel() for p in model.parameters())
    V = torch.randn(d, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model(x), y), params, create_graph=True)
    truth = torch.stack([
        torch.cat([h.reshape(-1) for h in torch.autograd.grad(
            sum((g * u.view_as(g)).sum() for g, u in zip(grads, v.split([p.numel() for p in params]))),
            params, retain_graph=True)])
        for v in V.T], 1)
    assert _rel(Hessian(model, loss, (x, y)) @ V, truth) < TOL

    def generic(o, t):
        return loss(o, t)

    red = options.get("reduction", "mean")
    for cls in (GGN, EmpiricalFisher):
        lean = cls(model, loss, (x, y), deterministic=True) @ V
        ref = cls(model, generic, (x, y), deterministic=True, reduction=red) @ V
        assert _rel(lean, ref) < TOL, cls.__name__


def test_chunked_closed_forms_equal_dense_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(_cross_entropy, "CHUNK_ELEMENTS", 7)  # several rows per chunk, ragged last chunk
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, dtype=f64, generator=g, requires_grad=True)
    y = torch.tensor([0, 2, IGNORE, 1, 1, 0, IGNORE, 2, 2, 0])
    w = torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    t = _cross_entropy.TokenTargets.build(y, 3, ignore_index=IGNORE, label_smoothing=0.1, weight=w, dtype=f64,
                                          device=x.device)
    z = float(w[y[y != IGNORE]].sum())
    ref = F.cross_entropy(x, y, weight=w, label_smoothing=0.1, ignore_index=IGNORE)
    lean = _cross_entropy.lean_cross_entropy(x, t, z)
    assert abs(float(lean.detach() - ref.detach())) < TOL
    U = torch.randn(10, 3, dtype=f64, generator=g)
    (g1,) = torch.autograd.grad(ref, x, create_graph=True)
    (g2,) = torch.autograd.grad(lean, x, create_graph=True)
    assert _rel(g2, g1) < TOL
    assert _rel(torch.autograd.grad(g2, x, U)[0], torch.autograd.grad(g1, x, U)[0]) < TOL


_MEMORY_CHILD = r"""
import json, torch
from torch import nn
from curvature import GGN, Hessian
from curvature.losses import TokenCrossEntropyLoss

class TiedLM(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
    def forward(self, ids):
        return torch.tanh(self.mix(self.embed(ids))) @ self.embed.weight.T

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
model = TiedLM(20000, 32).eval()
ids = torch.randint(0, 20000, (4, 128))
labels = ids.clone(); labels[1, 60:] = -100
loss = TokenCrossEntropyLoss(shift=True)
v = torch.randn(sum(p.numel() for p in model.parameters()))
jobs = {
    "gradient": lambda: torch.autograd.grad(loss(model(ids), labels), list(model.parameters())),
    "hessian": lambda: Hessian(model, loss, (ids, labels), deterministic=True) @ v,
    "ggn": lambda: GGN(model, loss, (ids, labels), deterministic=True) @ v,
}
peaks = {}
for job, run in jobs.items():
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    run()
    peaks[job] = status("VmHWM") - before
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc")
def test_peak_memory_of_lm_products_is_bounded():
    """Peak RSS above the loaded model as a multiple of a gradient's, on a small-vocabulary tied LM
    (logits 4 x 128 x 20,000). Before the lean products: Hessian 2.85x, GGN 2.56x; after: 1.88x, 0.97x.
    Every large allocation is mmapped (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the RSS and
    one process measures the jobs one after another."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "MALLOC_MMAP_THRESHOLD_": "65536"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], check=True, capture_output=True, text=True,
                         env=env, cwd=str(root))
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = {job: peaks[job] / peaks["gradient"] for job in ("hessian", "ggn")}
    assert ratios["hessian"] < 2.6, ratios
    assert ratios["ggn"] < 2.0, ratios
