"""Optimizers built on the curvature operators (the application layer).

* :class:`MFAC`: steps preconditioned by a sliding-window M-FAC inverse of the empirical Fisher.
* :class:`Sophia`: clipped diagonal-Newton steps (Sophia-H: Hutchinson, Sophia-G:
  Gauss-Newton-Bartlett).
* :class:`AdaHessian`: Adam with an RMS Hutchinson Hessian diagonal.
* :class:`GradientRegularizedNewton`: ``−(B + λ I)⁻¹ g`` with ``λ`` tied to ``‖g‖`` and an
  adaptive constant, solved by the toolkit's conjugate gradients.

Results and errors: :class:`SophiaStepInfo`, :class:`NewtonStepInfo`, :class:`NonFiniteError`
(a non-finite loss, gradient or curvature estimate; nothing was updated).

Sophia-H and AdaHessian take the standard closure (no ``create_graph=True``): on refresh steps
they call it again at ``θ + ε u`` (``fd_scheme="forward"``, one extra call) or ``θ ± ε u``
(``"central"``, two) and difference the gradients, with the RNG replayed, the parameters
restored bit-exactly, the step's gradients kept as copies (closures may zero ``.grad`` in
place) and the buffers of the modules the closure calls (BatchNorm statistics) restored. One
``ε`` serves every parameter, from the least precise dtype among them. ``step(closure,
curvature=op)`` with a curvature operator (``curvature.Hessian``, ``GGN``, ...) gives exact
products instead; :class:`GradientRegularizedNewton` takes its operator the same way. The
accuracy of each scheme, measured, is in ``docs/optimizers.md``.
"""

from ._common import NonFiniteError
from .adahessian import AdaHessian
from .mfac import MFAC
from .newton import GradientRegularizedNewton, NewtonStepInfo
from .sophia import Sophia, SophiaStepInfo

__all__ = [
    "MFAC",
    "AdaHessian",
    "GradientRegularizedNewton",
    "NewtonStepInfo",
    "NonFiniteError",
    "Sophia",
    "SophiaStepInfo",
]
