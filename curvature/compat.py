"""Model forms PyTorch cannot differentiate twice correctly, and how the operators see through them.

* ``torch.compile`` returns an ``OptimizedModule`` whose aot_autograd graphs have no double
  backward (and no forward AD); the operators analyse the original module ``_orig_mod``, which
  shares the parameters and computes the same function.
* ``torch.nn.utils.parametrizations.weight_norm`` (and the legacy hook ``weight_norm``) compute
  ``g · v / ‖v‖`` with the fused ``torch._weight_norm``, whose double backward on CPU is wrong in
  PyTorch 2.13 (a Hessian-vector product 13-34% off finite differences). During products the
  operators compute the same weight with ordinary differentiable operations instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from typing import Iterator

from torch import Tensor, nn

__all__ = ["unwrap_compiled", "exact_weight_norm", "weight_norm_reference"]

logger = logging.getLogger(__name__)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d model wraps (the model itself otherwise).

    Examples:
        >>> m = nn.Linear(2, 1)
        >>> unwrap_compiled(m) is m
        True
    """
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        logger.info(
            "model is torch.compile'd; analysing its original module (%s): compiled graphs have no double "
            "backward, and the original computes the same function with the same parameters",
            type(orig).__name__,
        )
        return unwrap_compiled(orig)
    return model


def weight_norm_reference(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """``g · v / ‖v‖`` with the norm over all dimensions but ``dim`` (all of them for ``dim=-1``).

    Examples:
        >>> import torch
        >>> v, g = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 1, dtype=torch.float64)
        >>> bool(torch.allclose(weight_norm_reference(v, g, 0), torch._weight_norm(v, g, 0)))
        True
    """
    if dim == -1:
        return v * (g / v.norm())
    dims = [d for d in range(v.ndim) if d != dim % v.ndim]
    return v * (g / v.norm(dim=dims, keepdim=True))


def _parametrization_forward(self: nn.Module, weight_g: Tensor, weight_v: Tensor) -> Tensor:
    return weight_norm_reference(weight_v, weight_g, self.dim)


def _legacy_compute_weight(self: object, module: nn.Module) -> Tensor:
    g = getattr(module, self.name + "_g")
    v = getattr(module, self.name + "_v")
    return weight_norm_reference(v, g, self.dim)


@contextlib.contextmanager
def exact_weight_norm(model: nn.Module) -> Iterator[None]:
    """Within the block, ``weight_norm`` layers of ``model`` compute their weight differentiably.

    Only the model's own parametrization objects are changed (instance attributes), and they are
    restored on exit.

    Examples:
        >>> import torch
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> m = weight_norm(nn.Linear(2, 2))
        >>> with exact_weight_norm(m):
        ...     y = m(torch.ones(1, 2))
        >>> "forward" in vars(m.parametrizations.weight[0])
        False
    """
    from torch.nn.utils.parametrizations import _WeightNorm

    legacy_cls = getattr(sys.modules.get("torch.nn.utils.weight_norm"), "WeightNorm", None)
    patched: list[tuple[object, str]] = []
    for module in model.modules():
        if isinstance(module, _WeightNorm):
            module.forward = types.MethodType(_parametrization_forward, module)
            patched.append((module, "forward"))
        if legacy_cls is not None:
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, legacy_cls):
                    hook.compute_weight = types.MethodType(_legacy_compute_weight, hook)
                    patched.append((hook, "compute_weight"))
    if patched:
        logger.debug("weight_norm: computing %d weight(s) without torch._weight_norm", len(patched))
    try:
        yield
    finally:
        for obj, name in patched:
            delattr(obj, name)
