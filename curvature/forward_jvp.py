"""One forward pass that returns the model outputs (with their reverse-mode graph) and one
Jacobian-vector product ``J v`` by forward-mode AD, where that is the ``J`` the user's
``loss.backward()`` differentiates.

The output-space operators (GGN, Fisher, empirical Fisher) use it for the first column of a
batch whose graph is not cached: ``J v`` comes with the forward instead of a create-graph
backward of a dummy cotangent plus a double backward (two backward passes, each with the
``B x T x V`` matrix products of a language-model head), see
:class:`~curvature.output_space.OutputSpaceOperator`.

Forward and reverse mode differentiate different programs where the model's code says so:

* ``torch.no_grad()`` / ``torch.inference_mode()`` regions are constants for reverse mode but
  forward mode propagates tangents through them;
* tensor hooks (``Tensor.register_hook``, module backward hooks, hooks on the parameters)
  change what reverse mode computes and are invisible to forward mode;
* complex parameters or outputs follow different conjugation conventions.

:func:`forward_jvp` refuses all three (:class:`ForwardModeUnavailable`, the caller then uses
reverse mode): the first two are watched by a :class:`~torch.overrides.TorchFunctionMode`
during the forward, the last checked up front. Ops without a forward-AD formula and custom
``autograd.Function`` s without ``jvp`` raise inside PyTorch and are refused the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .functional import with_parameters

__all__ = ["ForwardModeUnavailable", "forward_jvp"]

_HOOK_REGISTRATIONS = frozenset({Tensor.register_hook, Tensor.register_post_accumulate_grad_hook})


class ForwardModeUnavailable(RuntimeError):
    """Forward-mode ``J v`` is not (or not provably) the reverse-mode one for this model."""


class _ReverseOnlyWatch(TorchFunctionMode):
    """Notes the first op that makes forward mode differ from reverse mode: one on a tensor with
    a tangent while gradients are disabled, or a tensor hook registration."""

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.reason is None:
            if func in _HOOK_REGISTRATIONS:
                self.reason = "the model registers a tensor hook in its forward"
            elif not torch.is_grad_enabled() and _has_tangent((args, kwargs)):
                name = getattr(func, "__name__", repr(func))
                self.reason = f"the model calls {name} under torch.no_grad() on a tensor that depends on the parameters"
        return func(*args, **kwargs)


def _has_tangent(tree: Any) -> bool:
    return any(
        isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tree_leaves(tree)
    )


def _reverse_hooks(model: nn.Module, params: Sequence[Tensor]) -> str | None:
    from torch.nn.modules import module as module_globals

    if getattr(module_globals, "_global_backward_hooks", None) or getattr(
        module_globals, "_global_backward_pre_hooks", None
    ):
        return "global module backward hooks are registered"
    for name, m in model.named_modules():
        if m._backward_hooks or m._backward_pre_hooks:
            return f"module {name or type(m).__name__!r} has backward hooks"
    if any(getattr(p, "_backward_hooks", None) for p in params):
        return "a parameter has a gradient hook"
    return None


def forward_jvp(
    model: nn.Module,
    names: Sequence[str],
    params: Sequence[Tensor],
    tangents: Sequence[Tensor],
    forward: Callable[[], Any],
) -> tuple[Any, Tensor | None]:
    """``(outputs, J v)``: ``forward()`` run once with the parameters ``names`` (the tensors
    ``params``) carrying the tangents ``v``; ``outputs`` keeps its reverse-mode graph to
    ``params``; ``J v`` is ``None`` where the outputs do not depend on them in forward mode.

    Raises :class:`ForwardModeUnavailable` where forward mode would differ from reverse mode
    (see the module docs) or PyTorch cannot apply it; the forward has then run once (so a
    train-mode model's buffers moved: callers restore them as for any product).

    Examples:
        >>> lin = nn.Linear(3, 2)
        >>> x, v = torch.randn(5, 3), [torch.randn(2, 3), torch.randn(2)]
        >>> out, jv = forward_jvp(lin, ["weight", "bias"], list(lin.parameters()), v, lambda: lin(x))
        >>> bool(torch.allclose(jv, x @ v[0].T + v[1]))
        True
    """
    for p in params:
        if not p.is_floating_point():
            raise ForwardModeUnavailable(f"parameters of dtype {p.dtype}")
    reason = _reverse_hooks(model, params)
    if reason is not None:
        raise ForwardModeUnavailable(reason)
    watch = _ReverseOnlyWatch()
    try:
        with torch.enable_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(p, t.to(p.dtype)) for p, t in zip(params, tangents)]
            with watch:
                out = with_parameters(model, names, forward)(*duals)
            if not isinstance(out, Tensor):
                return out, None
            primal, tangent = fwAD.unpack_dual(out)
            # The tangent's own reverse graph (recorded because the primals require grad) is not needed.
            tangent = tangent.detach() if tangent is not None else None
    except (RuntimeError, NotImplementedError) as exc:
        raise ForwardModeUnavailable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    if watch.reason is not None:
        raise ForwardModeUnavailable(watch.reason)
    if not primal.is_floating_point():
        raise ForwardModeUnavailable(f"outputs of dtype {primal.dtype}")
    return primal, tangent
