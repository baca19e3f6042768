"""Curvature of one batch's loss in the model outputs: loss-Hessian products and Fisher sampling."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor

from ._cross_entropy import TokenTargets, _row_chunks, hessian_product_, residuals
from ._lean_loss import _ignored
from ._normalizer import Normalizer, _token_labels, evaluate_loss
from ._output_checks import check_outputs
from ._recognise import LossInfo

__all__ = ["OutputCurvature"]

logger = logging.getLogger("curvature.losses")


class OutputCurvature:
    """Curvature of one batch's loss with respect to the model outputs ``F``.

    Built once per batch from the detached outputs and targets; applies, to a stack of output
    tangents ``U`` of shape ``(k, *F.shape)``, the loss Hessian (GGN / exact Fisher), a
    Monte-Carlo Fisher, or the empirical-Fisher residual outer products. ``normalizer`` is the
    batch's :class:`Normalizer` (``kappa = 1/Z``).
    """

    def __init__(
        self,
        info: LossInfo,
        loss_fn: Callable[..., Tensor],
        outputs: Tensor,
        targets: Any,
        normalizer: Normalizer | None = None,
    ):
        self.info = info
        self.loss_fn = loss_fn
        self.outputs = outputs.detach()
        self.targets = targets
        check_outputs(info, self.outputs, targets)
        if normalizer is None:
            with torch.no_grad():
                normalizer = evaluate_loss(info, loss_fn, self.outputs, targets)[1]
        self.normalizer = normalizer
        self.kappa = 1.0 / max(normalizer.value, 1e-300) if normalizer.value > 0 else 0.0
        self._scale: Tensor | None = None  # per-unit factor of the closed-form Hessian
        self._generic_grad: tuple[Tensor, Tensor] | None = None
        self._tokens: TokenTargets | None = None
        self._soft_targets: Tensor | None = None
        if info.kind == "cross_entropy":
            # Class dimension last; each remaining position is one categorical unit. Integer targets
            # stay labels (TokenTargets): a dense q would be as large as the logits (a language
            # model's B x T x V), and the softmax is recomputed per chunk where it is needed.
            C = self.outputs.shape[info.class_dim]
            self._logits = self.outputs.movedim(info.class_dim, -1).reshape(-1, C)
            if isinstance(targets, Tensor) and targets.is_floating_point():
                self._soft_targets = self._target_distribution(targets)  # q_u with sum_c q_uc = scale_u
                self._scale = self._soft_targets.sum(-1)
            else:
                self._tokens = TokenTargets.build(
                    _token_labels(info, targets), C, ignore_index=_ignored(info),
                    label_smoothing=info.label_smoothing, weight=info.weight, dtype=self._logits.dtype,
                    device=self._logits.device,
                )
                self._scale = self._tokens.scale
        elif info.kind == "bce_with_logits":
            s = torch.sigmoid(self.outputs)
            factor = s * (1 - s)
            if info.weight is not None or info.pos_weight is not None:
                y = targets.to(self.outputs.dtype)
                if info.pos_weight is not None:
                    factor = factor * (info.pos_weight.to(y.dtype) * y + 1 - y)
                if info.weight is not None:
                    factor = factor * info.weight.to(y.dtype)
            self._bce_factor = factor

    @property
    def _probs(self) -> Tensor:
        """The units' class probabilities ``(units, C)`` (computed on each use: they are as large as the logits)."""
        return torch.softmax(self._logits, dim=-1)

    def _target_distribution(self, targets: Tensor) -> Tensor:
        """Per unit the (unnormalized) weights ``q_u`` of probability targets: ``nll_u = -sum_c q_uc log p_uc``."""
        C = self._logits.shape[-1]
        dtype = self._logits.dtype
        eps = self.info.label_smoothing
        w = self.info.weight.to(device=self._logits.device, dtype=dtype) if self.info.weight is not None else None
        q = targets.movedim(1, -1).reshape(-1, C).to(dtype)
        if eps:
            q = (1 - eps) * q + eps / C
        return q * w if w is not None else q

    # -- unit layout -------------------------------------------------------------------------
    def _to_units(self, U: Tensor) -> Tensor:
        """``(k, *F.shape) -> (k, units, per_unit)``."""
        k = U.shape[0]
        if self.info.kind == "cross_entropy" and self.info.class_dim == -1:
            return U.reshape(k, -1, self.outputs.shape[-1])
        if self.info.kind == "cross_entropy":
            return U.movedim(2, -1).reshape(k, -1, self.outputs.shape[1])
        return U.reshape(k, self.outputs.shape[0] if self.outputs.ndim else 1, -1)

    def _from_units(self, W: Tensor) -> Tensor:
        k = W.shape[0]
        if self.info.kind == "cross_entropy" and self.info.class_dim == -1:
            return W.reshape(k, *self.outputs.shape)
        if self.info.kind == "cross_entropy":
            moved_shape = (k, *self.outputs.movedim(1, -1).shape)
            return W.reshape(moved_shape).movedim(-1, 2)
        return W.reshape(k, *self.outputs.shape)

    # -- loss Hessian ---------------------------------------------------------------------------
    def hessian_product(self, U: Tensor, *, overwrite: bool = False) -> Tensor:
        """``(d^2 L / dF^2) U`` for each of the ``k`` stacked tangents.

        ``overwrite=True`` lets cross-entropy write the product into ``U`` (no second tensor of
        the outputs' size: a language model's ``k x B x T x V``)."""
        kind = self.info.kind
        if kind == "cross_entropy":
            Uu = self._to_units(U)
            if not overwrite and Uu.untyped_storage().data_ptr() == U.untyped_storage().data_ptr():
                Uu = Uu.clone()
            return self._from_units(hessian_product_(self._logits, Uu, self._scale * self.kappa))
        if kind == "mse":
            return U * (2.0 * self.kappa)
        if kind == "bce_with_logits":
            return U * (self._bce_factor * self.kappa)
        return self._generic_hessian_product(U)

    def _generic_hessian_product(self, U: Tensor) -> Tensor:
        """Reverse-over-reverse on the (small) output space: one create-graph gradient of the loss
        in the outputs, then one batched backward for all tangents. Unlike forward-mode AD this
        works for every loss with a double backward (``huber_loss`` has no forward-AD formula,
        ``mse_loss`` trips forward AD's zero tangents) and respects ``no_grad``/``detach`` in it."""
        if self._generic_grad is None:
            out = self.outputs.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = self.loss_fn(out, self.targets)
                if not (isinstance(loss, Tensor) and loss.is_floating_point() and loss.requires_grad):
                    raise TypeError(
                        "loss_fn is not differentiable in the model outputs (it returned "
                        f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else ' of dtype ' + str(loss.dtype)}"
                        " without a gradient); curvature needs a twice-differentiable loss"
                    )
                (g,) = torch.autograd.grad(loss, out, create_graph=True)
            self._generic_grad = (out, g)
            logger.info("loss-Hessian products by reverse-over-reverse on the output space (%s)", type(self.loss_fn))
        out, g = self._generic_grad
        if not g.requires_grad:  # the loss is linear in the outputs
            return torch.zeros_like(U)
        with torch.enable_grad():
            try:
                (HU,) = torch.autograd.grad(g, out, U, retain_graph=True, is_grads_batched=True, allow_unused=True,
                                            materialize_grads=True)
            except (RuntimeError, NotImplementedError) as exc:
                logger.info("loss-Hessian: batched backward unavailable (%s); one backward per tangent", exc)
                HU = torch.stack([
                    torch.autograd.grad(g, out, u, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
                    for u in U
                ])
        return HU

    # -- Fisher variants ------------------------------------------------------------------------
    def sampled_residuals(self, num_samples: int, generator: torch.Generator) -> Tensor:
        """Gradients of the raw negative log-likelihood at labels drawn from the model, ``(S, units, per_unit)``."""
        kind = self.info.kind
        if not self.info.is_likelihood:
            raise ValueError(
                "the Fisher needs a likelihood: supported losses are CrossEntropyLoss, MSELoss and BCEWithLogitsLoss "
                "without weights; use GGN for other losses"
            )
        if kind == "cross_entropy":
            p = self._probs
            labels = torch.multinomial(p, num_samples, replacement=True, generator=generator).T  # (S, units)
            # p - e_label without a one-hot tensor (int64, twice the logits' size in float32).
            R = p.unsqueeze(0).repeat(num_samples, 1, 1)
            del p
            R.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(labels, -1, dtype=R.dtype).unsqueeze(-1))
            # Each unit's Fisher carries the same factor as its Hessian (0 for ignored tokens).
            return R.mul_(self._scale.sqrt()[:, None])
        flat = self.outputs.reshape(self.outputs.shape[0], -1)
        if kind == "mse":
            # nll (f - y)^2 is a Gaussian with variance 1/2; its score 2(f - y~) ~ N(0, 2).
            noise = torch.randn((num_samples, *flat.shape), generator=generator, dtype=flat.dtype, device=flat.device)
            return noise * (2.0**0.5)
        s = torch.sigmoid(flat)
        draws = torch.rand((num_samples, *flat.shape), generator=generator, dtype=flat.dtype, device=flat.device)
        return s.unsqueeze(0) - (draws < s).to(flat.dtype)

    def residuals(self) -> Tensor:
        """Per-unit gradients of the raw (unnormalized) loss at the observed targets, ``(units, per_unit)``."""
        kind = self.info.kind
        if kind == "cross_entropy":
            if self._tokens is not None:
                return residuals(self._logits, self._tokens)
            return self._probs * self._scale[:, None] - self._soft_targets
        flat = self.outputs.reshape(self.outputs.shape[0], -1)
        if kind == "mse":
            return 2.0 * (flat - self.targets.reshape(flat.shape).to(flat.dtype))
        if kind == "bce_with_logits" and self.info.weight is None and self.info.pos_weight is None:
            return torch.sigmoid(flat) - self.targets.reshape(flat.shape).to(flat.dtype)
        # Other losses: the gradient of the batch loss w.r.t. the outputs is (1/Z) times the units' residuals.
        outputs = self.outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss_fn(outputs, self.targets), outputs)
        return g.reshape(g.shape[0] if g.ndim else 1, -1) * self.normalizer.value

    def outer_product(self, R: Tensor, U: Tensor, *, overwrite: bool = False) -> Tensor:
        """``kappa * mean_s R_s R_s^T U`` per unit; ``R`` is ``(S, units, per_unit)`` or ``(units, per_unit)``.

        Applied in chunks of units (each unit's result depends on its own rows only), so no
        temporary is larger than one chunk; ``overwrite=True`` writes the result into ``U``."""
        if R.ndim == 2:
            R = R.unsqueeze(0)
        Uu = self._to_units(U)
        if not overwrite and Uu.untyped_storage().data_ptr() == U.untyped_storage().data_ptr():
            Uu = Uu.clone()
        factor = self.kappa / R.shape[0]
        for c in _row_chunks(Uu.shape[1], Uu.shape[-1]):
            Rc = R[:, c]
            for u in Uu[:, c]:
                coeff = torch.einsum("sup,up->su", Rc, u)
                u.copy_(torch.einsum("su,sup->up", coeff, Rc)).mul_(factor)
        return self._from_units(Uu)
