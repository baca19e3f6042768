"""Parameter blocks: how a flat curvature vector maps onto named parameter tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Block", "make_blocks", "flatten_tensors", "unflatten_vector", "group_blocks_by_module"]


@dataclass(frozen=True)
class Block:
    """One parameter's slice of the flat vector an operator acts on.

    Attributes:
        name: the parameter's qualified name (``"0.weight"``), or a user-chosen label.
        shape: the parameter's shape.
        slice: where the parameter sits in the flat ``(d,)`` vector.

    Examples:
        >>> b = Block("fc.weight", (3, 4), slice(0, 12))
        >>> b.numel, b.module
        (12, 'fc')
    """

    name: str
    shape: tuple[int, ...]
    slice: slice

    @property
    def numel(self) -> int:
        """Number of entries of the block."""
        return self.slice.stop - self.slice.start

    @property
    def module(self) -> str:
        """Name of the module owning the parameter (the name without its last component)."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else self.name


def make_blocks(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> tuple[Block, ...]:
    """Consecutive blocks for parameters with the given names and shapes.

    Examples:
        >>> [b.slice for b in make_blocks(["w", "b"], [(2, 3), (2,)])]
        [slice(0, 6, None), slice(6, 8, None)]
    """
    blocks, start = [], 0
    for name, shape in zip(names, shapes):
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        blocks.append(Block(name, shape, slice(start, start + numel)))
        start += numel
    return tuple(blocks)


def group_blocks_by_module(blocks: Sequence[Block]) -> dict[str, list[Block]]:
    """Group blocks by owning module, in first-appearance order (weight + bias = one layer).

    Examples:
        >>> bl = make_blocks(["fc.weight", "fc.bias", "out.weight"], [(2, 2), (2,), (1, 2)])
        >>> {k: [b.name for b in v] for k, v in group_blocks_by_module(bl).items()}
        {'fc': ['fc.weight', 'fc.bias'], 'out': ['out.weight']}
    """
    groups: dict[str, list[Block]] = {}
    for block in blocks:
        groups.setdefault(block.module, []).append(block)
    return groups


def flatten_tensors(tensors: Sequence[Tensor], blocks: Sequence[Block]) -> Tensor:
    """Concatenate per-parameter tensors into a flat ``(d,)`` vector or a ``(d, k)`` matrix.

    Each tensor has its block's shape, optionally with one trailing column dimension ``k``
    (the same ``k`` for all).

    Examples:
        >>> bl = make_blocks(["w", "b"], [(2, 2), (2,)])
        >>> flatten_tensors([torch.ones(2, 2), torch.zeros(2)], bl).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """
    if len(tensors) != len(blocks):
        raise ValueError(f"expected {len(blocks)} tensors (one per parameter block), got {len(tensors)}")
    trailing = None
    parts = []
    for tensor, block in zip(tensors, blocks):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"block {block.name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) == block.shape:
            extra: tuple[int, ...] = ()
        elif tuple(tensor.shape[:-1]) == block.shape:
            extra = (tensor.shape[-1],)
        else:
            raise ValueError(
                f"block {block.name!r}: expected shape {block.shape} (or {block.shape} + (k,)), "
                f"got {tuple(tensor.shape)}"
            )
        if trailing is None:
            trailing = extra
        elif trailing != extra:
            raise ValueError("all tensors must share the same trailing column dimension")
        parts.append(tensor.reshape(block.numel, *extra))
    return torch.cat(parts, dim=0)


def unflatten_vector(vector: Tensor, blocks: Sequence[Block]) -> list[Tensor]:
    """Split a flat ``(d,)`` vector or ``(d, k)`` matrix into per-parameter tensors (views).

    Examples:
        >>> bl = make_blocks(["w", "b"], [(2, 2), (2,)])
        >>> [tuple(t.shape) for t in unflatten_vector(torch.arange(6.0), bl)]
        [(2, 2), (2,)]
    """
    extra = tuple(vector.shape[1:])
    return [vector[block.slice].reshape(*block.shape, *extra) for block in blocks]
