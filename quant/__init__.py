"""quant: HAWQ-style Hessian-aware mixed-precision bit plans.

Sensitivities (HAWQ-V1 top eigenvalue, HAWQ-V2 average trace from shared probes), uniform fake
quantizers, bit allocation under size/BOPs/latency budgets (exact Pareto DP and the HAWQ-V3 ILP),
versioned JSON plans that apply to and evaluate on a model, and inter-layer second-order loss
prediction with a bisection plan search (Schaefer et al. 2023).

Example:
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
    InfeasibleBudgetError,
    LayerCosts,
    allocate_bits,
    dp_frontier,
    layer_costs,
    make_plan,
    pareto_frontier,
    sample_plans,
    solve_dp,
    solve_ilp,
)
from .compression import COMPRESSION_SCHEMA_VERSION, CompressionPlan, predict_compression
from .interlayer import (
    LossChangePrediction,
    LossChangePredictor,
    PlanSearchResult,
    predict_loss_change,
    search_plan,
)
from .layers import QUANTIZABLE_TYPES, Evaluation, evaluate_model, layer_macs, quantizable_layers
from .masks import MASK_SCHEMA_VERSION, MaskFileError, MaskMismatchError, PruneMask, keep_pruned
from .plan import SCHEMA_VERSION, BitPlan
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

__all__ = [
    "ALLOCATION_METHODS",
    "ActivationQuantizer",
    "BitPlan",
    "Evaluation",
    "InfeasibleBudgetError",
    "LayerCosts",
    "LayerSensitivity",
    "LossChangePrediction",
    "LossChangePredictor",
    "PlanSearchResult",
    "QUANTIZABLE_TYPES",
    "QuantizedTensor",
    "SCHEMA_VERSION",
    "SENSITIVITY_METRICS",
    "allocate_bits",
    "dp_frontier",
    "evaluate_model",
    "fold_batchnorm",
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
    "solve_dp",
    "solve_ilp",
    # pruning (issue 24)
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
