"""M-FAC (dynamic): the damped inverse over a sliding window of the last ``m`` gradients.

State: the window ``G`` (``m x d`` ring buffer, empty slots are zero rows) and its Gram matrix
``K = G Gᵀ`` in float64. With ``A = λ I + K / m``:

* arbitrary ``x`` (Woodbury): ``F⁻¹ x = x / λ − Gᵀ A⁻¹ (G x) / (λ m)``;
* a window gradient ``x = Gᵀ e`` (push-through): ``F⁻¹ Gᵀ e = Gᵀ A⁻¹ e``. This has no
  cancellation, so :meth:`SlidingMFACInverse.update_and_multiply` (the optimizer's call) stays
  accurate in float32 for any damping, where the Woodbury form loses digits like ``1 / λ``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._linalg import all_finite, no_tf32, stable_cholesky
from .checks import check_count, check_damping
from .linear_operator import LinearOperator, check_operand

__all__ = ["SlidingMFACInverse"]


class SlidingMFACInverse(LinearOperator):
    """``F⁻¹`` for ``F = λ I + (1/m) Σ g gᵀ`` over the last ``m`` gradients pushed with :meth:`update`.

    Until ``m`` gradients have been pushed, the empty slots of the window are zero rows and the
    normalization stays ``1/m`` (as in the reference optimizer): after ``n < m`` updates the
    operator is ``(λ I + (1/m) Σ_{i<=n} g_i g_iᵀ)⁻¹``, which is ``λ⁻¹ I`` before the first update.
    The :class:`~curvature.mfac.MFACInverse` of the same matrix is the one of the pushed
    gradients scaled by ``sqrt(n/m)``.

    Costs: :meth:`update` one pass over the window (``G g``, ``O(dm)``) plus an ``m x m`` float64
    Cholesky factorisation (``O(m³)``, done lazily, once per window change); ``@ x`` two passes
    over the window plus ``O(m²)``; :meth:`update_and_multiply` two passes in all.

    Stability: nothing is updated incrementally. Each Gram entry is the dot product of two rows
    that are in the window, computed once when the newer one arrives, and the factorisation is
    recomputed from the Gram matrix after every change, so no error accumulates however many
    updates are made (checked after ``10 m`` updates against a fresh static inverse).

    Args:
        dim: ``d``, the length of the gradients.
        num_grads: ``m``, the window size.
        damping: ``λ > 0``.
        dtype: of the window and of the vectors (float32 by default; the ``m x m`` algebra is
            always float64).
        device: of the window and of the vectors.

    Examples:
        >>> Finv = SlidingMFACInverse(2, num_grads=1, damping=1.0, dtype=torch.float64)
        >>> Finv.update_and_multiply(torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist()
        [0.3333333333333333, 0.3333333333333333]
        >>> Finv.num_updates, (Finv @ torch.tensor([1.0, -1.0], dtype=torch.float64)).tolist()
        (1, [1.0, -1.0])
    """

    def __init__(
        self,
        dim: int,
        *,
        num_grads: int,
        damping: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        dim = check_count(dim, name="dim")
        num_grads = check_count(num_grads, name="num_grads")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
        device = torch.device(device if device is not None else "cpu")
        window = torch.zeros(num_grads, dim, dtype=dtype, device=device)
        gram = torch.zeros(num_grads, num_grads, dtype=torch.float64, device=device)
        self._init(window, gram, damping, slot=0, num_updates=0)

    @classmethod
    def from_buffers(
        cls, window: Tensor, gram: Tensor, *, damping: float, slot: int = 0, num_updates: int = 0
    ) -> SlidingMFACInverse:
        """Wrap existing state tensors WITHOUT copying; updates write into them.

        This is how :class:`curvature.optim.MFAC` keeps the window in its optimizer state.
        ``window`` is ``(m, d)``; ``gram`` is its ``(m, m)`` float64 Gram matrix; ``slot`` is the
        next row to overwrite.

        Examples:
            >>> gram = torch.zeros(4, 4, dtype=torch.float64)
            >>> inv = SlidingMFACInverse.from_buffers(torch.zeros(4, 3), gram, damping=0.5)
            >>> inv.shape, inv.num_grads
            ((3, 3), 4)
        """
        if not isinstance(window, Tensor) or window.ndim != 2 or not window.is_floating_point():
            raise ValueError("window must be a floating (m, d) tensor")
        m = window.shape[0]
        if not isinstance(gram, Tensor) or gram.shape != (m, m) or gram.dtype != torch.float64:
            raise ValueError(f"gram must be an ({m}, {m}) float64 tensor")
        if gram.device != window.device:
            raise ValueError(f"gram is on {gram.device} but window is on {window.device}")
        self = cls.__new__(cls)
        self._init(window, gram, damping, slot=slot, num_updates=num_updates)
        return self

    def _init(self, window: Tensor, gram: Tensor, damping: float, *, slot: int, num_updates: int) -> None:
        m, d = window.shape
        super().__init__(d, window.dtype, window.device)
        self.damping = check_damping(damping)
        self.num_grads = m
        self.window = window
        self.gram = gram
        self.slot = check_count(slot, name="slot", minimum=0) % m
        self.num_updates = check_count(num_updates, name="num_updates", minimum=0)
        self._factor: Tensor | None = None

    # -- window ---------------------------------------------------------------------------------
    @property
    def num_filled(self) -> int:
        """How many window slots hold a gradient (``min(num_updates, m)``)."""
        return min(self.num_updates, self.num_grads)

    def update(self, g: Tensor) -> None:
        """Push gradient ``g`` (``(d,)``), replacing the oldest once the window is full.

        Raises ``ValueError`` for a wrong shape/device or a NaN/inf entry (which would poison
        the window for ``m`` steps) and ``TypeError`` for a wrong dtype.
        """
        self._push(g)

    def update_and_multiply(self, g: Tensor) -> Tensor:
        """Push ``g`` and return ``F⁻¹ g`` for the new window, with the cancellation-free form D1.

        Examples:
            >>> inv = SlidingMFACInverse(3, num_grads=4, damping=1e-8, dtype=torch.float64)
            >>> g = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
            >>> [round(v, 6) for v in inv.update_and_multiply(g).tolist()]  # m g / (λ m + |g|²)
            [0.48, 0.0, 0.64]
        """
        slot = self._push(g)
        with no_tf32(self.device):
            e = torch.zeros(self.num_grads, 1, dtype=torch.float64, device=self.device)
            e[slot] = 1.0
            y = torch.cholesky_solve(e, self._cholesky())
            return (self.window.T @ y.to(self.dtype))[:, 0]

    def _push(self, g: Tensor) -> int:
        g = check_operand(g, self.shape[0], self.dtype, self.device, name="g")
        if g.ndim != 1:
            raise ValueError(f"g must be one gradient of shape ({self.shape[0]},), got {tuple(g.shape)}")
        if not all_finite(g):
            raise ValueError("g contains NaN or inf; it would corrupt the window for the next num_grads updates")
        slot = self.slot
        with torch.no_grad(), no_tf32(self.device):
            self.window[slot].copy_(g)
            k = (self.window @ g).to(torch.float64)
            self.gram[slot, :] = k
            self.gram[:, slot] = k
        self.slot = (slot + 1) % self.num_grads
        self.num_updates += 1
        self._factor = None
        return slot

    def _cholesky(self) -> Tensor:
        if self._factor is None:
            A = self.gram / self.num_grads
            A.diagonal().add_(self.damping)
            self._factor = stable_cholesky(A, self.damping)
        return self._factor

    # -- products -------------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        with torch.no_grad(), no_tf32(self.device):
            S = (self.window @ V).to(torch.float64)
            Z = torch.cholesky_solve(S, self._cholesky()).to(self.dtype)
            inv = 1.0 / self.damping
            return torch.addmm(V, self.window.T, Z, beta=inv, alpha=-inv / self.num_grads)

    def window_gradients(self) -> Tensor:
        """The pushed gradients still in the window, oldest first, as an ``(n, d)`` view/copy."""
        n = self.num_filled
        if n < self.num_grads:
            return self.window[:n]
        return torch.cat([self.window[self.slot :], self.window[: self.slot]])

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and counters that restore the exact window with :meth:`load_state_dict`."""
        return {
            "window": self.window,
            "gram": self.gram,
            "slot": self.slot,
            "num_updates": self.num_updates,
            "damping": self.damping,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (copied into this operator's buffers)."""
        window, gram = state["window"], state["gram"]
        if tuple(window.shape) != tuple(self.window.shape):
            raise ValueError(f"state window has shape {tuple(window.shape)}, expected {tuple(self.window.shape)}")
        self.window.copy_(window)
        self.gram.copy_(gram)
        self.damping = check_damping(state["damping"])
        self.slot = int(state["slot"]) % self.num_grads
        self.num_updates = int(state["num_updates"])
        self._factor = None

    def __repr__(self) -> str:
        return (
            f"SlidingMFACInverse(d={self.shape[0]}, num_grads={self.num_grads}, damping={self.damping:g}, "
            f"num_updates={self.num_updates}, dtype={self.dtype}, device={self.device})"
        )
