"""The operator contract: a square matrix that is only ever applied, never formed."""

from __future__ import annotations

import abc
import logging
from typing import Any, Sequence, Union

import torch
from torch import Tensor

from .blocks import Block, flatten_tensors, make_blocks, unflatten_vector

__all__ = ["LinearOperator", "DenseOperator", "as_operator", "check_operand"]

logger = logging.getLogger(__name__)

#: Largest dimension ``to_dense`` builds without ``force=True`` (a 20k x 20k float64 matrix is 3.2 GB).
DENSE_LIMIT = 20_000

Operand = Union[Tensor, Sequence[Tensor]]


def check_operand(x: Tensor, dim: int, dtype: torch.dtype, device: torch.device, *, name: str = "v") -> Tensor:
    """Validate a ``(d,)`` or ``(d, k)`` operand against an operator's dimension, dtype and device.

    Raises ``ValueError`` for a wrong shape or device and ``TypeError`` for a wrong dtype, each
    naming what was expected.

    Examples:
        >>> check_operand(torch.ones(3), 3, torch.float32, torch.device("cpu")).shape
        torch.Size([3])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (1, 2) or x.shape[0] != dim:
        raise ValueError(f"{name} must have shape ({dim},) or ({dim}, k), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, but the operator works in {dtype}; convert it with .to({dtype})")
    if x.device.type != device.type or (
        device.index is not None and x.device.index is not None and x.device.index != device.index
    ):
        raise ValueError(f"{name} is on {x.device}, but the operator is on {device}; move it with .to('{device}')")
    return x


class LinearOperator(abc.ABC):
    """Base class of every operator in the toolkit: a square ``d x d`` matrix applied by ``@``.

    Subclasses implement :meth:`_matmat` for a ``(d, k)`` block of columns; this class handles
    vectors, per-parameter tensor lists, validation, the product counter and conversions, in the
    style of :class:`scipy.sparse.linalg.LinearOperator`.

    Attributes:
        num_matvecs: number of columns multiplied so far (a ``(d, k)`` product counts ``k``).

    Examples:
        >>> op = DenseOperator(torch.eye(3))
        >>> (op @ torch.ones(3)).tolist(), op.shape, op.num_matvecs
        ([1.0, 1.0, 1.0], (3, 3), 1)
    """

    #: Whether the operator is symmetric (all curvature matrices are).
    is_symmetric: bool = True

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, blocks: Sequence[Block] | None = None):
        self._dim = int(dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self._blocks = tuple(blocks) if blocks is not None else make_blocks(["all"], [(self._dim,)])
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, d)``."""
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the vectors the operator accepts and returns."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the vectors the operator accepts and returns."""
        return self._device

    @property
    def blocks(self) -> tuple[Block, ...]:
        """Ordered parameter blocks (name, shape, slice into the flat vector)."""
        return self._blocks

    @abc.abstractmethod
    def _matmat(self, V: Tensor) -> Tensor:
        """Multiply a validated ``(d, k)`` matrix; return ``(d, k)``."""

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``self @ V`` for a ``(d, k)`` matrix ``V``."""
        V = check_operand(V, self._dim, self._dtype, self._device, name="V")
        if V.ndim != 2:
            raise ValueError(f"V must have shape ({self._dim}, k), got {tuple(V.shape)}")
        if V.shape[1] == 0:
            return V.clone()
        out = self._matmat(V)
        self.num_matvecs += V.shape[1]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``self @ v`` for a ``(d,)`` vector ``v``."""
        v = check_operand(v, self._dim, self._dtype, self._device, name="v")
        if v.ndim != 1:
            raise ValueError(f"v must have shape ({self._dim},), got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            flat = self.flatten(x)
            return self.unflatten(self @ flat)
        if isinstance(x, Tensor) and x.ndim == 1:
            return self.matvec(x)
        return self.matmat(x)

    def __rmatmul__(self, x: Any) -> Any:
        # x @ A = (A^T x^T)^T; all our operators are symmetric.
        if not self.is_symmetric:
            return NotImplemented
        if isinstance(x, Tensor) and x.ndim == 2:
            return self.matmat(x.T).T
        return self @ x

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-block tensors (each block-shaped, optionally with a trailing ``k``) into a flat vector."""
        return flatten_tensors(tensors, self._blocks)

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat ``(d,)``/``(d, k)`` tensor into per-block tensors."""
        return unflatten_vector(vector, self._blocks)

    def to_dense(self, *, force: bool = False, block_size: int = 256) -> Tensor:
        """Form the dense ``d x d`` matrix by multiplying identity columns in blocks.

        Refuses when ``d`` exceeds ``DENSE_LIMIT`` unless ``force=True``.
        """
        if self._dim > DENSE_LIMIT and not force:
            raise ValueError(
                f"to_dense() would form a {self._dim} x {self._dim} matrix; pass force=True if you mean it"
            )
        cols = []
        for start in range(0, self._dim, block_size):
            stop = min(start + block_size, self._dim)
            E = torch.zeros(self._dim, stop - start, dtype=self._dtype, device=self._device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """Wrap as a :class:`scipy.sparse.linalg.LinearOperator` acting on NumPy arrays.

        Examples:
            >>> import numpy as np
            >>> A = DenseOperator(2 * torch.eye(2, dtype=torch.float64)).to_scipy()
            >>> A @ np.ones(2)
            array([2., 2.])
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def _apply(x):
            x = np.asarray(x)
            t = torch.as_tensor(np.ascontiguousarray(x), device=self._device).to(self._dtype)
            out = self @ t
            return out.detach().cpu().numpy().astype(np.result_type(x.dtype, np.float32), copy=False)

        np_dtype = torch.empty((), dtype=self._dtype).numpy().dtype if self._dtype != torch.bfloat16 else np.float32
        return ScipyLinearOperator(
            shape=self.shape, matvec=_apply, matmat=_apply, rmatvec=_apply, rmatmat=_apply, dtype=np_dtype
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self._dtype}, device={self._device})"


class DenseOperator(LinearOperator):
    """An explicit matrix behind the operator interface (for tests, small problems and adapters).

    Examples:
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0])))
        >>> (A @ torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, matrix: Tensor, *, blocks: Sequence[Block] | None = None, symmetric: bool = True):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device, blocks)
        self.matrix = matrix
        self.is_symmetric = symmetric

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


class _ScipyAdapter(LinearOperator):
    def __init__(self, op: Any, dtype: torch.dtype, device: torch.device):
        super().__init__(op.shape[0], dtype, device)
        self.op = op

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.op.matmat(V.detach().cpu().numpy())
        return torch.as_tensor(out, device=self._device).to(self._dtype)


class _TorchMatmulAdapter(LinearOperator):
    """Any object with ``shape``, ``dtype`` (a ``torch.dtype``), ``device`` and ``@`` on tensors."""

    def __init__(self, op: Any):
        super().__init__(op.shape[0], op.dtype, torch.device(getattr(op, "device", "cpu")))
        self.op = op
        self.is_symmetric = bool(getattr(op, "is_symmetric", True))

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op @ V


def as_operator(
    op: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None, name: str = "op"
) -> LinearOperator:
    """Return ``op`` as a square :class:`LinearOperator` (the one adapter every package uses).

    Accepts our operators (returned unchanged); a square floating-point ``torch.Tensor``; any
    object with ``shape``, a ``torch.dtype`` ``dtype``, ``device`` and ``@`` on torch tensors (the
    documented operator contract); and a ``scipy.sparse.linalg.LinearOperator`` or anything with
    ``shape`` and ``matmat``, such as a NumPy array (``dtype`` defaults to float64 and ``device`` to
    CPU for those). Errors name the argument (``name``).

    Examples:
        >>> import numpy as np
        >>> as_operator(np.eye(2)).shape
        (2, 2)
        >>> as_operator(torch.ones(2, 3))
        Traceback (most recent call last):
            ...
        ValueError: op must be a square (d, d) operator, got shape (2, 3)
    """
    if isinstance(op, LinearOperator):
        return op
    shape = getattr(op, "shape", None)
    if shape is None or not (hasattr(op, "__matmul__") or hasattr(op, "matmat")):
        raise TypeError(f"{name} must be an operator with .shape and @ (or a square matrix), got {type(op).__name__}")
    shape = tuple(shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{name} must be a square (d, d) operator, got shape {shape}")
    if shape[0] < 1:
        raise ValueError(f"{name} must have dimension d >= 1, got shape {shape}")
    if isinstance(op, Tensor):
        if not op.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {op.dtype}")
        return DenseOperator(op)
    if isinstance(getattr(op, "dtype", None), torch.dtype) and not hasattr(op, "matmat"):
        return _TorchMatmulAdapter(op)
    if not hasattr(op, "matmat"):
        from scipy.sparse.linalg import aslinearoperator

        op = aslinearoperator(op)
    return _ScipyAdapter(op, dtype or torch.float64, torch.device(device or "cpu"))
