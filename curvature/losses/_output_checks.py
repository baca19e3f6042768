"""Clear errors for model outputs a loss cannot take, before autograd's."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._recognise import LossInfo

__all__ = ["check_outputs"]


def check_outputs(info: LossInfo, outputs: Any, targets: Any) -> None:
    """Clear errors, before autograd's, for outputs the loss cannot take: not floating point,
    targets on another device, shapes that do not match (MSE/BCE would silently broadcast).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from curvature.losses import describe_loss
        >>> check_outputs(describe_loss(nn.MSELoss()), torch.zeros(4, 2), torch.zeros(4, 1))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: model outputs of shape (4, 2) do not match targets of shape (4, 1) for mse ...
    """
    if not isinstance(outputs, Tensor):
        return
    if not outputs.is_floating_point():
        raise TypeError(
            f"the model outputs are {outputs.dtype}; curvature needs floating-point outputs the loss is "
            "twice differentiable in"
        )
    if isinstance(targets, Tensor) and targets.device != outputs.device:
        raise ValueError(f"targets are on {targets.device} but the model outputs are on {outputs.device}")
    if info.kind in ("mse", "bce_with_logits") and isinstance(targets, Tensor) and targets.shape != outputs.shape:
        raise ValueError(
            f"model outputs of shape {tuple(outputs.shape)} do not match targets of shape {tuple(targets.shape)} "
            f"for {info.kind} (PyTorch would broadcast them); reshape the outputs or targets"
        )
    if info.kind == "cross_entropy" and info.class_dim == -1:
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.shape != outputs.shape[:-1]:
            raise ValueError(
                f"token cross-entropy needs logits (..., S, V) and integer labels (..., S); got logits of shape "
                f"{tuple(outputs.shape)} and targets of shape {tuple(getattr(targets, 'shape', ()))}"
            )
    elif info.kind == "cross_entropy":
        if outputs.ndim < 2:
            raise ValueError(f"cross-entropy outputs need a class dimension, got shape {tuple(outputs.shape)}")
        if isinstance(targets, Tensor):
            expected = (outputs.shape[0], *outputs.shape[2:])
            ok = targets.shape == outputs.shape if targets.is_floating_point() else tuple(targets.shape) == expected
            if not ok:
                raise ValueError(
                    f"cross-entropy outputs of shape {tuple(outputs.shape)} (classes in dim 1) need class targets "
                    f"of shape {expected} or probabilities of shape {tuple(outputs.shape)}, got "
                    f"{tuple(targets.shape)}; for (N, S, V) language-model logits pass outputs.transpose(1, 2) "
                    "or flatten both"
                )
