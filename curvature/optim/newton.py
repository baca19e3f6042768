"""Gradient-regularized Newton steps ``−(B + λ I)⁻¹ g`` with ``λ = ‖g‖ / γ`` and an adaptive ``γ``
(Mishchenko 2023; Doikov, Mishchenko and Nesterov 2024; "Gradient-Normalized Smoothness for
Optimization with Approximate Hessians"), solved matrix-free by the toolkit's CG."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import CGInverse, LinearOperator, NegativeCurvatureError
from ..checks import check_count, check_real
from ._buffers import buffers_restored
from ._common import NonFiniteError, evaluate_closure

__all__ = ["GradientRegularizedNewton", "NewtonStepInfo"]


@dataclass(frozen=True)
class NewtonStepInfo:
    """What one :class:`GradientRegularizedNewton` step did.

    Attributes:
        step: step number (1-based).
        loss: loss at the start of the step.
        new_loss: loss after the step (``loss`` if every trial was rejected).
        grad_norm: ``‖g‖`` at the start of the step.
        gamma: ``γ`` after the step (doubled on acceptance, halved per rejection).
        damping: ``λ`` of the accepted trial (of the last trial if none was accepted).
        trials: trials run (one solve and one closure call each).
        rejections: trials rejected (failed decrease test, non-finite loss or an indefinite
            ``B + λI``).
        accepted: whether the parameters moved.
        cg_iterations: CG iterations over all trials.
        converged: the step found nothing left to do (``‖g‖ <= grad_tol``, a trial that changes
            the loss only in its last bits, or no parameter at all), so the remaining trials were
            not run.

    Examples:
        >>> NewtonStepInfo(1, 1.0, 0.5, 2.0, 2.0, 2.0, 1, 0, True, 3).to_dict()["accepted"]
        True
    """

    step: int
    loss: float
    new_loss: float
    grad_norm: float
    gamma: float
    damping: float
    trials: int
    rejections: int
    accepted: bool
    cg_iterations: int
    converged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GradientRegularizedNewton(Optimizer):
    """Regularized Newton: ``θ⁺ = θ − (B + λ I)⁻¹ g`` with ``λ = ‖g‖ / γ``, accepted when
    ``f(θ) − f(θ⁺) >= ‖∇f(θ⁺)‖² / (8 λ)``.

    ``B`` is a curvature operator of the current batch at the current parameters: the GGN or
    Fisher (positive semi-definite; the exact Hessian for logistic/softmax regression) or the
    Hessian. Each step:

    1. calls ``closure`` for ``f`` and ``g`` at ``θ``;
    2. for up to ``max_trials`` trials: ``λ = ‖g‖/γ``; solves ``(B + λI) s = −g`` by CG
       (:func:`curvature.inverse`, relative tolerance ``min(0.1, ‖g‖^{1/2})``, the inexact-Newton
       forcing term); calls ``closure`` at ``θ + s``; on the decrease test ``γ ← 2γ`` and stop,
       otherwise (or on a non-finite loss, or when CG meets negative curvature of an indefinite
       Hessian) the parameters are restored bit-exactly and ``γ ← max(γ/2, γ_min)``;
    3. if every trial failed the parameters stay where they were (never a rejected step), and
       ``.grad`` holds the gradient at ``θ`` again.

    Stopping: a step with ``‖g‖ <= grad_tol`` runs no trial; a rejected trial whose loss differs
    from ``f(θ)`` by at most ``8 ε_mach |f(θ)|`` (the decrease test cannot decide), or whose step
    changes no parameter in floating point, ends the step; these set
    ``last_step_info.converged``. A rejection at ``γ = gamma_min`` also ends the step (the next
    trial would repeat it). Without them, once converged every step would spend all
    ``max_trials`` trials (the decrease test cannot pass when ``f`` changes only in its last
    bits). The extra closure calls of the trials leave the buffers of the modules they call
    (BatchNorm statistics) as they were.

    Doubling ``γ`` makes ``λ`` shrink geometrically while the model is good (a Newton-like,
    superlinear tail); halving it makes the step a short, gradient-like one. The closure must
    evaluate the same batch on every call of one step (the test compares exact losses), with
    dropout and BatchNorm in eval mode (the operators refuse train-mode models by default).

    Usage (``curvature`` is keyword-only and required)::

        opt = GradientRegularizedNewton(model.parameters())
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss
        opt.step(closure, curvature=curvature.GGN(model, loss_fn, (X, y)))

    State: ``γ`` and the step count (in :meth:`state_dict`). :attr:`last_step_info` is a
    :class:`NewtonStepInfo`. The operator must cover exactly the optimizer's parameters.

    Args:
        params: parameters (one group; all must be covered by the operator).
        gamma: initial ``γ`` (scale-free: ``γ`` is invariant to the loss's mean/sum reduction).
        gamma_min: lower bound of ``γ``.
        max_trials: trials per step.
        cg_max_iter: CG iteration cap per solve (the last iterate is used if it is hit).
        cg_tol: fixed relative CG tolerance instead of the forcing rule ``min(0.1, ‖g‖^{1/2})``
            (tight values make every trial on a quadratic acceptable; the forcing rule is cheaper).
        grad_tol: no trial is run when ``‖g‖ <= grad_tol`` (``0``: only the round-off stop).

    Weight decay is not an option: put an L2 term in the loss. Note that a GGN or Fisher covers
    only the part of the loss that goes through the model's outputs: a penalty on the parameters
    is in :class:`curvature.Hessian` but not in them, and that model error (``μ`` for ``μ/2‖θ‖²``)
    makes the convergence linear instead of superlinear.

    Examples:
        >>> import curvature
        >>> X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.5, -1.5], [2.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> torch.nn.init.zeros_(model.weight)
        Parameter containing:
        tensor([[0., 0.]], dtype=torch.float64, requires_grad=True)
        >>> loss_fn = lambda out, t: torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], t) \\
        ...     + 0.05 * model.weight.square().sum()
        >>> opt = GradientRegularizedNewton(model.parameters())
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = loss_fn(model(X), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(15):
        ...     _ = opt.step(closure, curvature=curvature.Hessian(model, loss_fn, (X, y)))
        >>> bool(model.weight.grad.norm() < 1e-8)
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        gamma: float = 1.0,
        gamma_min: float = 1e-9,
        max_trials: int = 40,
        cg_max_iter: int = 200,
        cg_tol: float | None = None,
        grad_tol: float = 0.0,
    ):
        defaults = dict(
            gamma=check_real(gamma, name="gamma", low=0.0, low_open=True),
            gamma_min=check_real(gamma_min, name="gamma_min", low=0.0, low_open=True),
            max_trials=check_count(max_trials, name="max_trials"),
            cg_max_iter=check_count(cg_max_iter, name="cg_max_iter"),
            cg_tol=None if cg_tol is None else check_real(cg_tol, name="cg_tol", low=0.0, high=1.0,
                                                          low_open=True, high_open=True),
            grad_tol=check_real(grad_tol, name="grad_tol", low=0.0),
        )
        if defaults["gamma_min"] > defaults["gamma"]:
            raise ValueError(f"gamma_min must be <= gamma, got gamma_min={gamma_min}, gamma={gamma}")
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("GradientRegularizedNewton takes one parameter group (the step is global)")
        self.last_step_info: NewtonStepInfo | None = None

    @property
    def _global(self) -> dict[str, Any]:
        state = self.state[self.param_groups[0]["params"][0]]
        if "gamma" not in state:
            state["gamma"] = float(self.param_groups[0]["gamma"])
            state["global_step"] = 0
        return state

    def _operator_params(self, op: Any) -> list[Tensor]:
        if not isinstance(op, LinearOperator) or getattr(op, "params", None) is None:
            raise TypeError(
                "curvature must be a curvature operator of the current batch, e.g. "
                f"curvature.GGN(model, loss_fn, (X, y)), got {type(op).__name__}"
            )
        mine = {id(p) for p in self.param_groups[0]["params"]}
        theirs = {id(q) for q in op.params}
        if mine != theirs:
            raise ValueError(
                "the curvature operator must be built over exactly the optimizer's parameters "
                f"({len(mine)} tensors), got {len(theirs)} ({len(theirs & mine)} in common): pass params= to it"
            )
        return list(op.params)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, curvature: Any = None) -> Tensor:  # type: ignore[override]
        """One regularized Newton step; returns the loss at the start of the step."""
        loss = evaluate_closure(closure, what="GradientRegularizedNewton.step")
        if curvature is None:
            raise TypeError("GradientRegularizedNewton.step needs curvature=, an operator such as "
                            "curvature.GGN(model, loss_fn, (X, y)) of the closure's batch")
        params = self._operator_params(curvature)
        grad_objects = [p.grad for p in params]
        # Copies: an in-place zeroing closure overwrites the .grad tensors during the trials.
        grads0 = [None if g is None else g.detach().clone() for g in grad_objects]
        g = curvature.flatten([torch.zeros_like(p) if p.grad is None else p.grad for p in params]).to(curvature.dtype)
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError("the gradient is not finite; nothing was updated")
        gnorm = float(torch.linalg.vector_norm(g.double()))
        glob = self._global
        t = glob["global_step"] + 1
        group = self.param_groups[0]
        gamma, gamma_min = float(glob["gamma"]), float(group["gamma_min"])
        f0 = float(loss.detach())
        f_eps = torch.finfo(loss.dtype).eps if loss.is_floating_point() else torch.finfo(torch.float32).eps
        x0 = [p.detach().clone() for p in params]
        trials = rejections = cg_iters = 0
        accepted, new_loss, lam = False, f0, math.nan
        converged = gnorm <= group["grad_tol"]
        if gnorm > 0 and not converged:
            for _ in range(group["max_trials"]):
                trials += 1
                lam = gnorm / gamma
                tol = group["cg_tol"] or min(0.1, max(math.sqrt(gnorm), 1e-12))
                try:
                    inv = CGInverse(curvature, damping=lam, tol=tol, max_iter=group["cg_max_iter"])  # curvature.inverse
                    s = -(inv @ g)
                    cg_iters += inv.last_info.max_iterations if inv.last_info else 0
                except NegativeCurvatureError:
                    rejections += 1
                    gamma = max(gamma / 2, gamma_min)
                    continue
                for p, p0, si in zip(params, x0, curvature.unflatten(s)):
                    p.copy_(p0 + si.to(p.dtype))
                if all(torch.equal(p, p0) for p, p0 in zip(params, x0)):
                    converged = True  # the step is below round-off; larger λ only shortens it
                    rejections += 1
                    break
                try:
                    with buffers_restored():
                        f_new = float(evaluate_closure(closure, what="a GradientRegularizedNewton trial").detach())
                    g_new = torch.sqrt(sum(
                        (torch.zeros((), dtype=torch.float64) if p.grad is None else p.grad.double().square().sum())
                        for p in params
                    ))
                    ok = f0 - f_new >= float(g_new) ** 2 / (8 * lam)
                except NonFiniteError:
                    ok = False
                if ok:
                    accepted, new_loss = True, f_new
                    gamma *= 2
                    break
                rejections += 1
                for p, p0 in zip(params, x0):
                    p.copy_(p0)
                if abs(f0 - f_new) <= 8 * f_eps * abs(f0):
                    converged = True  # f changed only in its last bits: the test cannot decide
                    gamma = max(gamma / 2, gamma_min)
                    break
                if gamma <= gamma_min:
                    break  # the next trial would repeat this one (same λ)
                gamma = max(gamma / 2, gamma_min)
            if not accepted:
                for p, p0, obj, g0 in zip(params, x0, grad_objects, grads0):
                    p.copy_(p0)
                    if obj is not None and g0 is not None:
                        obj.copy_(g0)  # the tensor the step's closure left, with its values
                    p.grad = obj
        glob["gamma"] = gamma
        glob["global_step"] = t
        self.last_step_info = NewtonStepInfo(t, f0, new_loss, gnorm, gamma, lam, trials, rejections, accepted,
                                             cg_iters, converged)
        return loss
