"""Sophia (Liu et al., ICLR 2024): clipped diagonal-Newton steps with a periodically refreshed
curvature EMA, with the Hutchinson ("H") or Gauss-Newton-Bartlett ("G") estimator."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import select_output, working_dtype
from ..checks import check_betas, check_choice, check_count, check_real
from ._common import CurvatureOptimizer, NonFiniteError
from ._hessian_diagonal import FD_SCHEMES, hutchinson_refresh

__all__ = ["Sophia", "SophiaStepInfo", "sophia_update"]

ESTIMATORS = ("hutchinson", "gnb")
TIMINGS = ("paper", "official")


@dataclass(frozen=True)
class SophiaStepInfo:
    """Diagnostics of one Sophia step.

    Attributes:
        step: the step number (1-based).
        refreshed: whether the curvature EMA was refreshed before this step.
        win_rate: fraction of coordinates NOT clipped, ``|m| < ρ h`` (the paper's tuning signal:
            aim for 0.1-0.5; a larger ``rho`` raises it).
        clip_fraction: ``1 − win_rate``.

    Examples:
        >>> SophiaStepInfo(1, True, 0.25, 0.75).to_dict()["win_rate"]
        0.25
    """

    step: int
    refreshed: bool
    win_rate: float
    clip_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def sophia_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    hessian: Tensor,
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
) -> int:
    """One Sophia update of ``param`` in place; returns how many coordinates were not clipped.

    ``θ ← θ(1 − lr·wd)``; ``m ← β1 m + (1 − β1) g``; ``θ ← θ − lr · clip(m / max(ρ h, ε), 1)``.
    Non-positive ``h`` (possible with Hutchinson) gives ``max(ρh, ε) = ε``: a sign step
    ``−lr·sign(m)``, never a step against ``m``.

    Examples:
        >>> p, m = torch.tensor([1.0, 4.0]), torch.zeros(2)
        >>> n = sophia_update(p, torch.tensor([2.0, 2.0]), m, torch.tensor([1.0, 0.25]),
        ...                   lr=0.1, beta1=0.5, rho=2.0, weight_decay=0.0, eps=1e-15)
        >>> [round(x, 6) for x in p.tolist()], n
        ([0.95, 3.9], 1)
    """
    return int(_sophia_update(param, grad, exp_avg, hessian, lr=lr, beta1=beta1, rho=rho,
                              weight_decay=weight_decay, eps=eps))


def _sophia_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    hessian: Tensor,
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
) -> Tensor:
    """:func:`sophia_update` returning the unclipped count as a tensor (no device sync per
    parameter: the step adds them up and reads the total once)."""
    dtype = exp_avg.dtype
    theta = param if param.dtype == dtype else param.to(dtype)  # in place for full precision
    if weight_decay:
        theta.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad.to(dtype), alpha=1 - beta1)
    # The update is memory-bound (GPT-2 small: every pass moves 0.5-1.5 GB), so it takes as few
    # passes as it can, in one scratch buffer: m / max(ρh, ε) = (m / max(h, ε/ρ)) / ρ is formed
    # times ρ and clipped to [−ρ, ρ], which leaves the scaling by 1/ρ to the final step's alpha.
    ratio = torch.clamp_min(hessian, eps / rho)
    torch.div(exp_avg, ratio, out=ratio).clamp_(-rho, rho)
    theta.add_(ratio, alpha=-lr / rho)
    unclipped = torch.count_nonzero(ratio.abs_() < rho)
    if theta is not param:
        param.copy_(theta)
    return unclipped


class Sophia(CurvatureOptimizer):
    """Sophia: ``θ ← θ − lr · clip(m / max(ρ h, ε), 1)`` with decoupled weight decay.

    The rule (per coordinate; ``t = 1, 2, …``):

    * ``m_t = β1 m_{t−1} + (1 − β1) g_t``;
    * before the update of steps ``t = 1, k + 1, 2k + 1, …`` (``k = update_period``) the curvature
      EMA is refreshed at the current ``θ``: ``h ← β2 h + (1 − β2) ĥ`` (no bias correction, as in
      the paper; ``hessian_timing="official"`` skips the refresh at ``t = 1`` like the official
      training script, so the first ``k`` steps are sign steps);
    * ``θ ← θ(1 − lr·wd)``, then ``θ ← θ − lr · clip(m / max(ρ h, ε), 1)``.

    So every coordinate moves by at most ``lr`` per step (a trust radius); inside it the step is a
    diagonal Newton step ``−(lr/ρ) m / h``, outside a sign-momentum step. ``ρ`` sets the switch:
    :attr:`last_step_info` reports the win rate (the fraction of unclipped coordinates; the paper
    suggests tuning ``ρ`` to 0.1-0.5).

    Estimators ``ĥ``:

    * ``"hutchinson"`` (Sophia-H): ``u ⊙ (H u)`` with one Rademacher probe ``u`` from
      ``generator``. With a plain closure ``H u`` is a finite difference of gradients (no
      ``create_graph``; ``fd_scheme``: see :mod:`curvature.optim` for the accuracy of each
      scheme). ``opt.step(closure, curvature=op)`` with a curvature operator
      (``curvature.Hessian(model, loss_fn, batch)``) gives exact products.
    * ``"gnb"`` (Sophia-G, Gauss-Newton-Bartlett): call :meth:`update_curvature` with the model
      and a batch of inputs whenever :attr:`curvature_due` is true, before :meth:`step`. It
      samples labels from the model's predictive distribution and sets ``ĥ = B · ĝ ⊙ ĝ``, where
      ``ĝ`` is the gradient of the mean cross-entropy over ``B`` terms (every position of every
      sequence; pass ``num_terms=`` for the global count under gradient accumulation). The factor
      ``B`` makes ``E[B ĝ⊙ĝ] = diag(GGN)``; it is inside ``h``, so ``rho`` means the same for any
      batch size.

    State (all in :meth:`state_dict`; bit-identical resume): per parameter ``exp_avg`` and
    ``hessian`` (float32 for half-precision parameters), the step and refresh counters and the
    probe generator's state. Parameters without a gradient are skipped.

    Args:
        params: parameters or parameter groups (``lr``, ``betas``, ``rho``, ``weight_decay``,
            ``eps`` may differ per group).
        lr: per-coordinate trust radius (paper code: ``6e-4`` for GPT-2 small).
        betas: EMA coefficients of the gradient and of the curvature.
        rho: clipping threshold (paper code: ``0.04``-``0.05``).
        weight_decay: decoupled decay (the paper advises about twice AdamW's).
        eps: floor of the denominator.
        update_period: ``k``, curvature refreshes every ``k`` steps.
        estimator: ``"hutchinson"`` or ``"gnb"``.
        fd_scheme: ``"forward"`` (default: one extra closure call per refresh) or ``"central"``
            (two) finite differences; both errors are far below one probe's noise, and training
            curves do not tell them apart (``docs/optimizers.md``).
        hessian_timing: ``"paper"`` or ``"official"`` (see above).
        generator: probe / label generator (seed it identically on every data-parallel rank);
            ``None``: a fresh OS-seeded one.
        model: optional module all of whose buffers are restored after the finite-difference
            closure calls (without it, the buffers of every module the closure calls are: the
            step leaves BatchNorm statistics as one closure call does).

    Examples:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = Sophia([w], lr=0.5, rho=1.0, betas=(0.5, 0.5), update_period=2, weight_decay=0.0,
        ...              generator=torch.Generator().manual_seed(0))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (torch.tensor([1.0, 100.0]) * w ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(20):
        ...     loss = opt.step(closure)
        >>> bool(closure() < 1e-2), opt.last_step_info.refreshed
        (True, False)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        update_period: int = 10,
        estimator: str = "hutchinson",
        fd_scheme: str = "forward",
        hessian_timing: str = "paper",
        generator: torch.Generator | None = None,
        model: nn.Module | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps)
        self.update_period = check_count(update_period, name="update_period")
        self.estimator = check_choice(estimator, name="estimator", choices=ESTIMATORS)
        self.fd_scheme = check_choice(fd_scheme, name="fd_scheme", choices=FD_SCHEMES)
        self.hessian_timing = check_choice(hessian_timing, name="hessian_timing", choices=TIMINGS)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.model = model
        self._check_group(defaults)
        super().__init__(params, defaults, generator=generator)
        self._pending: dict[Tensor, Tensor] | None = None
        self.last_step_info: SophiaStepInfo | None = None

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_real(group["lr"], name="lr", low=0.0, low_open=True)
        check_betas(group["betas"])
        check_real(group["rho"], name="rho", low=0.0, low_open=True)
        check_real(group["weight_decay"], name="weight_decay", low=0.0)
        check_real(group["eps"], name="eps", low=0.0, low_open=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    # -- schedule --------------------------------------------------------------------------------
    def _due(self, t: int) -> bool:
        if (t - 1) % self.update_period:
            return False
        return not (self.hessian_timing == "official" and t == 1)

    @property
    def curvature_due(self) -> bool:
        """Whether the next :meth:`step` refreshes the curvature (for ``"gnb"``: call
        :meth:`update_curvature` first)."""
        return self._due(self.global_step + 1)

    # -- Sophia-G ------------------------------------------------------------------------------
    def update_curvature(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        outputs: Callable[[Any], Tensor] | None = None,
        num_terms: int | None = None,
    ) -> None:
        """Draw the Gauss-Newton-Bartlett estimate ``B · ĝ ⊙ ĝ`` for the next step (Sophia-G).

        ``model(inputs)`` must return logits ``(..., C)``, an output with ``.logits`` or a dict with
        a ``"logits"`` key (or ``outputs(model(inputs))`` must return the logits; the rule of
        :func:`curvature.select_output`); the loss is computed in the logits' dtype (half
        precision up-cast to float32);
        labels are sampled from ``softmax(logits)`` with the optimizer's generator, ``ĝ`` is the
        gradient of the mean cross-entropy over the ``B`` rows of the flattened logits (``num_terms``
        overrides ``B``, e.g. the global token count). ``.grad`` is not touched.
        """
        if self.estimator != "gnb":
            raise ValueError("update_curvature is for estimator='gnb'; Sophia-H estimates from the closure")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            out = select_output(model(inputs), outputs, who="Sophia.update_curvature")
            if out.ndim < 2:
                raise TypeError("update_curvature needs logits of shape (..., num_classes) from the model")
            logits = out.reshape(-1, out.shape[-1])
            # Half precision is up-cast for the softmax and the loss; float32/float64 stay exact.
            logits = logits.to(working_dtype(logits.dtype))
            probs = torch.softmax(logits.detach(), dim=-1)
            labels = torch.multinomial(probs.to(self._generator.device), 1, generator=self._generator)
            labels = labels.view(-1).to(logits.device)
            loss = F.cross_entropy(logits, labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        terms = logits.shape[0] if num_terms is None else check_count(num_terms, name="num_terms")
        pending = {}
        for p, g in zip(params, grads):
            if g is not None:
                est = g.to(working_dtype(p.dtype)).square().mul_(terms)
                if not bool(torch.isfinite(est).all()):
                    raise NonFiniteError("the Gauss-Newton-Bartlett estimate is not finite; nothing was updated")
                pending[p] = est
        self._pending = pending

    # -- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, curvature: Any = None) -> Any:
        """One Sophia step. ``closure`` is required on Sophia-H refresh steps (it is then called
        once for the gradient and, with ``fd_scheme="forward"``, once more for the finite
        difference (twice for ``"central"``), or only once with ``curvature=``, a curvature
        operator over the optimizer's parameters)."""
        t = self.global_step + 1
        due = self._due(t)
        hutchinson = due and self.estimator == "hutchinson"
        loss, items, estimates = hutchinson_refresh(
            self, closure, refresh=hutchinson, curvature=curvature, scheme=self.fd_scheme, model=self.model,
            what="Sophia",
        )
        if due and items and self.estimator == "gnb" and self._pending is None:
            raise RuntimeError(
                f"step {t} refreshes the Sophia-G curvature: call opt.update_curvature(model, inputs) "
                "before opt.step() when opt.curvature_due is True"
            )
        if self._pending is not None and self.estimator == "gnb":
            estimates, due = self._pending, True
        self._pending = None

        unclipped: Any = 0
        total = 0
        for group, p in items:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros(p.shape, dtype=working_dtype(p.dtype), device=p.device)
                state["hessian"] = torch.zeros(p.shape, dtype=working_dtype(p.dtype), device=p.device)
            beta1, beta2 = group["betas"]
            if due and p in estimates:
                state["hessian"].mul_(beta2).add_(estimates[p], alpha=1 - beta2)
            unclipped = unclipped + _sophia_update(
                p, p.grad, state["exp_avg"], state["hessian"], lr=group["lr"], beta1=beta1, rho=group["rho"],
                weight_decay=group["weight_decay"], eps=group["eps"],
            )
            total += p.numel()
        glob = self._global
        glob["global_step"] = t
        if due:
            glob["num_refreshes"] += 1
        win = int(unclipped) / total if total else 0.0
        self.last_step_info = SophiaStepInfo(t, bool(due), win, 1.0 - win)
        return loss
