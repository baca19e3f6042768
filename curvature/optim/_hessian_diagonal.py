"""Hutchinson curvature estimates ``u ⊙ (H u)`` for optimizers that only get a plain closure.

Two routes to ``H u`` (no ``create_graph=True`` anywhere):

* **finite differences of gradients** through the user's closure, at ``θ ± ε u`` (central, two
  closure calls) or ``θ + ε u`` (forward, one call, reusing the step's gradient). The step is
  ``ε = t · max(1, ‖θ‖₂) / ‖u‖₂`` with ``t = ε_mach^{1/3}`` (central) or ``ε_mach^{1/2}``
  (forward), the truncation/round-off balance of each scheme, for the *least precise* dtype among
  the parameters: one difference of gradients gives ``H (ε u)`` only with one ``ε`` for every
  parameter, and a step below the resolution of the coarsest dtype would round its perturbation
  away (a float32 step on a bfloat16 tensor). Around every extra call the global (and CUDA) RNG
  state is replayed to what the step's own closure call saw, so dropout masks are the same in
  every call, and left afterwards as one closure call leaves it; the parameters are copied back
  from saved copies (bit-exact, not ``θ + ε u − ε u``); the step's gradients are kept as copies
  (closures that zero ``.grad`` in place overwrite the tensors) and put back into the same tensor
  objects; the buffers of every module the closure calls (BatchNorm statistics) are restored
  (:func:`buffers_restored`).
* **an operator**: any square curvature operator over the same parameters (for example
  ``curvature.Hessian(model, loss_fn, batch)``): exact products, ``op @ u``.

Probes are Rademacher vectors from the optimizer's own generator, drawn over the concatenation of
the parameters that have gradients (in parameter-group order), so every data-parallel rank with
the same seed draws the same probes; with DDP the closure's gradients are already averaged over
ranks, so the difference of two of them is the rank-averaged product.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import LinearOperator, working_dtype
from ..probes import draw_probes
from ._buffers import buffers_restored
from ._common import NonFiniteError, evaluate_closure

__all__ = [
    "RNGReplay",
    "check_finite_grads",
    "check_finite_products",
    "default_rel_step",
    "draw_param_probes",
    "fd_products",
    "fd_step",
    "hutchinson_refresh",
    "operator_products",
]

FD_SCHEMES = ("central", "forward")


def default_rel_step(dtype: torch.dtype, scheme: str) -> float:
    """``ε_mach^{1/3}`` (central) or ``ε_mach^{1/2}`` (forward) of ``dtype``.

    Examples:
        >>> round(default_rel_step(torch.float64, "central"), 9)
        6.055e-06
    """
    eps = torch.finfo(dtype).eps
    return eps ** (1 / 3) if scheme == "central" else eps**0.5


class RNGReplay:
    """Capture the global (CPU and CUDA) RNG state before the step's closure call, replay it before
    each extra call and leave it, at the end, where the step's own call left it."""

    def __init__(self, params: Sequence[Tensor]):
        self.cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        self.before = self._get()
        self.after: tuple[Tensor, list[Tensor]] | None = None

    def _get(self) -> tuple[Tensor, list[Tensor]]:
        cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        return torch.get_rng_state(), cuda

    def _set(self, state: tuple[Tensor, list[Tensor]]) -> None:
        torch.set_rng_state(state[0])
        for d, s in zip(self.cuda_devices, state[1]):
            torch.cuda.set_rng_state(s, d)

    def mark_after(self) -> None:
        self.after = self._get()

    def replay(self) -> None:
        self._set(self.before)

    def finish(self) -> None:
        if self.after is not None:
            self._set(self.after)


def draw_param_probes(
    params: Sequence[Tensor], generator: torch.Generator, distribution: str = "rademacher"
) -> list[Tensor]:
    """One probe per parameter (state dtype), from one flat draw over all of them."""
    total = sum(p.numel() for p in params)
    dtype = working_dtype(params[0].dtype)
    flat = draw_probes(total, 1, distribution, dtype=dtype, device=params[0].device, generator=generator)[:, 0]
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].view_as(p).to(working_dtype(p.dtype)))
        offset += p.numel()
    return out


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    """Copies (never references: an in-place zeroing closure would overwrite them) in the working dtype."""
    return [
        torch.zeros(p.shape, dtype=working_dtype(p.dtype), device=p.device)
        if p.grad is None
        else p.grad.to(working_dtype(p.dtype), copy=True)
        for p in params
    ]


def fd_step(params: Sequence[Tensor], probes: Sequence[Tensor], scheme: str, rel_step: float | None = None) -> float:
    """The finite-difference step ``ε = t · max(1, ‖θ‖₂) / ‖u‖₂`` (module doc), ``t`` from the
    least precise parameter dtype unless ``rel_step`` is given.

    Examples:
        >>> w = [torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.bfloat16)]
        >>> u = [torch.ones(4, dtype=torch.float64), torch.ones(4)]
        >>> round(fd_step(w, u, "forward"), 4)  # sqrt(ε_mach(bfloat16)) = 0.0884, as ‖θ‖ = ‖u‖
        0.0884
    """
    if rel_step is None:
        coarsest = max({p.dtype for p in params}, key=lambda d: torch.finfo(d).eps)
        rel_step = default_rel_step(coarsest, scheme)
    theta_norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.detach(), dtype=torch.float64).cpu() for p in params]))
    probe_norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(u, dtype=torch.float64).cpu() for u in probes]))
    return float(rel_step * torch.clamp(theta_norm, min=1.0) / probe_norm.clamp_min(1e-300))


@torch.no_grad()
def fd_products(
    params: Sequence[Tensor],
    closure: Callable[[], Any],
    probes: Sequence[Tensor],
    *,
    scheme: str = "central",
    rel_step: float | None = None,
    rng: RNGReplay | None = None,
    model: nn.Module | None = None,
) -> list[Tensor]:
    """``H u`` per parameter by finite differences of the closure's gradients (see the module doc).

    The gradients present on entry are the gradients at ``θ`` (the step's own closure call): the
    forward scheme differences against a copy of them, and they are what ``.grad`` holds on exit.
    """
    if scheme not in FD_SCHEMES:
        raise ValueError(f"fd_scheme must be one of {FD_SCHEMES}, got {scheme!r}")
    eps = fd_step(params, probes, scheme, rel_step)
    saved_params = [p.detach().clone() for p in params]
    grad_objects = [p.grad for p in params]
    base = _grads(params)  # copies: an in-place zeroing closure overwrites the .grad tensors

    def grads_at(sign: float) -> list[Tensor]:
        for p, p0, u in zip(params, saved_params, probes):
            if p.dtype == u.dtype:
                torch.add(p0, u, alpha=sign * eps, out=p)
            else:
                p.copy_(torch.add(p0.to(u.dtype), u, alpha=sign * eps))
        if rng is not None:
            rng.replay()
        try:
            with buffers_restored(model):
                evaluate_closure(closure, what="a finite-difference curvature estimate")
            return _grads(params)
        finally:
            for p, p0 in zip(params, saved_params):
                p.copy_(p0)

    try:
        if scheme == "central":
            plus, minus = grads_at(1.0), grads_at(-1.0)
            out = [gp.sub_(gm).div_(2 * eps) for gp, gm in zip(plus, minus)]
        else:
            plus = grads_at(1.0)
            out = [gp.sub_(g0).div_(eps) for gp, g0 in zip(plus, base)]
    finally:
        for p, g, g0 in zip(params, grad_objects, base):
            if g is not None:
                g.copy_(g0)  # the same tensor object the step's closure left, with its values
            p.grad = g
        if rng is not None:
            rng.finish()
    check_finite_products(out)
    return out


def hutchinson_refresh(
    optimizer: Any,
    closure: Callable[[], Any] | None,
    *,
    refresh: bool | Callable[[list[Tensor]], bool],
    curvature: Any,
    scheme: str,
    model: nn.Module | None,
    what: str,
) -> tuple[Tensor | None, list[tuple[dict[str, Any], Tensor]], dict[Tensor, Tensor]]:
    """The first half of a Sophia-H or AdaHessian step: the closure call, the parameters with
    gradients and, on refresh steps, the Hutchinson estimates ``u ⊙ Hu`` per parameter (finite
    differences through ``closure``, or exact products of the operator ``curvature``).
    ``refresh`` may be a function of the parameters that have gradients.

    Returns ``(loss or None, [(group, param)], {param: u ⊙ Hu})``. Nothing is updated.
    """
    t = optimizer.global_step + 1
    if refresh is True and closure is None and curvature is None:
        evaluate_closure(None, what=f"{what} refresh step {t}")
    rng, loss = None, None
    if closure is not None:
        if curvature is None and refresh is not False:  # replayed for the finite-difference calls only
            rng = RNGReplay([p for g in optimizer.param_groups for p in g["params"]])
        loss = evaluate_closure(closure, what=f"{what} step {t}")
        if rng is not None:
            rng.mark_after()
    items = list(optimizer._params_with_grad())
    params = [p for _, p in items]
    check_finite_grads(params, t)
    if callable(refresh):
        refresh = bool(refresh(params))
        if refresh and closure is None and curvature is None:
            evaluate_closure(None, what=f"{what} refresh step {t}")
    estimates: dict[Tensor, Tensor] = {}
    if refresh and params:
        probes = draw_param_probes(params, optimizer.generator)
        if curvature is not None:
            products = operator_products(curvature, params, probes)
        else:
            products = fd_products(params, closure, probes, scheme=scheme, rng=rng, model=model)  # type: ignore[arg-type]
        estimates = {p: hu.mul_(u) for p, u, hu in zip(params, probes, products)}  # the products are ours
    return loss, items, estimates


def _first_non_finite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor with a NaN/inf entry, or None; one device sync for all of them.

    A norm is NaN/inf exactly when some entry is (and is 25x cheaper than ``isfinite().all()``),
    except for overflow of huge finite entries, which are as unusable.
    """
    if not tensors:
        return None
    norms = torch.stack([torch.linalg.vector_norm(t).to(device=tensors[0].device, dtype=torch.float32)
                         for t in tensors])
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return None
    return int(torch.nonzero(~finite)[0, 0])


def check_finite_products(products: Sequence[Tensor]) -> None:
    i = _first_non_finite(products)
    if i is not None:
        raise NonFiniteError(f"the curvature estimate of parameter {i} is not finite; nothing was updated")


def check_finite_grads(params: Sequence[Tensor], step: int) -> None:
    i = _first_non_finite([p.grad for p in params])  # type: ignore[misc]
    if i is not None:
        raise NonFiniteError(f"the gradient of parameter {i} is not finite at step {step}; nothing was updated")


@torch.no_grad()
def operator_products(op: Any, params: Sequence[Tensor], probes: Sequence[Tensor]) -> list[Tensor]:
    """``H u`` per parameter from a curvature operator over (a superset of) ``params``.

    The operator's own parameter list (``op.params``) fixes its flat order; parameters of the
    optimizer that the operator does not cover are refused, operator parameters the optimizer does
    not update get a zero probe.
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"curvature must be a curvature operator (e.g. curvature.Hessian(model, loss_fn, batch)), "
                        f"got {type(op).__name__}")
    op_params = getattr(op, "params", None)
    if op_params is None:
        raise TypeError("curvature must be a model operator with .params (curvature.Hessian, GGN, Fisher, ...)")
    index = {id(q): i for i, q in enumerate(op_params)}
    missing = [i for i, p in enumerate(params) if id(p) not in index]
    if missing:
        raise ValueError(f"the curvature operator does not cover optimizer parameters {missing[:5]} "
                         "(build it with params= that include every parameter the optimizer updates)")
    pieces = [torch.zeros(q.shape, dtype=op.dtype, device=op.device) for q in op_params]
    for p, u in zip(params, probes):
        pieces[index[id(p)]] = u.to(op.dtype)
    Hu = op.unflatten(op @ op.flatten(pieces))
    out = [Hu[index[id(p)]].to(working_dtype(p.dtype)) for p in params]
    check_finite_products(out)
    return out
