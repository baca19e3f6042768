"""Losses of the model outputs: recognising them, their normalizers, and their curvature in the outputs.

Notation: a batch loss is ``L = (1/Z) * sum_u nll_u(f_u, y_u)`` over *units* ``u`` (a sample's
row for MSE/BCE, a sample or token position for cross-entropy), with ``Z`` the loss's own
normalizer: ``1`` for a sum; for a mean the number of elements (MSE/BCE), of non-ignored
targets (cross-entropy with ``ignore_index``), or the summed class weights of the targets
(``CrossEntropyLoss(weight=...)``). The curvature of a data set split into batches is
``sum_b Z_b C_b / sum_b Z_b`` (mean) or ``sum_b C_b`` (sum), which is exactly the curvature of
the one big batch, whatever the split.

The normalizer of a loss the toolkit does not recognise (a lambda, a ``functools.partial``, a
subclass with its own ``forward``) is read off the loss itself: it is evaluated once per batch
while recording which reductions it performs (``F.mse_loss(..., reduction="mean")``,
``Tensor.mean()``, ``F.kl_div(..., reduction="batchmean")``, ...), and on the first batch
the reading is verified by evaluating the loss on the batch concatenated with itself (a sum of
unit losses doubles). A loss that fails that check must declare its normalizer
(``reduction="sum"``, or ``reduction=callable(inputs, targets) -> Z``).

Modules (one job each): ``_recognise`` (which closed form a loss is: :func:`describe_loss`,
:class:`LossInfo`), ``_normalizer`` (:class:`Normalizer`, :func:`evaluate_loss`,
:func:`verify_normalizer`, :class:`LossNormalizer`), ``_output_checks`` (:func:`check_outputs`),
``_output_curvature`` (:class:`OutputCurvature`: output-space products and Fisher sampling),
``_cross_entropy`` (the chunked closed forms of cross-entropy), ``_lean_loss``
(:func:`lean_loss`, the closed-form loss for the Hessian's double backward) and ``_token_loss``
(:class:`TokenCrossEntropyLoss`). See docs/lm_products.md.
"""

from __future__ import annotations

from ._lean_loss import lean_loss
from ._normalizer import LossNormalizer, Normalizer, evaluate_loss, verify_normalizer
from ._output_checks import check_outputs
from ._output_curvature import OutputCurvature
from ._recognise import LossInfo, ReductionSpec, describe_loss
from ._token_loss import TokenCrossEntropyLoss

__all__ = [
    "LossInfo",
    "Normalizer",
    "describe_loss",
    "evaluate_loss",
    "verify_normalizer",
    "LossNormalizer",
    "OutputCurvature",
    "TokenCrossEntropyLoss",
    "check_outputs",
    "ReductionSpec",
    "lean_loss",
]
