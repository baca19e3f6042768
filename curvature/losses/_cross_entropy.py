"""Lean closed forms of cross-entropy in the logits, applied in chunks of tokens.

Per unit ``u`` (a sample, or a token of a sequence) with logits ``x_u``, ``p_u = softmax(x_u)``
and target weights ``q_u`` (``nll_u = -sum_c q_uc log p_uc``: a one-hot label, label smoothing
``(1 - eps) e_y + eps / C``, class weights ``w``; zero for ignored tokens), with
``s_u = sum_c q_uc``:

* gradient ``s_u p_u - q_u``;
* Hessian ``s_u (diag p_u - p_u p_u^T)``, so ``H_u v = s_u p_u * (v - <p_u, v>)``.

On a language model's ``B x T x V`` logits (V = 50,257 for GPT-2) each dense intermediate is as
large as the logits; autograd's twice-differentiated ``log_softmax`` keeps several of them, and a
one-hot target tensor is twice as large again (int64). Here nothing of size ``B x T x V`` is
held beyond the logits and the product itself: the softmax is recomputed per chunk of
:data:`CHUNK_ELEMENTS` elements, and the targets are kept as labels (``q`` is never formed).

:func:`lean_cross_entropy` is the loss as an ``autograd.Function`` whose backward is itself
differentiable in this closed form (for the Hessian's double backward); the curvature of the
GGN and the Fishers uses :func:`hessian_product_` and :func:`residuals` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["CHUNK_ELEMENTS", "TokenTargets", "hessian_product_", "residuals", "lean_cross_entropy"]

#: Elements of logits per chunk (16 MiB in float32): large enough for full-speed kernels, small
#: against a language model's ``B x T x V``.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TokenTargets:
    """Integer targets of a cross-entropy as per-unit labels and weights, never as ``q``.

    Attributes:
        labels: ``(units,)`` class indices (ignored units clamped to ``0``).
        label_weight: ``(units,)`` weight of the label's one-hot part, ``(1 - eps) w_y`` (``0``
            for ignored units).
        smooth_weight: ``(C,)`` the uniform part ``eps w_c / C`` (``None`` without smoothing).
        valid: ``(units,)`` ``1`` for counted units, ``0`` for ignored ones.
        scale: ``(units,)`` ``s_u = sum_c q_uc``.
    """

    labels: Tensor
    label_weight: Tensor
    smooth_weight: Tensor | None
    valid: Tensor
    scale: Tensor

    @classmethod
    def build(
        cls, labels: Tensor, num_classes: int, *, ignore_index: int, label_smoothing: float = 0.0,
        weight: Tensor | None = None, dtype: torch.dtype, device: torch.device,
    ) -> TokenTargets:
        """From flat integer labels (``ignore_index`` marks ignored units).

        Examples:
            >>> t = TokenTargets.build(torch.tensor([2, -100]), 3, ignore_index=-100, dtype=torch.float64,
            ...                        device=torch.device("cpu"))
            >>> t.scale.tolist(), t.labels.tolist()
            ([1.0, 0.0], [2, 0])
        """
        labels = labels.reshape(-1).to(device)
        valid = (labels != ignore_index).to(dtype)
        safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels).clamp(0, num_classes - 1)
        eps = float(label_smoothing)
        w = weight.detach().to(device=device, dtype=dtype) if weight is not None else None
        w_y = w[safe] if w is not None else torch.ones_like(valid)
        label_weight = (1 - eps) * w_y * valid
        smooth = None
        if eps:
            smooth = (eps / num_classes) * (w if w is not None else torch.ones(num_classes, dtype=dtype, device=device))
        scale = label_weight + (smooth.sum() * valid if smooth is not None else 0.0)
        return cls(safe, label_weight, smooth, valid, scale)

    def chunk(self, rows: slice) -> TokenTargets:
        return TokenTargets(self.labels[rows], self.label_weight[rows], self.smooth_weight, self.valid[rows],
                            self.scale[rows])


def _row_chunks(rows: int, classes: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(classes, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def hessian_product_(logits: Tensor, U: Tensor, factor: Tensor) -> Tensor:
    """``U[j] <- factor_u (diag p_u - p_u p_u^T) U[j]_u`` IN PLACE, chunk by chunk, and return ``U``.

    ``logits`` is ``(units, C)``, ``U`` ``(k, units, C)`` (or ``(units, C)``), ``factor`` ``(units,)``.

    Examples:
        >>> x, u = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        >>> p = x.softmax(-1)
        >>> dense = torch.stack([(torch.diag(q) - torch.outer(q, q)) @ v for q, v in zip(p, u)])
        >>> bool(torch.allclose(hessian_product_(x, u.clone(), torch.ones(3, dtype=torch.float64)), dense))
        True
    """
    rows, classes = logits.shape
    for c in _row_chunks(rows, classes):
        p = torch.softmax(logits[c], dim=-1)
        f = factor[c, None]
        for u in U[..., c, :] if U.ndim == 3 else (U[c],):
            dot = torch.linalg.vecdot(p, u).unsqueeze(-1)  # no p * u temporary
            u.sub_(dot).mul_(p).mul_(f)
    return U


def residuals(logits: Tensor, targets: TokenTargets, factor: float | Tensor = 1.0) -> Tensor:
    """Per unit the gradient of the raw loss, ``factor * (s_u p_u - q_u)``, as ``(units, C)``.

    Examples:
        >>> x = torch.zeros(2, 2, dtype=torch.float64)
        >>> t = TokenTargets.build(torch.tensor([0, -100]), 2, ignore_index=-100, dtype=x.dtype, device=x.device)
        >>> residuals(x, t).tolist()
        [[-0.5, 0.5], [0.0, 0.0]]
    """
    rows, classes = logits.shape
    out = torch.empty_like(logits)
    for c in _row_chunks(rows, classes):
        t = targets.chunk(c)
        r = torch.softmax(logits[c], dim=-1).mul_(t.scale[:, None])
        if t.smooth_weight is not None:
            r.sub_(t.valid[:, None] * t.smooth_weight)
        r[torch.arange(r.shape[0], device=r.device), t.labels] -= t.label_weight
        out[c] = r.mul_(factor)
    return out


def _loss_sum(logits: Tensor, targets: TokenTargets) -> Tensor:
    """``sum_u nll_u = sum_u (s_u logsumexp(x_u) - sum_c q_uc x_uc)``."""
    rows, classes = logits.shape
    total = logits.new_zeros(())
    for c in _row_chunks(rows, classes):
        x, t = logits[c], targets.chunk(c)
        picked = x.gather(1, t.labels[:, None]).squeeze(1)
        total = total + (t.scale * torch.logsumexp(x, dim=-1) - t.label_weight * picked).sum()
        if t.smooth_weight is not None:
            total = total - (t.valid * (x @ t.smooth_weight)).sum()
    return total


class _CrossEntropy(torch.autograd.Function):
    """``kappa * sum_u nll_u``; its backward is :class:`_CrossEntropyGradient` (differentiable)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: TokenTargets, kappa: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        ctx.targets, ctx.kappa = targets, kappa
        return _loss_sum(logits.detach(), targets) * kappa

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        return _CrossEntropyGradient.apply(logits, grad, ctx.targets, ctx.kappa), None, None


class _CrossEntropyGradient(torch.autograd.Function):
    """``g kappa (s_u p_u - q_u)`` per unit; its backward is the closed-form Hessian product."""

    @staticmethod
    def forward(ctx, logits: Tensor, grad: Tensor, targets: TokenTargets, kappa: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, grad)
        ctx.targets, ctx.kappa = targets, kappa
        return residuals(logits.detach(), targets, grad.detach() * kappa)

    @staticmethod
    @once_differentiable
    def backward(ctx, U: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        logits, grad = ctx.saved_tensors
        targets = ctx.targets
        d_logits = d_grad = None
        if ctx.needs_input_grad[0]:
            d_logits = hessian_product_(logits, U.clone(), targets.scale * (grad * ctx.kappa))
        if ctx.needs_input_grad[1]:
            d_grad = (residuals(logits, targets, ctx.kappa) * U).sum()
        return d_logits, d_grad, None, None


def lean_cross_entropy(logits: Tensor, targets: TokenTargets, normalizer: float) -> Tensor:
    """``(1 / normalizer) sum_u nll_u`` of ``(units, C)`` logits, twice differentiable in closed form.

    Equal to ``F.cross_entropy`` (same options) up to rounding; its gradient, and the Hessian
    products of a double backward through it, hold no ``units x C`` intermediates beyond one chunk.

    Examples:
        >>> import torch.nn.functional as F
        >>> x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
        >>> y = torch.tensor([1, 2, -100, 6, 0])
        >>> t = TokenTargets.build(y, 7, ignore_index=-100, dtype=x.dtype, device=x.device)
        >>> bool(torch.allclose(lean_cross_entropy(x, t, 4.0), F.cross_entropy(x, y)))
        True
    """
    return _CrossEntropy.apply(logits, targets, 1.0 / normalizer)
