"""Optimal-Brain-Surgeon pruning with M-FAC inverses, magnitude pruning, N:M patterns, gradual pruning.

M-FAC OBS (Frantar, Kurtic, Alistarh, *M-FAC*, NeurIPS 2021, the static algorithm; Hassibi and
Stork 1993 for OBS). With ``F = λI + (1/m) Σ g_i g_iᵀ`` over the not-yet-pruned weights ``w``
(``m`` mini-batch gradients, :class:`curvature.MFACInverse`, full or block-diagonal):

* saliency of weight ``q``: ``ρ_q = w_q² / (2 [F⁻¹]_qq)`` (all ``d`` of them in ``O(dm)``);
* the lowest-saliency weights ``Q`` are removed and the others corrected by the summed single-weight
  OBS updates ``δw = −F⁻¹ Σ_{q∈Q} (w_q / [F⁻¹]_qq) e_q`` (one ``O(dm)`` product), then ``w_Q = 0``
  exactly, as the reference pruner applies it;
* ``recomputations = r`` steps reach the target sparsity geometrically in density,
  ``s_j = 1 − (1 − s_0) ((1 − s)/(1 − s_0))^{j/r}``, collecting ``m`` new gradients at the new point
  each time.

Pruning works IN PLACE on the model (like ``torch.nn.utils.prune`` and the reference pruner: the
later recomputation steps need the model at the pruned point); ``copy.deepcopy`` first to keep
the dense model. The result records the mask (:class:`quant.PruneMask`), the corrected weights
and the per-layer sparsities.

Unlike the reference loop, which stops at ``(i + 1) % ngrads == 0`` and so collects ``m − 1``
gradients and leaves a zero row in the ``m`` it divides by, exactly ``m`` gradients are used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import Tensor, nn

from curvature import MFACInverse, collect_gradients

from .layers import eval_mode, quantizable_layers
from .masks import PruneMask, keep_pruned

__all__ = [
    "PRUNE_METHODS",
    "PRUNE_SCOPES",
    "GradualPruner",
    "PruneResult",
    "PruneStep",
    "prunable_weights",
    "prune",
    "sparsity_schedule",
]

logger = logging.getLogger(__name__)

PRUNE_METHODS = ("mfac", "magnitude")
PRUNE_SCOPES = ("global", "layer")

GradientSource = Tensor | Callable[[int, nn.Module], Tensor]


@dataclass(frozen=True)
class PruneStep:
    """One pruning step: the sparsity reached, weights removed, and their summed OBS saliency.

    ``saliency_sum`` is ``Σ_{q∈Q} ρ_q``, OBS's predicted loss increase of removing ``Q`` (the
    single-weight predictions added up; ``Σ |w_q|`` scores are not losses, so it is ``nan`` for
    magnitude pruning).
    """

    sparsity: float
    num_pruned: int
    saliency_sum: float


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` did (the model itself has been pruned in place).

    Attributes:
        mask: the keep-mask per layer (apply it again after each optimizer step to stay pruned,
            or use :func:`quant.keep_pruned`).
        weights: ``{layer: pruned and corrected weight}`` (detached copies).
        sparsity: fraction of the selected weights that are zero by the mask.
        layer_sparsity: ``{layer: fraction pruned}``.
        predicted_loss_increase: ``Σ`` of the steps' ``saliency_sum`` (OBS; ``nan`` for magnitude).
        steps: one :class:`PruneStep` per recomputation.
        method, scope, pattern: the options used (``pattern`` is ``(N, M)`` or ``None``).
        num_gradients: gradients per step, as used (``0`` for magnitude).
    """

    mask: PruneMask
    weights: Mapping[str, Tensor]
    sparsity: float
    layer_sparsity: Mapping[str, float]
    predicted_loss_increase: float
    steps: tuple[PruneStep, ...]
    method: str
    scope: str
    pattern: tuple[int, int] | None
    num_gradients: int

    def __str__(self) -> str:
        change = self.predicted_loss_increase
        return f"PruneResult({self.method}, {self.sparsity:.1%} pruned, predicted ΔL={change:.4g})"


def prunable_weights(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The weights :func:`prune` works on, by layer name, in the model's parameter order.

    Default: the weight of every Linear, Conv1d/2d/3d and Embedding layer that requires grad
    (biases and norms excluded; a tied weight once; frozen layers left out). Named ``layers``
    are taken as given.

    Examples:
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> m[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter...
        >>> list(prunable_weights(m))
        ['2']
    """
    found = quantizable_layers(model, layers)
    weights = {name: cast(Tensor, mod.weight) for name, mod in found.items()}
    if layers is None:
        frozen = [n for n, w in weights.items() if not w.requires_grad]
        if frozen:
            logger.info("frozen layers %s are not pruned", frozen)
        weights = {n: w for n, w in weights.items() if w.requires_grad}
        if not weights:
            raise ValueError("every quantizable layer is frozen; name the layers to prune with layers=[...]")
    order = {id(p): i for i, p in enumerate(model.parameters())}
    return dict(sorted(weights.items(), key=lambda kv: order.get(id(kv[1]), len(order))))


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_pattern(pattern: Any) -> tuple[int, int] | None:
    if pattern is None:
        return None
    if isinstance(pattern, str):
        try:
            n, m = (int(p) for p in pattern.split(":"))
        except ValueError:
            raise ValueError(f"pattern must be 'N:M' or (N, M), got {pattern!r}") from None
    else:
        try:
            n, m = pattern
        except (TypeError, ValueError):
            raise ValueError(f"pattern must be 'N:M' or (N, M), got {pattern!r}") from None
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"pattern N:M needs integers 0 < N < M, got {pattern!r}")
    return n, m


def sparsity_schedule(final: float, steps: int, *, initial: float = 0.0, kind: str = "geometric") -> list[float]:
    """Sparsities of a gradual-pruning schedule, ending at ``final``.

    ``"geometric"``: density shrinks by the same factor each step (the M-FAC recomputation
    schedule); ``"cubic"``: Zhu and Gupta (2017), ``s_j = s_f + (s_0 − s_f)(1 − j/n)³``.

    Examples:
        >>> [round(s, 3) for s in sparsity_schedule(0.9, 3, kind="cubic")]
        [0.633, 0.867, 0.9]
    """
    final, initial = _check_fraction(final, "final"), _check_fraction(initial, "initial")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if kind == "geometric":
        ratio = (1 - final) / (1 - initial)
        out = [1 - (1 - initial) * ratio ** (j / steps) for j in range(1, steps + 1)]
    elif kind == "cubic":
        out = [final + (initial - final) * (1 - j / steps) ** 3 for j in range(1, steps + 1)]
    else:
        raise ValueError(f"kind must be 'geometric' or 'cubic', got {kind!r}")
    out[-1] = final
    return out


# ------------------------------------------------------------------------------------ selection
def _lowest(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` lowest scores; ties at the threshold go to the lower indices.

    ``O(d)`` (a selection, not a sort): the ``k``-th smallest score is the threshold, everything
    below it is taken and the ties at it in index order.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    threshold = torch.kthvalue(scores, k).values
    below = torch.nonzero(scores < threshold).flatten()
    ties = torch.nonzero(scores == threshold).flatten()[: k - below.numel()]
    return torch.cat([below, ties])


def _select_nm(scores: Tensor, positions: Tensor, keep: Tensor, layout: list[tuple[int, int, int]],
               n: int, m: int) -> Tensor:
    """Active-vector indices to prune so each group of ``m`` weights of a row keeps at most ``n``.

    ``positions`` maps active index -> full flat index; ``layout`` lists each layer's
    ``(start, rows, row_length)`` in the full flat vector.
    """
    full = torch.full((keep.numel(),), math.inf, dtype=torch.float64, device=scores.device)
    full[positions] = scores.to(torch.float64)
    active_of = torch.full((keep.numel(),), -1, dtype=torch.long, device=scores.device)
    active_of[positions] = torch.arange(positions.numel(), device=scores.device)
    chosen = []
    for start, rows, length in layout:
        size = rows * length
        groups = full[start : start + size].view(rows, length // m, m)
        alive = keep[start : start + size].view(rows, length // m, m)
        excess = (alive.sum(-1) - n).clamp(min=0)  # how many more each group must lose
        # Rank within each group by (score, position): the stable sort keeps lower indices first.
        rank = torch.sort(groups, dim=-1, stable=True).indices
        take = torch.arange(m, device=scores.device).expand_as(rank) < excess.unsqueeze(-1)
        flat_idx = (rank + torch.arange(0, size, m, device=scores.device).view(rows, length // m, 1))[take]
        chosen.append(active_of[start + flat_idx])
    sel = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
    return torch.sort(sel).values


# --------------------------------------------------------------------------------------- pruning
def prune(
    model: nn.Module,
    loss_fn: Callable[..., Tensor] | None = None,
    data: Any = None,
    *,
    sparsity: float | None = None,
    method: str = "mfac",
    scope: str = "global",
    pattern: tuple[int, int] | str | None = None,
    layers: Sequence[str] | None = None,
    num_gradients: int = 64,
    damping: float = 1e-5,
    block_size: int | None = None,
    recomputations: int = 1,
    batch_size: int | None = None,
    gradients: GradientSource | None = None,
    mask: PruneMask | None = None,
    dtype: torch.dtype | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``sparsity`` with M-FAC OBS (or magnitude) and return the record.

    Args:
        model: the network; its selected weights are pruned and corrected in place.
        loss_fn, data: for the gradients (``loss_fn(model(inputs), targets)``; ``data`` one
            batch or a re-iterable of batches, read from the start at every recomputation;
            gradients are taken in eval mode, as the reference pruner does). Not needed for
            ``method="magnitude"`` or with ``gradients=``.
        sparsity: target fraction of zeros among the selected weights, ``[0, 1)`` (already
            pruned weights of ``mask`` count). With ``pattern``, default ``1 − N/M``.
        method: ``"mfac"`` (OBS with the M-FAC inverse) or ``"magnitude"`` (smallest ``|w|``,
            no correction).
        scope: ``"global"`` (one ranking over all layers) or ``"layer"`` (each layer to ``sparsity``).
        pattern: ``(N, M)`` or ``"N:M"``: semi-structured sparsity, at most ``N`` nonzeros in every
            ``M`` consecutive weights of a row (``weight.reshape(out, -1)``, so for a convolution the
            groups run over the flattened ``in x kh x kw``; ``2:4`` is what sparse tensor cores run).
            By default only the layers whose rows are a multiple of ``M`` long are pruned. The same
            saliencies choose, per group, which weights go; the OBS correction is then the same
            combined update over the removed set. Needs ``recomputations=1``.
        layers: layer names (default :func:`prunable_weights`).
        num_gradients: ``m``, mini-batch gradients per step (exactly ``m`` are collected).
        damping: ``λ`` of ``F = λI + (1/m) Σ g gᵀ``.
        block_size: ``None`` (the full inverse) or ``B`` (block-diagonal M-FAC over consecutive
            chunks of ``B`` not-yet-pruned weights, crossing layer boundaries, as the reference).
        recomputations: ``r`` steps, gradients collected anew before each.
        batch_size: cut ``data``'s batches into mini-batches of this size for the gradients.
        gradients: precomputed gradients over the selected weights (``(m, d)``, flattened in
            layer order; used for the first step, later steps collect from ``data``), or a
            callable ``(step, model) -> (m, d)`` called at every step.
        mask: an existing mask to start from (its pruned weights stay pruned and are left out of
            ``F``); the model's weights are masked with it first.
        dtype: dtype of collected gradients and of the inverse (default: the weights' dtype).

    Raises:
        ValueError: bad options, too little data, or a target below the current sparsity.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(16)]
        >>> result = prune(model, nn.CrossEntropyLoss(), data, sparsity=0.5, num_gradients=16, damping=1e-3)
        >>> result.sparsity, int((model[0].weight == 0).sum() + (model[2].weight == 0).sum())
        (0.5, 28)
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {PRUNE_METHODS}, got {method!r}")
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {PRUNE_SCOPES}, got {scope!r}")
    nm = _check_pattern(pattern)
    if sparsity is None:
        if nm is None:
            raise ValueError("give sparsity= (or pattern=)")
        sparsity = 1 - nm[0] / nm[1]
    target = _check_fraction(sparsity, "sparsity")
    if isinstance(recomputations, bool) or not isinstance(recomputations, int) or recomputations < 1:
        raise ValueError(f"recomputations must be a positive integer, got {recomputations!r}")
    if nm is not None and recomputations != 1:
        raise ValueError("pattern= prunes in one step: use recomputations=1")
    if method == "mfac" and gradients is None and (loss_fn is None or data is None):
        raise ValueError("method='mfac' needs loss_fn and data (or gradients=)")

    weights = prunable_weights(model, layers)
    if nm is not None and layers is None:  # by default N:M applies to the layers whose rows it fits
        unfit = [n for n, p in weights.items() if (p.numel() // max(p.shape[0], 1)) % nm[1]]
        if unfit:
            logger.info("pattern %d:%d skips layers %s (rows not a multiple of %d)", *nm, unfit, nm[1])
        weights = {n: p for n, p in weights.items() if n not in unfit}
        if not weights:
            raise ValueError(f"pattern {nm[0]}:{nm[1]}: no layer has rows of a multiple of {nm[1]} weights")
    names = list(weights)
    params = list(weights.values())
    sizes = [p.numel() for p in params]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    d = sum(sizes)
    device = params[0].device
    layout = []
    if nm is not None:
        for name, p, start in zip(names, params, starts):
            rows = p.shape[0]
            length = p.numel() // max(rows, 1)
            if length % nm[1]:
                raise ValueError(
                    f"pattern {nm[0]}:{nm[1]}: layer {name!r} has rows of {length} weights, not a multiple of {nm[1]}"
                )
            layout.append((start, rows, length))

    if mask is not None:
        if set(mask.masks) != set(names):
            raise ValueError(f"mask covers layers {sorted(mask.masks)}, pruning covers {sorted(names)}")
        mask.apply(model)
        keep = torch.cat([mask.masks[n].reshape(-1) for n in names]).to(device)
    else:
        keep = torch.ones(d, dtype=torch.bool, device=device)

    def layer_slices() -> list[slice]:
        return [slice(s, s + n) for s, n in zip(starts, sizes)]

    # Per-step pruned counts: globally, or per layer; the same geometric schedule in density.
    if scope == "global":
        groups = [slice(0, d)]
    else:
        groups = layer_slices()
    initial = [int((~keep[g]).sum()) for g in groups]
    finals = [round(target * (g.stop - g.start)) for g in groups]
    if nm is not None:
        finals = [int((~keep[g]).sum()) for g in groups]  # computed per group pattern below
    for g, s0, f in zip(groups, initial, finals):
        if f < s0:
            raise ValueError(
                f"sparsity={target} is below the current sparsity {s0 / (g.stop - g.start):.4f}; "
                "pruning does not un-prune"
            )

    def count_at(step: int, index: int) -> int:
        size = groups[index].stop - groups[index].start
        s0 = initial[index] / size
        if step == recomputations:
            return finals[index]
        s = 1 - (1 - s0) * ((1 - target) / (1 - s0)) ** (step / recomputations)
        return max(initial[index], round(s * size))

    steps = []
    used_gradients = 0
    for step in range(1, recomputations + 1):
        w = torch.cat([p.detach().reshape(-1) for p in params])
        positions = torch.nonzero(keep).flatten()
        wa = w[positions]
        Finv = None
        if method == "mfac":
            G, owned = _gradients(step, model, loss_fn, data, gradients, params, num_gradients, batch_size, dtype, d)
            if positions.numel() < d:  # F over the unpruned weights only; the copy is ours
                Ga, owned = G[:, positions.to(G.device)], True
            else:
                Ga = G
            del G
            if Ga.device != device:
                Ga, owned = Ga.to(device), True
            if not owned:  # MFACInverse(inplace=True) overwrites its input: never the caller's tensor
                Ga = Ga.clone(memory_format=torch.contiguous_format)
            elif Ga.stride(1) != 1:
                Ga = Ga.contiguous()
            Finv = MFACInverse(Ga, damping=damping, block_size=block_size, inplace=True)
            used_gradients = Finv.num_grads
            diag = Finv.diagonal().to(torch.float64)
            if not bool((diag > 0).all()):
                # diag(F⁻¹) = (1 − ‖W_q‖²)/λ loses every digit when λ is tiny against the gradients
                raise ValueError(
                    f"diag(F⁻¹) is not positive at {int((diag <= 0).sum())} weights: rounding in "
                    f"{Finv.dtype} at damping={damping:g}; raise the damping or pass dtype=torch.float64"
                )
            scores = wa.to(torch.float64).square() / (2 * diag)
        else:
            scores = wa.to(torch.float64).abs()
        if nm is not None:
            sel = _select_nm(scores, positions, keep, layout, *nm)
        else:
            chosen = []
            for i, g in enumerate(groups):
                inside = (positions >= g.start) & (positions < g.stop)
                idx = torch.nonzero(inside).flatten()
                k = count_at(step, i) - int((~keep[g]).sum())
                chosen.append(idx[_lowest(scores[idx], k)])
            sel = torch.cat(chosen)
        saliency = float(scores[sel].sum()) if method == "mfac" else math.nan
        new = wa.clone()
        if Finv is not None and sel.numel():
            diag_sel = diag[sel].to(Finv.dtype)
            u = torch.zeros(wa.numel(), dtype=Finv.dtype, device=device)
            u[sel] = wa[sel].to(Finv.dtype) / diag_sel
            new = (wa.to(Finv.dtype) - Finv @ u).to(w.dtype)
        new[sel] = 0
        keep[positions[sel]] = False
        w[positions] = new
        with torch.no_grad():
            for p, sl in zip(params, layer_slices()):
                p.copy_(w[sl].view_as(p))
        reached = float((~keep).sum()) / d
        steps.append(PruneStep(reached, int(sel.numel()), saliency))
        logger.info("prune step %d/%d: %d weights removed, sparsity %.4f", step, recomputations, sel.numel(), reached)

    masks = {n: keep[sl].view(p.shape).cpu() for n, p, sl in zip(names, params, layer_slices())}
    result_mask = PruneMask(masks)
    return PruneResult(
        mask=result_mask,
        weights=MappingProxyType({n: p.detach().clone() for n, p in zip(names, params)}),
        sparsity=result_mask.sparsity,
        layer_sparsity=result_mask.layer_sparsity,
        predicted_loss_increase=sum(s.saliency_sum for s in steps),
        steps=tuple(steps),
        method=method,
        scope=scope,
        pattern=nm,
        num_gradients=used_gradients,
    )


def _gradients(step: int, model: nn.Module, loss_fn: Any, data: Any, gradients: GradientSource | None,
               params: list[Tensor], m: int, batch_size: int | None, dtype: torch.dtype | None,
               d: int) -> tuple[Tensor, bool]:
    """The step's ``(m, d)`` gradients, and whether the tensor is ours to overwrite."""
    if callable(gradients) and not isinstance(gradients, Tensor):
        G = gradients(step, model)
    elif isinstance(gradients, Tensor) and step == 1:
        G = gradients
    else:
        if loss_fn is None or data is None:
            raise ValueError("recomputations > 1 with a gradient tensor needs loss_fn and data for the later steps")
        with eval_mode(model):
            G = collect_gradients(model, loss_fn, data, num_grads=m, batch_size=batch_size, params=params, dtype=dtype)
        return G, True
    if not isinstance(G, Tensor) or G.ndim != 2 or G.shape[1] != d:
        raise ValueError(f"gradients must be an (m, {d}) tensor over the pruned weights, got {getattr(G, 'shape', G)}")
    G = G.detach()
    if dtype is not None and G.dtype != dtype:
        return G.to(dtype), True
    return G, False


# ------------------------------------------------------------------------------ gradual pruning
class GradualPruner:
    """Gradual pruning from a plain training loop: prune to the next sparsity, fine-tune, repeat.

    Each :meth:`step` (or :meth:`prune_to`) prunes the model further with :func:`prune`,
    starting from the current mask (pruned weights stay pruned and out of ``F``); with an
    ``optimizer``, the mask is re-applied after every ``optimizer.step()`` so fine-tuning keeps
    the model pruned (without one, call :meth:`apply_mask` after each update).

    Args:
        model, loss_fn, data: as for :func:`prune` (``data`` supplies the gradients each step).
        schedule: the sparsities of the successive steps (increasing), e.g.
            :func:`sparsity_schedule`.
        optimizer: the fine-tuning optimizer to hook (optional).
        prune_options: keyword options of :func:`prune` (``method``, ``num_gradients``, ...).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(8)]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = GradualPruner(model, nn.CrossEntropyLoss(), data, schedule=[0.5, 0.75], optimizer=opt,
        ...                        num_gradients=8, damping=1e-3)
        >>> while not pruner.finished:
        ...     _ = pruner.step()
        ...     for x, y in data:  # fine-tune; the hook keeps the pruned weights at zero
        ...         opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
        >>> round(pruner.mask.sparsity, 2), bool((model[0].weight[~pruner.mask.masks["0"]] == 0).all())
        (0.75, True)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor] | None,
        data: Any,
        *,
        schedule: Sequence[float],
        optimizer: torch.optim.Optimizer | None = None,
        **prune_options: Any,
    ):
        schedule = [_check_fraction(s, "schedule entries") for s in schedule]
        if not schedule or any(b < a for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"schedule must be a non-empty increasing list of sparsities, got {schedule}")
        for key in ("sparsity", "mask"):
            if key in prune_options:
                raise TypeError(f"GradualPruner sets {key}= itself")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.schedule = tuple(schedule)
        self.optimizer = optimizer
        self.prune_options = dict(prune_options)
        self.results: list[PruneResult] = []
        self.mask: PruneMask | None = None
        self._handle: Any = None

    @property
    def finished(self) -> bool:
        """Whether every sparsity of the schedule has been reached."""
        return len(self.results) >= len(self.schedule)

    def step(self) -> PruneResult:
        """Prune to the next sparsity of the schedule."""
        if self.finished:
            raise IndexError(f"the schedule {self.schedule} is done")
        return self.prune_to(self.schedule[len(self.results)])

    def prune_to(self, sparsity: float) -> PruneResult:
        """Prune to ``sparsity`` from the current mask (and re-hook the optimizer)."""
        result = prune(self.model, self.loss_fn, self.data, sparsity=sparsity, mask=self.mask, **self.prune_options)
        self.mask = result.mask
        self.results.append(result)
        if self.optimizer is not None:
            self.remove()
            self._handle = keep_pruned(self.model, self.mask, self.optimizer)
        return result

    def apply_mask(self) -> None:
        """Zero the pruned weights again (after an update made without the hooked optimizer)."""
        if self.mask is not None:
            self.mask.apply(self.model)

    def remove(self) -> None:
        """Stop re-applying the mask after optimizer steps."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
