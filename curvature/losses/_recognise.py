"""Recognising a loss: which closed form (if any) is exactly the loss computed, and its options."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ._token_loss import TokenCrossEntropyLoss

__all__ = ["LossInfo", "ReductionSpec", "describe_loss"]

ReductionSpec = Union[None, str, Callable[[Any, Any], float]]


@dataclass(frozen=True)
class LossInfo:
    """What the toolkit knows about a loss function.

    Attributes:
        kind: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` (closed forms) or ``"generic"``.
        reduction: ``"mean"`` or ``"sum"`` as declared or read from the loss object
            (``"mean"`` when unknown; the per-batch :class:`Normalizer` is authoritative).
        ignore_index: cross-entropy's ignored class index (or ``None``).
        label_smoothing: cross-entropy's label smoothing.
        weight: cross-entropy class weights, or BCE's element weights (or ``None``).
        pos_weight: BCE-with-logits ``pos_weight`` (or ``None``).
        declared: the ``reduction=`` the user passed (``None``: read from the loss).
        normalizer: a user-declared normalizer ``(inputs, targets) -> Z`` (or ``None``).
        class_dim: cross-entropy's class dimension: ``1`` (PyTorch's layout) or ``-1``
            (:class:`TokenCrossEntropyLoss`, logits ``(..., V)``).
        shift: :class:`TokenCrossEntropyLoss` predicts token ``t + 1`` at position ``t``.
    """

    kind: str
    reduction: str
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    weight: Tensor | None = field(default=None, compare=False, repr=False)
    pos_weight: Tensor | None = field(default=None, compare=False, repr=False)
    declared: str | None = None
    normalizer: Callable[[Any, Any], float] | None = field(default=None, compare=False, repr=False)
    class_dim: int = field(default=1, repr=False)
    shift: bool = field(default=False, repr=False)

    @property
    def has_closed_form(self) -> bool:
        """Whether the output-space Hessian has a closed form here."""
        return self.kind != "generic"

    @property
    def is_likelihood(self) -> bool:
        """Whether the loss is a negative log-likelihood with a sampler (the Fisher needs one)."""
        return self.kind in ("cross_entropy", "mse", "bce_with_logits") and self.weight is None and (
            self.pos_weight is None
        )


# -- recognising the loss --------------------------------------------------------------------------
def _unwrap_partial(loss_fn: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        inner, kwargs = _unwrap_partial(loss_fn.func)
        return inner, {**kwargs, **loss_fn.keywords}
    return loss_fn, {}


def _exact(loss_fn: Any, cls: type) -> bool:
    """An instance of ``cls`` whose ``forward`` is ``cls``'s own (a subclass may compute anything)."""
    return isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward


def describe_loss(loss_fn: Callable[..., Tensor], reduction: ReductionSpec = None) -> LossInfo:
    """Classify ``loss_fn``; closed forms are used only where they are exactly the loss computed.

    Recognised: ``nn.CrossEntropyLoss`` (class weights, ``ignore_index``, label smoothing),
    ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (``weight``/``pos_weight``), the matching
    ``torch.nn.functional`` functions and ``functools.partial`` of them with keyword options.
    Subclasses that override ``forward`` and all other callables are ``"generic"``: their
    curvature comes from autodiff and their normalizer from :func:`evaluate_loss`.

    ``reduction`` declares the reduction: ``"mean"``/``"sum"`` (checked against the loss on
    the first product), or a callable ``(inputs, targets) -> Z`` giving each batch's normalizer
    (then the loss is taken to be a mean: ``L = (1/Z) sum_u nll_u``).

    Examples:
        >>> describe_loss(nn.MSELoss(reduction="sum"))
        LossInfo(kind='mse', reduction='sum', ignore_index=None, label_smoothing=0.0, declared=None)
        >>> describe_loss(functools.partial(F.cross_entropy, reduction="sum")).reduction
        'sum'
    """
    declared: str | None = None
    normalizer = None
    if callable(reduction):
        normalizer = reduction
    elif reduction is not None:
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"reduction must be 'mean', 'sum' or a callable (inputs, targets) -> normalizer, got {reduction!r}"
            )
        declared = reduction
    fn, kwargs = _unwrap_partial(loss_fn)
    own = kwargs.get("reduction", getattr(fn, "reduction", "mean"))
    if own not in ("mean", "sum", "batchmean"):
        raise ValueError(
            f"the loss's reduction must be 'mean' or 'sum' (the loss must return a scalar), got {own!r}"
        )
    red = declared or ("mean" if own == "batchmean" else own)
    common = {"declared": declared, "normalizer": normalizer}
    if _exact(fn, TokenCrossEntropyLoss) and not kwargs:
        return LossInfo(
            "cross_entropy", red, int(fn.ignore_index), float(fn.label_smoothing), class_dim=-1, shift=fn.shift,
            **common,
        )
    if _exact(fn, nn.CrossEntropyLoss) or fn is F.cross_entropy:
        opts = (
            {"weight": fn.weight, "ignore_index": fn.ignore_index, "label_smoothing": fn.label_smoothing}
            if isinstance(fn, nn.Module)
            else {"weight": None, "ignore_index": -100, "label_smoothing": 0.0}
        )
        opts.update({k: v for k, v in kwargs.items() if k in opts})
        if set(kwargs) - {"weight", "ignore_index", "label_smoothing", "reduction"}:
            return LossInfo("generic", red, **common)
        return LossInfo(
            "cross_entropy", red, int(opts["ignore_index"]), float(opts["label_smoothing"]),
            weight=opts["weight"], **common,
        )
    if _exact(fn, nn.MSELoss) or fn is F.mse_loss:
        if set(kwargs) - {"reduction"}:
            return LossInfo("generic", red, **common)
        return LossInfo("mse", red, **common)
    if _exact(fn, nn.BCEWithLogitsLoss) or fn is F.binary_cross_entropy_with_logits:
        opts = (
            {"weight": fn.weight, "pos_weight": fn.pos_weight}
            if isinstance(fn, nn.Module)
            else {"weight": None, "pos_weight": None}
        )
        if set(kwargs) - {"weight", "pos_weight", "reduction"}:
            return LossInfo("generic", red, **common)
        opts.update({k: v for k, v in kwargs.items() if k in opts})
        return LossInfo("bce_with_logits", red, weight=opts["weight"], pos_weight=opts["pos_weight"], **common)
    return LossInfo("generic", red, **common)
