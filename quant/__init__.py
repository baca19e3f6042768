"""quant: HAWQ-style Hessian-aware mixed-precision bit plans.

Sensitivities (HAWQ-V1 top eigenvalue, HAWQ-V2 average trace), uniform fake quantizers, bit
allocation under size/BOPs/latency budgets (exact Pareto DP and the HAWQ-V3 ILP), versioned JSON
plans that apply to and evaluate on a model, and inter-layer second-order loss prediction with a
bisection plan search (Schaefer et al. 2023). User guide: ``docs/quantization.md``.

Sensitivities
=============
- :func:`sensitivity` -- per-layer HAWQ sensitivities; THE definition of the HAWQ-V2 one
  (weights only, ``Tr(H_ii)/n_i`` of the data set's loss, with its standard error)
- :class:`LayerSensitivity` -- one layer's sensitivity (``score ± score_stderr``)
- :data:`SENSITIVITY_METRICS` -- ``"trace"`` (V2), ``"eigenvalue"`` (V1)

Layers, costs and evaluation
============================
- :func:`quantizable_layers`, :func:`is_quantizable`, :data:`QUANTIZABLE_TYPES` -- which
  weights are quantized (Linear, Conv, Embedding, Hugging Face Conv1D)
- :func:`channel_axis` -- a layer's output-channel axis (per-channel scales)
- :func:`layer_macs` -- multiply-accumulates per sample (every call, tied heads included)
- :func:`evaluate_model`, :class:`Evaluation`, :class:`MetricNotApplicableError` -- loss
  (batches weighted by the loss's normalizer) and accuracy (a fraction of predictions)

Quantizers
==========
- :func:`quantize`, :func:`quantize_weight`, :class:`QuantizedTensor` -- uniform quantization
- :func:`perturbation_norm_sq` -- ``‖Q_b(W) − W‖²``
- :class:`ActivationQuantizer`, :func:`fold_batchnorm`

Bit allocation
==============
- :func:`allocate_bits` -- least-Ω plan within budgets (``method="ilp"`` or exact ``"pareto"``)
- :func:`pareto_frontier` -- HAWQ-V2's exact (size or BOPs, Ω) frontier
- :func:`make_plan`, :func:`layer_costs`, :class:`LayerCosts`, :func:`sample_plans`
- :data:`ALLOCATION_METHODS`, :class:`InfeasibleBudgetError`, :class:`FrontierTooLargeError`
- The pure solvers (knapsack frontier, ILP) live in :mod:`quant.solvers`.

Plans
=====
- :class:`BitPlan` -- bit-width per layer with size, BOPs, Ω; JSON save/load, apply, evaluate
- :data:`SCHEMA_VERSION`, :class:`PlanFileError` -- the plan file's schema and its errors

Inter-layer prediction and plan search
======================================
- :func:`predict_loss_change`, :class:`LossChangePredictor`, :class:`LossChangePrediction` --
  ``gᵀΔw + ½ΔwᵀHΔw`` of a whole plan, cross-layer terms included
- :func:`search_plan`, :class:`PlanSearchResult` -- smallest plan within a loss/accuracy budget

Pruning (Optimal Brain Surgeon with M-FAC inverses)
===================================================
- :func:`prune`, :class:`PruneResult`, :class:`PruneStep` -- one-shot or recomputed M-FAC/OBS
  or magnitude pruning, global or per layer, unstructured or N:M (2:4)
- :class:`GradualPruner`, :func:`sparsity_schedule` -- pruning between fine-tuning steps
- :func:`prunable_weights`, :data:`PRUNE_METHODS`, :data:`PRUNE_SCOPES`
- :class:`PruneMask`, :func:`keep_pruned`, :data:`MASK_SCHEMA_VERSION`, :class:`MaskFileError`,
  :class:`MaskMismatchError` -- masks that survive optimizer steps; save, load, apply

Joint compression plans
=======================
- :class:`CompressionPlan`, :func:`predict_compression`, :data:`COMPRESSION_SCHEMA_VERSION` --
  sparsity and bit widths in one plan, with the second-order prediction of their loss change

Plotting
========
- :func:`plot_sensitivities`, :func:`plot_pareto`

Examples:
    >>> import torch, quant
    >>> from torch import nn
    >>> g = torch.Generator().manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    >>> sens = quant.sensitivity(model, nn.CrossEntropyLoss(), data, num_matvecs=16, generator=g)
    >>> budget = quant.make_plan(model, sens, 4).size_bytes
    >>> plan = quant.allocate_bits(model, sens, bit_choices=(2, 4, 8), max_size_bytes=budget)
    >>> plan.size_bytes <= budget
    True
"""

from .allocation import (
    ALLOCATION_METHODS,
    LayerCosts,
    allocate_bits,
    layer_costs,
    make_plan,
    pareto_frontier,
    sample_plans,
)
from .compression import COMPRESSION_SCHEMA_VERSION, CompressionPlan, predict_compression
from .interlayer import (
    LossChangePrediction,
    LossChangePredictor,
    PlanSearchResult,
    predict_loss_change,
    search_plan,
)
from .layers import (
    QUANTIZABLE_TYPES,
    Evaluation,
    MetricNotApplicableError,
    channel_axis,
    evaluate_model,
    is_quantizable,
    layer_macs,
    quantizable_layers,
)
from .masks import MASK_SCHEMA_VERSION, MaskFileError, MaskMismatchError, PruneMask, keep_pruned
from .plan import SCHEMA_VERSION, BitPlan, PlanFileError
from .plotting import plot_pareto, plot_sensitivities
from .pruning import (
    PRUNE_METHODS,
    PRUNE_SCOPES,
    GradualPruner,
    PruneResult,
    PruneStep,
    prunable_weights,
    prune,
    sparsity_schedule,
)
from .quantizers import (
    ActivationQuantizer,
    QuantizedTensor,
    fold_batchnorm,
    perturbation_norm_sq,
    quantize,
    quantize_weight,
)
from .sensitivity import SENSITIVITY_METRICS, LayerSensitivity, sensitivity
from .solvers import FrontierTooLargeError, InfeasibleBudgetError

__all__ = [
    "ALLOCATION_METHODS",
    "ActivationQuantizer",
    "BitPlan",
    "Evaluation",
    "FrontierTooLargeError",
    "InfeasibleBudgetError",
    "LayerCosts",
    "LayerSensitivity",
    "LossChangePrediction",
    "LossChangePredictor",
    "MetricNotApplicableError",
    "PlanFileError",
    "PlanSearchResult",
    "QUANTIZABLE_TYPES",
    "QuantizedTensor",
    "SCHEMA_VERSION",
    "SENSITIVITY_METRICS",
    "allocate_bits",
    "channel_axis",
    "evaluate_model",
    "fold_batchnorm",
    "is_quantizable",
    "layer_costs",
    "layer_macs",
    "make_plan",
    "pareto_frontier",
    "perturbation_norm_sq",
    "plot_pareto",
    "plot_sensitivities",
    "predict_loss_change",
    "quantizable_layers",
    "quantize",
    "quantize_weight",
    "sample_plans",
    "search_plan",
    "sensitivity",
    "MASK_SCHEMA_VERSION",
    "MaskFileError",
    "MaskMismatchError",
    "PruneMask",
    "keep_pruned",
    "PRUNE_METHODS",
    "PRUNE_SCOPES",
    "GradualPruner",
    "PruneResult",
    "PruneStep",
    "prunable_weights",
    "prune",
    "sparsity_schedule",
    "COMPRESSION_SCHEMA_VERSION",
    "CompressionPlan",
    "predict_compression",
]
