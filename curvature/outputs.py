"""Picking the tensor the loss takes out of what a model returns (Hugging Face outputs, dicts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from torch import Tensor

__all__ = ["OutputSelector", "select_output"]

#: ``outputs=`` option of the operators: maps the model's return value to the loss's input tensor.
OutputSelector = Optional[Callable[[Any], Tensor]]


def select_output(out: Any, outputs: OutputSelector = None, *, who: str = "the curvature operator") -> Tensor:
    """The tensor the loss is applied to.

    With ``outputs`` given, ``outputs(out)``; otherwise ``out`` itself when it is a tensor, or its
    ``logits`` (a Hugging Face ``ModelOutput`` such as ``CausalLMOutputWithCrossAttentions``, or a
    dict with a ``"logits"`` key).

    Examples:
        >>> import torch
        >>> select_output({"logits": torch.zeros(2, 3), "hidden": torch.ones(2)}).shape
        torch.Size([2, 3])
        >>> select_output((torch.zeros(2), torch.ones(1)), lambda out: out[1]).tolist()
        [1.0]
    """
    if outputs is not None:
        picked = outputs(out)
        if not isinstance(picked, Tensor):
            raise TypeError(f"outputs= must return a tensor for {who}, got {type(picked).__name__}")
        return picked
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model must return one tensor (or an output with .logits) for {who}, got {type(out).__name__}; "
        "pass outputs=lambda out: ... to pick the tensor the loss takes"
    )
