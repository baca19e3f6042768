"""Inter-layer second-order loss prediction for whole plans, and a plan search that uses it.

HAWQ's Ω keeps only the diagonal Hessian blocks ``H_ii`` and assumes ``∇L ≈ 0``. For a plan
with perturbation ``Δw = concat_i (Q_{b_i}(W_i) − W_i)`` the second-order Taylor model is

    ``ΔL ≈ gᵀΔw + ½ ΔwᵀHΔw = Σ_i g_iᵀΔW_i + ½ Σ_i Σ_j ΔW_iᵀ H_ij ΔW_j``,

whose cross-layer terms ``H_ij`` are what Schaefer et al. (2023, "Augmenting Hessians with
Inter-Layer Dependencies for Mixed-Precision Post-Training Quantization") argue layer-wise
estimates miss. It costs one gradient and ONE Hessian-vector product per plan. Their bisection
search over configurations within a user's accuracy-degradation budget is :func:`search_plan`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from curvature import Hessian

from .allocation import pareto_frontier
from .layers import Evaluation, check_calibration_data, evaluate_model, quantizable_layers
from .plan import BitPlan
from .sensitivity import LayerSensitivity

__all__ = ["LossChangePrediction", "LossChangePredictor", "predict_loss_change", "PlanSearchResult", "search_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossChangePrediction:
    """Second-order prediction of the loss change of quantizing a model with a plan.

    Attributes:
        linear: ``gᵀΔw``.
        quadratic: ``½ ΔwᵀHΔw`` (all blocks, cross-layer terms included).
        total: ``linear + quadratic``.
        interactions: with ``interactions=True``, the ``(L, L)`` float64 matrix
            ``M_ij = ΔW_iᵀ H_ij ΔW_j`` in plan layer order (``quadratic = ½ ΣM``); else ``None``.
        layers: the plan's layers, in the order of ``interactions``.
        num_matvecs: Hessian columns spent.
    """

    linear: float
    quadratic: float
    total: float
    interactions: Tensor | None = field(default=None, repr=False, compare=False)
    layers: tuple[str, ...] = ()
    num_matvecs: int = 1

    @property
    def block_diagonal_quadratic(self) -> float | None:
        """``½ Σ_i ΔW_iᵀ H_ii ΔW_i`` (needs ``interactions``): the layer-wise part of :attr:`quadratic`."""
        return None if self.interactions is None else 0.5 * float(self.interactions.diagonal().sum())

    @property
    def cross_layer_quadratic(self) -> float | None:
        """``Σ_{i<j} ΔW_iᵀ H_ij ΔW_j`` (needs ``interactions``): what the diagonal blocks miss."""
        diag = self.block_diagonal_quadratic
        return None if diag is None else self.quadratic - diag


class LossChangePredictor:
    """Predicts ``gᵀΔw + ½ΔwᵀHΔw`` for many plans of one model, paying the gradient once.

    Holds a :class:`curvature.Hessian` over the quantizable weights (with its cached first-order
    graph for single-batch data: about one to two times the activation memory) and the gradient
    of the mean loss; each :meth:`predict` is one Hessian-vector product. Use it as a context
    manager, or call :meth:`release`, to free the graph.

    Args:
        model, loss_fn, data: as for :class:`curvature.Hessian`; the model is analysed in eval mode.
        layers: the layers plans may quantize (default: every Linear/Conv/Embedding).
        hessian_options: extra options for :class:`curvature.Hessian`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        layers: Sequence[str] | None = None,
        hessian_options: Mapping[str, Any] | None = None,
    ):
        self.layers = quantizable_layers(model, layers)
        check_calibration_data(data)
        self.model = model
        self._modes = {m: m.training for m in model.modules()}
        model.eval()
        weight_names = [f"{name}.weight" if name else "weight" for name in self.layers]
        try:
            self.hessian = Hessian(model, loss_fn, data, params=weight_names, **dict(hessian_options or {}))
            self._layer_of = dict(zip(weight_names, self.layers))
            self.gradient = self._gradient()
        except BaseException:
            self._restore_modes()
            raise

    def _gradient(self) -> Tensor:
        """The data set's gradient: batch gradients weighted by the core's batch weights (the
        loss's normalizer, :func:`curvature.batch_weight`), as the Hessian weights its products."""
        H = self.hessian
        total = torch.zeros(H.shape[0], dtype=torch.float64, device=H.device)
        weight = 0.0
        for batch in H.batch_source:
            if batch.weight == 0:  # a fully padded batch: its mean loss is 0/0 and weighs nothing
                continue
            grads = H.gradient_graph(batch.index, batch.inputs, batch.targets)
            total.add_(H.flatten([g.detach() for g in grads]).to(torch.float64), alpha=batch.weight)
            weight += batch.weight
        if H.loss_info.reduction == "sum":
            return total
        if weight == 0:
            raise ValueError("every target of data is ignored: the mean loss has no gradient")
        return total / weight

    def perturbation(self, plan: BitPlan) -> list[Tensor]:
        """Per-block ``Q_b(W) − W`` (zero for layers the plan does not quantize), in block order."""
        unknown = set(plan.bits) - set(self.layers)
        if unknown:
            raise ValueError(f"plan names layers the predictor does not cover: {sorted(unknown)}")
        weights = plan.quantized_weights(self.model)
        out = []
        for block, p in zip(self.hessian.blocks, self.hessian.params):
            name = self._layer_of[block.name]
            if name in weights:
                out.append(weights[name].to(torch.float64) - p.detach().to(torch.float64))
            else:
                out.append(torch.zeros(p.shape, dtype=torch.float64, device=p.device))
        return out

    def predict(self, plan: BitPlan, *, interactions: bool = False) -> LossChangePrediction:
        """The second-order loss change of ``plan`` (one HVP; ``L`` columns with ``interactions``)."""
        H = self.hessian
        parts = self.perturbation(plan)
        delta = H.flatten(parts)
        linear = float(self.gradient @ delta)
        names = tuple(self._layer_of[b.name] for b in H.blocks)
        if not interactions:
            Hd = (H @ delta.to(H.dtype)).to(torch.float64)
            quad = 0.5 * float(delta @ Hd)
            return LossChangePrediction(linear, quad, linear + quad, None, names, 1)
        D = torch.zeros(H.shape[0], len(H.blocks), dtype=torch.float64, device=delta.device)
        for j, b in enumerate(H.blocks):
            D[b.slice, j] = delta[b.slice]
        HD = (H @ D.to(H.dtype)).to(torch.float64)
        M = torch.stack([D[b.slice, i] @ HD[b.slice] for i, b in enumerate(H.blocks)])  # M[i, j]
        M = 0.5 * (M + M.T)  # exact symmetry is lost only to rounding
        quad = 0.5 * float(M.sum())
        return LossChangePrediction(linear, quad, linear + quad, M, names, len(H.blocks))

    def release(self) -> None:
        """Free the cached graph and restore the model's train/eval modes."""
        self.hessian.release()
        self._restore_modes()

    def _restore_modes(self) -> None:
        for m, mode in self._modes.items():
            m.training = mode

    def __enter__(self) -> LossChangePredictor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def predict_loss_change(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    plan: BitPlan,
    *,
    interactions: bool = False,
    hessian_options: Mapping[str, Any] | None = None,
) -> LossChangePrediction:
    """``gᵀΔw + ½ ΔwᵀHΔw`` for the whole plan's weight perturbation, cross-layer terms included.

    One gradient and one Hessian-vector product over ``data`` (with ``interactions=True``, one
    block product with a column per layer, giving every ``ΔW_iᵀH_ijΔW_j``).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,), generator=g)
        >>> plan = BitPlan({"0": 8, "2": 8}, size_bytes=0, bops=0, omega=0)
        >>> pred = predict_loss_change(m, nn.CrossEntropyLoss(), (x, y), plan)
        >>> abs(pred.total - pred.linear - pred.quadratic) < 1e-15
        True
    """
    with LossChangePredictor(model, loss_fn, data, layers=list(plan.bits), hessian_options=hessian_options) as p:
        return p.predict(plan, interactions=interactions)


@dataclass(frozen=True)
class PlanSearchResult:
    """The outcome of :func:`search_plan`.

    Attributes:
        plan: the smallest plan found that meets the budget.
        predicted_loss_change: its predicted ``ΔL`` (inter-layer, second order).
        measured: its measured evaluation (``None`` when nothing was measured).
        baseline: the unquantized model's evaluation (``None`` when nothing was measured).
        evaluations: one record per bisection step: frontier index, size, predicted and
            measured changes, accepted.
        num_matvecs: Hessian-vector products spent.
    """

    plan: BitPlan
    predicted_loss_change: float
    measured: Evaluation | None
    baseline: Evaluation | None
    evaluations: tuple[dict[str, Any], ...]
    num_matvecs: int


SEARCH_CRITERIA = ("predicted", "measured", "both")


def search_plan(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    sensitivities: Mapping[str, LayerSensitivity],
    *,
    max_loss_increase: float | None = None,
    max_accuracy_drop: float | None = None,
    bit_choices: Sequence[int] = (2, 4, 8),
    criterion: str = "both",
    num_candidates: int = 4,
    eval_data: Any = None,
    symmetric: bool = True,
    per_channel: bool = True,
    hessian_options: Mapping[str, Any] | None = None,
) -> PlanSearchResult:
    """The smallest plan whose loss (or accuracy) degradation stays within the user's budget.

    Bisection over the size budget, following Schaefer et al. (2023): the candidate at a size
    budget ``S`` is chosen among the ``num_candidates`` largest HAWQ-V2 Pareto plans of size at
    most ``S`` (the Ω-optimal plan at ``S`` and its smaller neighbours) as the one with the least
    PREDICTED inter-layer loss change ``gᵀΔw + ½ΔwᵀHΔw``; the budget is accepted if that
    candidate's change is within the limit. Degradation is assumed to grow as the budget shrinks,
    so the smallest acceptable budget is found with ``⌈log2 F⌉ + 1`` checks over the ``F``
    frontier sizes.

    Args:
        model, loss_fn, data: the model and its calibration data (the Hessian and gradient).
        sensitivities: from :func:`quant.sensitivity` (define the Pareto frontier).
        max_loss_increase: budget on the loss increase (absolute, in loss units).
        max_accuracy_drop: budget on the accuracy drop (absolute fraction, e.g. ``0.01``);
            always checked by measurement.
        bit_choices: candidate bit-widths.
        criterion: for ``max_loss_increase``: ``"predicted"`` (only the second-order model; no
            forward passes), ``"measured"`` (evaluate each candidate, a few forward passes) or
            ``"both"`` (both must hold; default).
        num_candidates: Pareto plans compared by the inter-layer prediction at each budget.
        eval_data: data for measured checks (default ``data``).
        symmetric, per_channel: the weight quantizer.
        hessian_options: extra options for :class:`curvature.Hessian`.

    Raises:
        ValueError: if no budget is given, or even the largest plan violates it.
    """
    if max_loss_increase is None and max_accuracy_drop is None:
        raise ValueError("give max_loss_increase or max_accuracy_drop")
    if criterion not in SEARCH_CRITERIA:
        raise ValueError(f"criterion must be one of {SEARCH_CRITERIA}, got {criterion!r}")
    if not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive integer, got {num_candidates!r}")
    eval_data = data if eval_data is None else eval_data
    frontier = pareto_frontier(model, sensitivities, bit_choices=bit_choices, symmetric=symmetric,
                               per_channel=per_channel)
    measure = max_accuracy_drop is not None or criterion != "predicted"
    metric = "accuracy" if max_accuracy_drop is not None else None
    baseline = evaluate_model(model, loss_fn, eval_data, metric=metric) if measure else None
    predictions: dict[int, float] = {}
    records: list[dict[str, Any]] = []
    decided: dict[int, tuple[bool, BitPlan, float, Evaluation | None]] = {}

    with LossChangePredictor(model, loss_fn, data, layers=list(sensitivities), hessian_options=hessian_options) as pred:

        def predicted(i: int) -> float:
            if i not in predictions:
                predictions[i] = pred.predict(frontier[i]).total
            return predictions[i]

        def check(j: int) -> bool:
            if j in decided:
                return decided[j][0]
            pool = range(max(0, j - num_candidates + 1), j + 1)
            best = min(pool, key=predicted)
            plan, change = frontier[best], predicted(best)
            ok = True
            measured = None
            if max_loss_increase is not None and criterion != "measured":
                ok = change <= max_loss_increase
            if measure and (ok or criterion == "measured"):
                measured = plan.evaluate(model, loss_fn, eval_data, metric=metric)
                if max_loss_increase is not None and criterion != "predicted":
                    ok = ok and measured.loss - baseline.loss <= max_loss_increase  # type: ignore[union-attr]
                if max_accuracy_drop is not None:
                    ok = ok and baseline.accuracy - measured.accuracy <= max_accuracy_drop  # type: ignore[operator, union-attr]
            records.append({
                "frontier_index": j, "chosen_index": best, "size_bytes": plan.size_bytes,
                "predicted_loss_change": change,
                "measured_loss_change": None if measured is None else measured.loss - baseline.loss,  # type: ignore[union-attr]
                "measured_accuracy": None if measured is None else measured.accuracy,
                "accepted": ok,
            })
            decided[j] = (ok, plan, change, measured)
            return ok

        hi = len(frontier) - 1
        if not check(hi):
            raise ValueError(
                f"even the largest plan ({frontier[hi].size_bytes:.0f} bytes, all layers at {max(bit_choices)} bits) "
                f"violates the budget: {records[-1]}"
            )
        lo = -1  # sentinel: "no plan" counts as too small
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if check(mid):
                hi = mid
            else:
                lo = mid
        ok, plan, change, measured = decided[hi]
    return PlanSearchResult(plan, change, measured, baseline, tuple(records), len(predictions))
