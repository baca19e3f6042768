"""HAWQ layer sensitivities: V2's average Hessian trace and V1's top Hessian eigenvalue per layer.

THE definition of the HAWQ-V2 sensitivity in this toolkit (the report, the ``quantize`` command and
the bit planners all read it from :func:`sensitivity`; nothing else computes one):

* **Parameters**: the layer's ``weight`` only, the tensor that is quantized (biases, norms and
  other parameters stay in floating point and are not part of it). A weight tied between modules
  (an embedding and an LM head) is one layer, listed under the first module holding it.
* **Hessian**: ``H_ii``, the diagonal block of the weight in the Hessian of the DATA SET's loss
  (batches weighted by the loss's normalizer, the core's :func:`curvature.batch_weight`, as if
  all batches were one), with the model in eval mode and every other parameter held fixed.
* **Normalization**: ``score_i = Tr(H_ii) / n_i`` with ``n_i = weight.numel()`` (Dong et al.
  2020, the "average Hessian trace"); ``Ω_i(b) = score_i · ‖Q_b(W_i) − W_i‖²``.
* **Estimator**: Hutchinson with Rademacher probes (default 100), by default one shared set of
  probes over all layers' weights (unbiased; cross-block terms add variance), or one
  block-restricted set per layer (``probes="per_layer"``). The estimate always comes with its
  standard error, :attr:`LayerSensitivity.score_stderr` (the sample standard deviation of the
  per-probe values over ``sqrt(probes)``, divided by ``n_i``): show ``score ± score_stderr``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

import estimators
import spectra
from curvature import Hessian

from .layers import check_calibration_data, eval_mode, layer_macs, quantizable_layers

__all__ = ["LayerSensitivity", "sensitivity", "SENSITIVITY_METRICS", "PROBE_MODES"]

logger = logging.getLogger(__name__)

SENSITIVITY_METRICS = ("trace", "eigenvalue")
PROBE_MODES = ("shared", "per_layer")


@dataclass(frozen=True)
class LayerSensitivity:
    """How sensitive the loss is to perturbing one layer's weight.

    Attributes:
        name: the module name.
        kind: the module type (``"Conv2d"``, ``"Linear"``, ...).
        num_params: ``n_i``, the number of weight entries.
        metric: ``"trace"`` (HAWQ-V2) or ``"eigenvalue"`` (HAWQ-V1).
        trace: Hutchinson estimate of ``Tr(H_ii)`` for the weight block (``None`` for V1).
        trace_stderr: its standard error.
        eigenvalue: top (largest algebraic) eigenvalue of ``H_ii`` (``None`` for V2).
        eigenvalue_residual: the eigenpair's residual norm ``‖H_ii x − λx‖``.
        macs: multiply-accumulates per sample (for BOPs budgets).
        num_matvecs: Hessian products spent for all layers together (with shared probes, one set
            serves every layer).

    ``score`` is the weight of ``‖ΔW_i‖²`` in ``Ω_i``: ``Tr(H_ii)/n_i`` (V2) or ``λ_i`` (V1).

    Examples:
        >>> s = LayerSensitivity("fc", "Linear", 10, "trace", 5.0, 0.5, None, None, 100, 32)
        >>> s.score, s.score_stderr
        (0.5, 0.05)
    """

    name: str
    kind: str
    num_params: int
    metric: str
    trace: float | None
    trace_stderr: float | None
    eigenvalue: float | None
    eigenvalue_residual: float | None
    macs: int
    num_matvecs: int

    @property
    def average_trace(self) -> float | None:
        """HAWQ-V2's ``Tr(H_ii) / n_i``."""
        return None if self.trace is None else self.trace / self.num_params

    @property
    def score(self) -> float:
        """``Ω_i(b) = score · ‖Q_b(W_i) − W_i‖²``."""
        if self.metric == "trace":
            return float(self.trace) / self.num_params  # type: ignore[arg-type]
        return float(self.eigenvalue)  # type: ignore[arg-type]

    @property
    def score_stderr(self) -> float:
        """Standard error of :attr:`score` (the eigenvalue's residual norm bounds its error for V1)."""
        if self.metric == "trace":
            return float(self.trace_stderr) / self.num_params  # type: ignore[arg-type]
        return float(self.eigenvalue_residual)  # type: ignore[arg-type]

    @property
    def average_trace_stderr(self) -> float | None:
        """Standard error of :attr:`average_trace` (``trace_stderr / n_i``)."""
        return None if self.trace_stderr is None else self.trace_stderr / self.num_params

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score, "score_stderr": self.score_stderr}


def sensitivity(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    metric: str = "trace",
    layers: Sequence[str] | None = None,
    num_matvecs: int = 100,
    probes: str = "shared",
    generator: torch.Generator | None = None,
    probe_batch_size: int | None = None,
    eig_tol: float = 1e-3,
    hessian_options: dict[str, Any] | None = None,
    operator: Any = None,
) -> dict[str, LayerSensitivity]:
    """Per-layer HAWQ sensitivities of the loss of ``model`` over the calibration ``data``.

    This is the toolkit's one definition of the HAWQ-V2 sensitivity (see the module docstring:
    weights only, ``Tr(H_ii)/n_i`` of the data set's loss in eval mode, Hutchinson with its
    standard error); read ``s.score ± s.score_stderr`` of each returned layer.

    The model is put in eval mode for the calibration (fixed BatchNorm statistics, no dropout)
    and its modes are restored afterwards. Only the quantized weights are differentiated.

    * ``metric="trace"`` (HAWQ-V2, Dong et al. 2020): ``Tr(H_ii)`` for every layer. With
      ``probes="shared"`` (default) all layers come from ONE set of ``num_matvecs`` Rademacher
      probes over all layers (:func:`estimators.block_traces`): each product ``Hz`` gives a sample
      ``z_iᵀ(Hz)_i`` for every block at once, so the cost is that of a single trace estimate. It
      is unbiased (cross-block terms vanish in expectation) but they add ``Σ_{j≠i} ‖H_ij‖_F²`` to
      each sample's variance: on models with strong cross-layer curvature (e.g. at
      initialisation) a small layer's error bar can exceed its trace, so check ``trace_stderr``.
      ``probes="per_layer"`` runs one block-restricted estimate per layer on a Hessian of that
      layer's weight alone (``num_matvecs`` products each, whose second backward stops at that
      layer, as in PyHessian with one layer selected): no cross-block variance, at about
      1–2.5 times the cost of the shared run for a feed-forward network.
    * ``metric="eigenvalue"`` (HAWQ-V1, Dong et al. 2019): the top eigenvalue of each block
      ``H_ii`` by Lanczos (:func:`spectra.eigsh` on :func:`spectra.restrict`), ``num_matvecs``
      products at most per layer.

    Args:
        model, loss_fn, data: as for :class:`curvature.Hessian` (data: one batch or a list).
        metric: ``"trace"`` or ``"eigenvalue"``.
        layers: module names to analyse; default every Linear/Conv/Embedding layer.
        num_matvecs: Hutchinson probes (trace; per layer with ``probes="per_layer"``) or the
            Lanczos product cap per layer (eigenvalue).
        probes: ``"shared"`` or ``"per_layer"`` (trace only; see above).
        generator: source of the probes / start vectors (``None``: fresh OS-seeded).
        probe_batch_size: columns per batched product (memory bound).
        eig_tol: relative residual tolerance of the eigenvalues.
        hessian_options: extra keyword options for :class:`curvature.Hessian`.
        operator: use this curvature operator instead of building ``Hessian(model, loss_fn,
            data, params=<the layers' weights>)``: for example a
            ``curvature.DataParallelOperator`` over each rank's shard (the same plan on every
            rank as one process over all data), or a ``GGN``. Its blocks must include every
            layer's ``<name>.weight``; ``data`` is then used only to count MACs. Not with
            ``probes="per_layer"``.

    Returns:
        ``{layer name: LayerSensitivity}`` in model order.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
        >>> s = sensitivity(m, nn.CrossEntropyLoss(), (x, y), num_matvecs=20, generator=g)
        >>> list(s), s["0"].num_params
        (['0', '2'], 12)
    """
    if metric not in SENSITIVITY_METRICS:
        raise ValueError(f"metric must be one of {SENSITIVITY_METRICS}, got {metric!r}")
    if probes not in PROBE_MODES:
        raise ValueError(f"probes must be one of {PROBE_MODES}, got {probes!r}")
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < 1:
        raise ValueError(f"num_matvecs must be a positive integer, got {num_matvecs!r}")
    chosen = quantizable_layers(model, layers)
    check_calibration_data(data)
    if generator is None:
        generator = torch.Generator(device=next(model.parameters()).device)
        generator.seed()
    weight_names = [f"{name}.weight" if name else "weight" for name in chosen]
    macs = layer_macs(model, chosen, data)
    options = dict(hessian_options or {})
    if operator is not None:
        if probes == "per_layer":
            raise ValueError("operator= works with probes='shared' (per_layer builds one Hessian per layer)")
        names = {b.name for b in getattr(operator, "blocks", ())}
        missing = [w for w in weight_names if w not in names]
        if missing:
            raise ValueError(f"operator has no block for {missing}; build it with params={weight_names}")
    if metric == "trace" and probes == "per_layer":
        traces: dict[str, Any] = {}
        with eval_mode(model):
            for name, w in zip(chosen, weight_names):
                with Hessian(model, loss_fn, data, params=[w], **options) as H_i:
                    traces[name] = estimators.trace(H_i, num_matvecs=num_matvecs, generator=generator,
                                                    probe_batch_size=probe_batch_size)
        return _results(chosen, traces, {}, macs, metric, num_matvecs * len(chosen))
    with eval_mode(model), _operator(operator, model, loss_fn, data, weight_names, options) as H:
        if metric == "trace":
            est = estimators.block_traces(
                H, num_matvecs=num_matvecs, generator=generator, probe_batch_size=probe_batch_size
            )
            traces = {name: est[w] for name, w in zip(chosen, weight_names)}
            eigs: dict[str, Any] = {}
            used = num_matvecs
        else:
            traces, eigs, used = {}, {}, 0
            for name, w in zip(chosen, weight_names):
                res = spectra.eigsh(
                    spectra.restrict(H, w), k=1, which="LA", tol=eig_tol, max_iter=num_matvecs, generator=generator
                )
                if not res.all_converged:
                    logger.warning("layer %s: top eigenvalue not converged within %d products", name, num_matvecs)
                eigs[name] = res
                used += res.num_matvecs
    return _results(chosen, traces, eigs, macs, metric, used)


@contextlib.contextmanager
def _operator(operator: Any, model: nn.Module, loss_fn: Any, data: Any, weight_names: list[str],
              options: dict[str, Any]) -> Iterator[Any]:
    """The caller's operator as it is, or a Hessian of the weights released afterwards."""
    if operator is not None:
        yield operator
        return
    with Hessian(model, loss_fn, data, params=weight_names, **options) as H:
        yield H


def _results(
    chosen: dict[str, nn.Module], traces: dict[str, Any], eigs: dict[str, Any], macs: dict[str, int], metric: str,
    used: int,
) -> dict[str, LayerSensitivity]:
    out: dict[str, LayerSensitivity] = {}
    for name, module in chosen.items():
        t, e = traces.get(name), eigs.get(name)
        trace_value = None if t is None else float(t.value)
        if trace_value is not None and not math.isfinite(trace_value):
            raise FloatingPointError(f"layer {name!r}: the trace estimate is not finite")
        out[name] = LayerSensitivity(
            name=name,
            kind=type(module).__name__,
            num_params=module.weight.numel(),
            metric=metric,
            trace=trace_value,
            trace_stderr=None if t is None else float(t.stderr),
            eigenvalue=None if e is None else float(e.eigenvalues[0]),
            eigenvalue_residual=None if e is None else float(e.residuals[0]),
            macs=macs[name],
            num_matvecs=used,
        )
    return out
