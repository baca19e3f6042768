"""What a cached curvature product depends on, captured cheaply: the model's tensors and modes, and
the identity or content of a data batch; and which modules behave differently in train mode.

A cached autograd graph is valid while every parameter and buffer of the model (not only the
selected ones) holds the same values and every module has the same ``training`` flag. Version
counters catch in-place updates (optimizer steps, ``torch.no_grad()`` updates, ``load_state_dict``,
BatchNorm running statistics), storage pointers catch ``p.data = new``, and an O(d) fingerprint
(the sum of each tensor's bit patterns, one reduction per tensor) catches ``p.data.add_(...)``,
which bypasses the version counter. The fingerprint misses only changes that keep every tensor's
bit-pattern sum, such as permuting a tensor's entries through ``.data``; call ``op.release()``
after such edits.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ModelState", "capture_state", "tensor_fingerprint", "mode_dependent_modules", "BatchKey", "batch_key"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_fingerprint(tensors: Sequence[Tensor]) -> Tensor | None:
    """One int64 per tensor: the sum of its entries' bit patterns (``None`` for no tensors).

    Examples:
        >>> a = torch.ones(3)
        >>> f = tensor_fingerprint([a])
        >>> a.data.add_(1e-7)  # invisible to the version counter
        tensor([1.0000, 1.0000, 1.0000])
        >>> torch.equal(f, tensor_fingerprint([a]))
        False
    """
    sums = []
    for t in tensors:
        t = t.detach()
        if t.is_sparse or t.device.type == "meta" or t.is_complex():
            sums.append(torch.zeros((), dtype=torch.int64, device=t.device))
            continue
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        elif t.is_floating_point():
            t = t.view(_INT_OF_SIZE[t.element_size()])
        sums.append(t.sum(dtype=torch.int64))
    if not sums:
        return None
    devices = {s.device for s in sums}
    if len(devices) > 1:
        sums = [s.cpu() for s in sums]
    return torch.stack(sums)


@dataclass(frozen=True)
class ModelState:
    """A snapshot of everything a product depends on in the model (see the module docstring)."""

    structure: tuple[Any, ...]
    fingerprint: Tensor | None

    def matches(self, other: ModelState | None) -> bool:
        """Whether ``other`` is the same state (one device sync on GPU models)."""
        if other is None or self.structure != other.structure:
            return False
        if self.fingerprint is None or other.fingerprint is None:
            return self.fingerprint is other.fingerprint
        return bool(torch.equal(self.fingerprint, other.fingerprint))


def _tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def state_structure(model: nn.Module, tensors: list[Tensor] | None = None) -> tuple[Any, ...]:
    """Identities, storage pointers, version counters, shapes and dtypes of the model's tensors,
    and every module's ``training`` flag (cheap: no tensor is read)."""
    tensors = _tensors(model) if tensors is None else tensors
    return (
        tuple((id(t), t.data_ptr(), t._version, t.shape, t.dtype) for t in tensors),
        tuple(m.training for m in model.modules()),
    )


def capture_state(model: nn.Module) -> ModelState:
    """The :class:`ModelState` of ``model`` now.

    Examples:
        >>> m = nn.Linear(2, 2)
        >>> s = capture_state(m)
        >>> s.matches(capture_state(m)), s.matches(capture_state(m.train(False)))
        (True, False)
    """
    tensors = _tensors(model)
    return ModelState(state_structure(model, tensors), tensor_fingerprint(tensors))


# -- batches ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchKey:
    """Recognises a batch: by identity (a batch the operator holds) or by content (a loader's)."""

    structure: tuple[Any, ...]
    fingerprint: Tensor | None

    def matches(self, other: BatchKey) -> bool:
        if self.structure != other.structure:
            return False
        if self.fingerprint is None or other.fingerprint is None:
            return self.fingerprint is other.fingerprint
        return bool(torch.equal(self.fingerprint, other.fingerprint))


def batch_key(tensors: Sequence[Tensor], *, by_content: bool) -> BatchKey:
    """Key of a batch's tensors: shapes and dtypes plus either identities and versions
    (``by_content=False``, for tensors kept alive by the operator) or a content fingerprint
    (for batches a loader creates anew on every pass, whose memory addresses get reused)."""
    shapes = tuple((t.shape, t.dtype, t.device) for t in tensors)
    if by_content:
        return BatchKey(shapes, tensor_fingerprint(tensors))
    return BatchKey((shapes, tuple((id(t), t.data_ptr(), t._version) for t in tensors)), None)


# -- train mode -----------------------------------------------------------------------------------
def _reads_training(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "training" for n in ast.walk(node))


@functools.cache
def _class_is_mode_dependent(cls: type) -> bool:
    """Whether any method of ``cls`` (or its bases below ``nn.Module``) reads ``.training``.

    Classes whose source cannot be read count as mode dependent (we cannot tell)."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not issubclass(klass, nn.Module):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            return True
        try:
            if _reads_training(ast.parse(source)):
                return True
        except SyntaxError:
            return True
    return False


def _forward_override_reads_training(module: nn.Module) -> bool:
    fn = module.__dict__.get("forward")
    if fn is None:
        return False
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return True
    if "training" not in source:
        return False
    try:
        return _reads_training(ast.parse(source))
    except SyntaxError:  # a lambda cut out of a larger expression
        return True


def mode_dependent_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(qualified name, type name)`` of the modules in train mode whose code reads ``.training``
    (Dropout, BatchNorm, RReLU, ``F.dropout(x, p, self.training)`` in a custom layer, ...).

    The model's behaviour can then change with the mode, so curvature products could be random
    or differ from eval mode. Modules that never read the flag (Linear, Conv, activations,
    containers) are harmless in train mode.

    Examples:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.RReLU())
        >>> mode_dependent_modules(m.train())
        [('1', 'Dropout'), ('2', 'RReLU')]
        >>> mode_dependent_modules(m.eval())
        []
    """
    if not any(m.training for m in model.modules()):  # the common case, without building names
        return []
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if _class_is_mode_dependent(type(module)) or _forward_override_reads_training(module):
            found.append((name or "<root>", type(module).__name__))
    return found
