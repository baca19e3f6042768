"""The lean cross-entropy in place of a recognised loss, where it is exactly that loss."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._cross_entropy import TokenTargets, lean_cross_entropy
from ._normalizer import Normalizer, _token_labels
from ._recognise import LossInfo

__all__ = ["lean_loss"]


def lean_loss(info: LossInfo, outputs: Tensor, targets: Any, normalizer: Normalizer) -> Tensor | None:
    """The batch loss by :func:`~curvature.losses._cross_entropy.lean_cross_entropy` (its double
    backward holds no ``B x T x V`` intermediates), or ``None`` where that is not exactly the loss.

    Recognised: ``TokenCrossEntropyLoss``, ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` (class
    weights, ``ignore_index``, label smoothing) on ``(N, C)`` logits, with integer targets and the
    loss's own normalizer (a positive one: a batch of only ignored tokens keeps the loss's own
    value, NaN for a mean).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from curvature.losses import describe_loss, Normalizer
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 2, -100, 1])
        >>> lean = lean_loss(describe_loss(nn.CrossEntropyLoss()), x, y, Normalizer(3.0, "mean"))
        >>> bool(torch.allclose(lean, nn.CrossEntropyLoss()(x, y)))
        True
    """
    if info.kind != "cross_entropy" or info.normalizer is not None or not normalizer.value > 0:
        return None
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        return None
    if not outputs.is_floating_point() or not (info.class_dim == -1 or outputs.ndim == 2):
        return None
    classes = outputs.shape[-1]
    logits = outputs.reshape(-1, classes)
    tokens = TokenTargets.build(
        _token_labels(info, targets), classes, ignore_index=_ignored(info), label_smoothing=info.label_smoothing,
        weight=info.weight, dtype=outputs.dtype, device=outputs.device,
    )
    return lean_cross_entropy(logits, tokens, normalizer.value)


def _ignored(info: LossInfo) -> int:
    return -100 if info.ignore_index is None else info.ignore_index
