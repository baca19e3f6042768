"""Per-layer spectra: an operator restricted to some of its parameter blocks."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor

from curvature import Block, LinearOperator, as_operator, make_blocks

__all__ = ["RestrictedOperator", "restrict"]

BlockSpec = Union[str, Block, Sequence[Union[str, Block]]]


def _select(blocks: Sequence[Block], spec: BlockSpec) -> list[Block]:
    items = [spec] if isinstance(spec, (str, Block)) else list(spec)
    if not items:
        raise ValueError("blocks must name at least one block")
    by_name = {b.name: b for b in blocks}
    chosen: list[Block] = []
    for item in items:
        if isinstance(item, Block):
            if item not in blocks:
                raise ValueError(f"block {item.name!r} is not one of the operator's blocks")
            matches = [item]
        elif isinstance(item, str):
            # An exact parameter name, or the name of any module (a parent too) that selects all
            # the parameters under it ("fc1" means fc1.weight and fc1.bias, "enc" all of enc.*).
            prefix = item + "."
            matches = [by_name[item]] if item in by_name else [b for b in blocks if b.name.startswith(prefix)]
            if not matches:
                names = ", ".join(repr(b.name) for b in blocks[:20])
                more = "" if len(blocks) <= 20 else f", ... ({len(blocks)} in all)"
                raise ValueError(
                    f"blocks: no parameter or module named {item!r}; available: {names}{more}"
                )
        else:
            raise TypeError(
                f"blocks must be names or curvature.Block objects, got {type(item).__name__}"
            )
        for b in matches:
            if b not in chosen:
                chosen.append(b)
    # Keep the operator's order so the sub-vector layout does not depend on how blocks were listed.
    order = {b.name: i for i, b in enumerate(blocks)}
    return sorted(chosen, key=lambda b: order[b.name])


class RestrictedOperator(LinearOperator):
    """The principal submatrix ``P H Pᵀ`` of an operator on a subset of its parameter blocks.

    ``P`` selects the blocks' entries of the flat vector. A product zero-pads the sub-vector into
    a full ``d``-vector, applies the full operator and extracts the selected entries, so it costs
    one FULL product (for a Hessian: a full forward and double backward), whatever the size of the
    selection. The result is the per-layer curvature block (e.g. HAWQ's per-layer Hessian), not the
    curvature of a model whose other layers are frozen at a different point.

    Attributes:
        base: the full operator.
        selected: the chosen blocks of ``base`` (in ``base``'s order); ``blocks`` re-indexes them
            into the sub-vector.

    Examples:
        >>> from curvature import DenseOperator
        >>> from curvature import make_blocks
        >>> blocks = make_blocks(["a", "b"], [(2,), (3,)])
        >>> H = DenseOperator(torch.diag(torch.arange(1.0, 6.0)), blocks=blocks)
        >>> sub = restrict(H, "b")
        >>> sub.shape, (sub @ torch.ones(3)).tolist()
        ((3, 3), [3.0, 4.0, 5.0])
    """

    def __init__(self, base: LinearOperator, blocks: BlockSpec):
        selected = _select(base.blocks, blocks)
        sub_blocks = make_blocks([b.name for b in selected], [b.shape for b in selected])
        super().__init__(sum(b.numel for b in selected), base.dtype, base.device, sub_blocks)
        self.base = base
        self.selected = tuple(selected)
        self.is_symmetric = base.is_symmetric
        self._index = torch.cat(
            [torch.arange(b.slice.start, b.slice.stop, device=base.device) for b in selected]
        )

    def _matmat(self, V: Tensor) -> Tensor:
        full = torch.zeros(self.base.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
        full[self._index] = V
        return (self.base @ full)[self._index]

    def __repr__(self) -> str:
        names = [b.name for b in self.selected]
        return f"RestrictedOperator(blocks={names}, shape={self.shape}, base={self.base!r})"


def restrict(op: Any, blocks: BlockSpec) -> RestrictedOperator:
    """Restrict ``op`` to the parameter blocks named in ``blocks`` (per-layer spectra).

    ``blocks`` is a parameter name (``"fc1.weight"``), the name of any module selecting all the
    parameters under it (``"fc1"``, or a parent such as ``"encoder"``), a :class:`curvature.Block`,
    or a sequence of these. Every product with
    the result costs one product with the full operator (see :class:`RestrictedOperator`).

    Examples:
        >>> from curvature import DenseOperator
        >>> from curvature import make_blocks
        >>> blocks = make_blocks(["fc.weight", "fc.bias"], [(2, 2), (1,)])
        >>> H = DenseOperator(torch.eye(5), blocks=blocks)
        >>> restrict(H, "fc.weight").shape, restrict(H, "fc").shape
        ((4, 4), (5, 5))
    """
    return RestrictedOperator(as_operator(op), blocks)
