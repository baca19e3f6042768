"""Dense float64 references built with torch.func, independent of the operators under test."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev, vmap


def _math_sdpa(fn):
    """References differentiate through attention too: use the reference kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def wrapper(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args, **kwargs)

    return wrapper


def _concat(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def _flat(tensors_by_param, names, shapes):
    return torch.cat([tensors_by_param[n].reshape(-1) for n in names])


def param_dict(model, names):
    return {n: p.detach() for n, p in model.named_parameters() if n in names}


def _assemble(blocks, names, numels):
    """blocks[i][j] with shape (*p_i, *p_j) -> dense (d, d)."""
    rows = []
    for i, _ni in enumerate(names):
        rows.append(torch.cat([blocks[i][j].reshape(numels[i], numels[j]) for j in range(len(names))], 1))
    return torch.cat(rows, 0)


def make_fn(model, names, x):
    others = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    others.update(dict(model.named_buffers()))

    def f(*ps):
        return functional_call(model, {**others, **dict(zip(names, ps))}, (x,))

    return f


@_math_sdpa
def dense_hessian(model, loss_fn, batches, names):
    x, y = _concat(batches)
    primals = tuple(param_dict(model, names)[n] for n in names)
    f = make_fn(model, names, x)
    # torch.autograd.functional (no vmap): torch.func.hessian/jacrev(jacrev) return wrong rows for
    # LayerNorm weights in torch 2.13 (asymmetric, off from finite differences by ~40%).
    H = torch.autograd.functional.hessian(lambda *ps: loss_fn(f(*ps), y), primals)
    return _assemble(H, names, [p.numel() for p in primals])


@_math_sdpa
def jacobian(model, names, x):
    primals = tuple(param_dict(model, names)[n] for n in names)
    f = make_fn(model, names, x)
    out = f(*primals)
    J = jacrev(f, argnums=tuple(range(len(names))))(*primals)
    return out, torch.cat([j.reshape(out.numel(), -1) for j in J], 1)


@_math_sdpa
def dense_ggn(model, loss_fn, batches, names):
    x, y = _concat(batches)
    out, J = jacobian(model, names, x)
    HF = hessian(lambda o: loss_fn(o, y))(out.detach()).reshape(out.numel(), out.numel())
    return J.T @ HF @ J


def kappa(kind, reduction, out):
    if reduction == "sum":
        return 1.0
    return 1.0 / (out.shape[0] if kind == "ce" else out.numel())


@_math_sdpa
def dense_fisher(model, kind, reduction, batches, names):
    """True Fisher by explicit expectation over labels (enumerated for CE, analytic for MSE/BCE)."""
    x, y = _concat(batches)
    out, J = jacobian(model, names, x)
    N, C = out.shape
    J = J.reshape(N, C, -1)
    k = kappa(kind, reduction, out)
    d = J.shape[-1]
    Fm = torch.zeros(d, d, dtype=out.dtype)
    for n in range(N):
        if kind == "ce":
            p = torch.softmax(out[n], 0)
            for c in range(C):
                r = p - F.one_hot(torch.tensor(c), C).to(p.dtype)
                g = J[n].T @ r
                Fm += k * p[c] * torch.outer(g, g)
        elif kind == "mse":
            Fm += k * 2.0 * J[n].T @ J[n]
        else:  # bce: each output an independent Bernoulli; enumerate both labels
            s = torch.sigmoid(out[n])
            for c in range(C):
                for label, prob in ((1.0, s[c]), (0.0, 1 - s[c])):
                    g = J[n, c] * (s[c] - label)
                    Fm += k * prob * torch.outer(g, g)
    return Fm


def raw_sample_loss(kind):
    if kind == "ce":
        return lambda o, t: F.cross_entropy(o[None], t[None], reduction="sum")
    if kind == "mse":
        return lambda o, t: F.mse_loss(o, t, reduction="sum")
    return lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum")


@_math_sdpa
def dense_empirical_fisher(model, kind, reduction, batches, names):
    """kappa * sum_n g_n g_n^T from per-sample gradients via vmap(grad)."""
    x, y = _concat(batches)
    primals = tuple(param_dict(model, names)[n] for n in names)
    others = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    others.update(dict(model.named_buffers()))
    ell = raw_sample_loss(kind)

    def sample_loss(ps, xn, yn):
        out = functional_call(model, {**others, **dict(zip(names, ps))}, (xn[None],))[0]
        return ell(out, yn)

    G = vmap(grad(sample_loss), in_dims=(None, 0, 0))(primals, x, y)
    G = torch.cat([g.reshape(x.shape[0], -1) for g in G], 1)
    out = make_fn(model, names, x)(*primals)
    return kappa(kind, reduction, out) * G.T @ G


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
