"""Losses of the model outputs: recognising CE/MSE/BCE, their reduction factors and closed-form curvature.

Notation (spec 04): the batch loss is ``L = kappa * sum_u nll_u(f_u, y_u)`` over *units* ``u``
(a sample's row for MSE/BCE, a sample or token position for cross-entropy), with ``kappa`` the
reduction factor (``1/#units`` or ``1/#elements`` for ``mean``, ``1`` for ``sum``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossInfo", "describe_loss", "OutputCurvature"]


@dataclass(frozen=True)
class LossInfo:
    """What the toolkit knows about a loss function.

    Attributes:
        kind: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` or ``"generic"``.
        reduction: ``"mean"`` or ``"sum"``.
        ignore_index: cross-entropy's ignored class index (or ``None``).
        label_smoothing: cross-entropy's label smoothing.
    """

    kind: str
    reduction: str
    ignore_index: int | None = None
    label_smoothing: float = 0.0

    @property
    def has_closed_form(self) -> bool:
        return self.kind != "generic"


def describe_loss(loss_fn: Callable[..., Tensor], reduction: str | None = None) -> LossInfo:
    """Classify ``loss_fn``; closed forms are used only where they are exact.

    Cross-entropy with class ``weight``, and BCE with ``weight``/``pos_weight``, are treated as
    generic losses (their curvature is still exact, via autodiff, for the Hessian and GGN).

    Example:
        >>> describe_loss(nn.MSELoss(reduction="sum"))
        LossInfo(kind='mse', reduction='sum', ignore_index=None, label_smoothing=0.0)
    """
    red = reduction if reduction is not None else getattr(loss_fn, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' or 'sum' (the loss must return a scalar), got {red!r}"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None:
        return LossInfo("cross_entropy", red, loss_fn.ignore_index, float(loss_fn.label_smoothing))
    if loss_fn is F.cross_entropy:
        return LossInfo("cross_entropy", red, -100, 0.0)
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return LossInfo("mse", red)
    if (isinstance(loss_fn, nn.BCEWithLogitsLoss) and loss_fn.weight is None and loss_fn.pos_weight is None) or (
        loss_fn is F.binary_cross_entropy_with_logits
    ):
        return LossInfo("bce_with_logits", red)
    return LossInfo("generic", red)


class OutputCurvature:
    """Curvature of one batch's loss with respect to the model outputs ``F``.

    Built once per batch from the detached outputs and targets; applies, to a stack of output
    tangents ``U`` of shape ``(k, *F.shape)``, the loss Hessian (GGN / exact Fisher), a
    Monte-Carlo Fisher, or the empirical-Fisher residual outer products.
    """

    def __init__(self, info: LossInfo, loss_fn: Callable[..., Tensor], outputs: Tensor, targets: Any):
        self.info = info
        self.loss_fn = loss_fn
        self.outputs = outputs.detach()
        self.targets = targets
        self._valid: Tensor | None = None
        if info.kind == "cross_entropy":
            if self.outputs.ndim < 2:
                raise ValueError(f"cross-entropy outputs need a class dimension, got shape {tuple(self.outputs.shape)}")
            # Class dimension last; each remaining position is one categorical unit.
            self._logits = self.outputs.movedim(1, -1).reshape(-1, self.outputs.shape[1])
            self._probs = torch.softmax(self._logits, dim=-1)
            if isinstance(targets, Tensor) and not targets.is_floating_point() and info.ignore_index is not None:
                self._valid = (targets.reshape(-1) != info.ignore_index).to(self._probs.dtype)
                count = self._valid.sum()
            else:
                count = torch.tensor(float(self._logits.shape[0]), dtype=self._probs.dtype)
            self.kappa = 1.0 / count.clamp_min(1) if info.reduction == "mean" else torch.tensor(1.0)
        elif info.kind in ("mse", "bce_with_logits"):
            self.kappa = 1.0 / self.outputs.numel() if info.reduction == "mean" else 1.0
        else:
            n = self.outputs.shape[0] if self.outputs.ndim else 1
            self.kappa = 1.0 / n if info.reduction == "mean" else 1.0

    # -- unit layout -------------------------------------------------------------------------
    def _to_units(self, U: Tensor) -> Tensor:
        """``(k, *F.shape) -> (k, units, per_unit)``."""
        k = U.shape[0]
        if self.info.kind == "cross_entropy":
            return U.movedim(2, -1).reshape(k, -1, self.outputs.shape[1])
        return U.reshape(k, self.outputs.shape[0], -1)

    def _from_units(self, W: Tensor) -> Tensor:
        k = W.shape[0]
        if self.info.kind == "cross_entropy":
            moved_shape = (k, *self.outputs.movedim(1, -1).shape)
            return W.reshape(moved_shape).movedim(-1, 2)
        return W.reshape(k, *self.outputs.shape)

    # -- loss Hessian ---------------------------------------------------------------------------
    def hessian_product(self, U: Tensor) -> Tensor:
        """``(d^2 L / dF^2) U`` for each of the ``k`` stacked tangents."""
        kind = self.info.kind
        if kind == "cross_entropy":
            p = self._probs
            Uu = self._to_units(U)
            W = p * Uu - p * (Uu * p).sum(-1, keepdim=True)
            if self._valid is not None:
                W = W * self._valid[:, None]
            return self._from_units(W * self.kappa)
        if kind == "mse":
            return U * (2.0 * self.kappa)
        if kind == "bce_with_logits":
            s = torch.sigmoid(self.outputs)
            return U * (s * (1 - s) * self.kappa)
        return self._generic_hessian_product(U)

    def _generic_hessian_product(self, U: Tensor) -> Tensor:
        targets = self.targets

        def loss_of_outputs(out: Tensor) -> Tensor:
            return self.loss_fn(out, targets)

        grad_fn = torch.func.grad(loss_of_outputs)

        def hvp(u: Tensor) -> Tensor:
            return torch.func.jvp(grad_fn, (self.outputs,), (u,))[1]

        return torch.func.vmap(hvp)(U)

    # -- Fisher variants ------------------------------------------------------------------------
    def sampled_residuals(self, num_samples: int, generator: torch.Generator) -> Tensor:
        """Gradients of the raw negative log-likelihood at labels drawn from the model, ``(S, units, per_unit)``."""
        kind = self.info.kind
        if kind == "cross_entropy":
            p = self._probs
            labels = torch.multinomial(p, num_samples, replacement=True, generator=generator).T  # (S, units)
            onehot = F.one_hot(labels, p.shape[-1]).to(p.dtype)
            R = p.unsqueeze(0) - onehot
            if self._valid is not None:
                R = R * self._valid[:, None]
            return R
        flat = self.outputs.reshape(self.outputs.shape[0], -1)
        if kind == "mse":
            # nll (f - y)^2 is a Gaussian with variance 1/2; its score 2(f - y~) ~ N(0, 2).
            noise = torch.randn((num_samples, *flat.shape), generator=generator, dtype=flat.dtype, device=flat.device)
            return noise * (2.0**0.5)
        if kind == "bce_with_logits":
            s = torch.sigmoid(flat)
            draws = torch.rand((num_samples, *flat.shape), generator=generator, dtype=flat.dtype, device=flat.device)
            return s.unsqueeze(0) - (draws < s).to(flat.dtype)
        raise ValueError(
            "the Fisher needs a likelihood: supported losses are CrossEntropyLoss, MSELoss and BCEWithLogitsLoss; "
            "use GGN for other losses"
        )

    def residuals(self) -> Tensor:
        """Per-unit gradients of the raw loss at the observed targets, ``(units, per_unit)``."""
        kind = self.info.kind
        if kind == "cross_entropy":
            t = self.targets
            C = self._probs.shape[-1]
            if t.is_floating_point():
                target_probs = t.movedim(1, -1).reshape(-1, C)
            else:
                idx = t.reshape(-1).clamp(0, C - 1) if self._valid is not None else t.reshape(-1)
                target_probs = F.one_hot(idx, C).to(self._probs.dtype)
            eps = self.info.label_smoothing
            if eps:
                target_probs = (1 - eps) * target_probs + eps / C
            R = self._probs - target_probs
            if self._valid is not None:
                R = R * self._valid[:, None]
            return R
        flat = self.outputs.reshape(self.outputs.shape[0], -1)
        if kind == "mse":
            return 2.0 * (flat - self.targets.reshape(flat.shape).to(flat.dtype))
        if kind == "bce_with_logits":
            return torch.sigmoid(flat) - self.targets.reshape(flat.shape).to(flat.dtype)
        # Generic loss: the gradient of the batch loss w.r.t. the outputs is kappa times the units' residuals.
        outputs = self.outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss_fn(outputs, self.targets), outputs)
        return g.reshape(g.shape[0], -1) / self.kappa

    def outer_product(self, R: Tensor, U: Tensor) -> Tensor:
        """``kappa * mean_s R_s R_s^T U`` per unit; ``R`` is ``(S, units, per_unit)`` or ``(units, per_unit)``."""
        if R.ndim == 2:
            R = R.unsqueeze(0)
        Uu = self._to_units(U)
        coeff = torch.einsum("sup,kup->ksu", R, Uu)
        W = torch.einsum("ksu,sup->kup", coeff, R) * (self.kappa / R.shape[0])
        return self._from_units(W)
