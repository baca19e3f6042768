"""The token-level cross-entropy loss module of language models."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TokenCrossEntropyLoss"]


class TokenCrossEntropyLoss(nn.Module):
    """Token-level cross-entropy of language-model logits ``(..., S, V)`` against labels ``(..., S)``.

    What Hugging Face causal LMs compute from ``labels``: with ``shift=True`` position ``t``
    predicts label ``t + 1``; labels equal to ``ignore_index`` (padding, prompts) are left out of
    the loss AND of its normalizer (``mean`` divides by the number of valid tokens). The
    curvature operators use its closed form (as for ``nn.CrossEntropyLoss``).

    Examples:
        >>> import torch
        >>> logits, labels = torch.zeros(2, 4, 5), torch.tensor([[1, 2, 3, -100], [4, 0, -100, -100]])
        >>> round(TokenCrossEntropyLoss(shift=True)(logits, labels).item(), 4)  # log(5) over 4 tokens
        1.6094
    """

    def __init__(
        self, *, ignore_index: int = -100, label_smoothing: float = 0.0, shift: bool = False, reduction: str = "mean"
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.shift = shift
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction,
        )
