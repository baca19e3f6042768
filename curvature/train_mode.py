"""The train-mode guard of the model operators: curvature products must be deterministic functions,
which Dropout, BatchNorm and any module reading ``self.training`` break in train mode.

Such a model is refused, naming the modules, unless ``allow_train_mode=True`` (then it warns); in
train mode the products restore the model's buffers (BatchNorm running statistics) afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ._state import mode_dependent_modules

__all__ = ["check_mode", "preserved_buffers"]


def check_mode(model: nn.Module, *, allow_train_mode: bool, stacklevel: int = 3) -> None:
    """Refuse (``RuntimeError``) or, with ``allow_train_mode``, warn about modules in train mode
    whose behaviour depends on it.

    Examples:
        >>> check_mode(nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval(), allow_train_mode=False)
        >>> check_mode(nn.Sequential(nn.Dropout()), allow_train_mode=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: the model is in train mode and modules that behave differently in train mode are in it: ...
    """
    offenders = mode_dependent_modules(model)
    if not offenders:
        return
    listed = ", ".join(f"'{name}' ({kind})" for name, kind in offenders[:4])
    message = (
        f"the model is in train mode and modules that behave differently in train mode are in it: {listed}"
        f"{', ...' if len(offenders) > 4 else ''}; curvature products would be random or not those of the "
        "model you evaluate; call model.eval() first"
    )
    if not allow_train_mode:
        raise RuntimeError(message + ", or pass allow_train_mode=True to analyse train mode deliberately")
    warnings.warn(message + " (allow_train_mode=True: going ahead)", stacklevel=stacklevel + 1)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module, *, allow_train_mode: bool) -> Iterator[None]:
    """Restore the model's buffers (BatchNorm running statistics in train mode) on leaving.

    Examples:
        >>> bn = nn.BatchNorm1d(2)
        >>> with preserved_buffers(bn, allow_train_mode=True):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    saved = None
    if allow_train_mode and any(m.training for m in model.modules()):
        saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(saved[name])
