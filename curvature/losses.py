"""Losses of the model outputs: recognising them, their normalisers, and their curvature in the outputs.

Notation: a batch loss is ``L = (1/Z) * sum_u nll_u(f_u, y_u)`` over *units* ``u`` (a sample's
row for MSE/BCE, a sample or token position for cross-entropy), with ``Z`` the loss's own
normaliser: ``1`` for a sum; for a mean the number of elements (MSE/BCE), of non-ignored
targets (cross-entropy with ``ignore_index``), or the summed class weights of the targets
(``CrossEntropyLoss(weight=...)``). The curvature of a data set split into batches is
``sum_b Z_b C_b / sum_b Z_b`` (mean) or ``sum_b C_b`` (sum), which is exactly the curvature of
the one big batch, whatever the split.

The normaliser of a loss the toolkit does not recognise (a lambda, a ``functools.partial``, a
subclass with its own ``forward``) is read off the loss itself: it is evaluated once per batch
while recording which reductions it performs (``F.mse_loss(..., reduction="mean")``,
``Tensor.mean()``, ``F.kl_div(..., reduction="batchmean")``, ...), and on the first batch
the reading is verified by evaluating the loss on the batch concatenated with itself (a sum of
unit losses doubles). A loss that fails that check must declare its normaliser
(``reduction="sum"``, or ``reduction=callable(inputs, targets) -> Z``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "LossInfo",
    "Normalizer",
    "describe_loss",
    "evaluate_loss",
    "verify_normalizer",
    "LossNormaliser",
    "OutputCurvature",
    "TokenCrossEntropyLoss",
    "check_outputs",
]

logger = logging.getLogger(__name__)

ReductionSpec = Union[None, str, Callable[[Any, Any], float]]


@dataclass(frozen=True)
class LossInfo:
    """What the toolkit knows about a loss function.

    Attributes:
        kind: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` (closed forms) or ``"generic"``.
        reduction: ``"mean"`` or ``"sum"`` as declared or read from the loss object
            (``"mean"`` when unknown; the per-batch :class:`Normalizer` is authoritative).
        ignore_index: cross-entropy's ignored class index (or ``None``).
        label_smoothing: cross-entropy's label smoothing.
        weight: cross-entropy class weights, or BCE's element weights (or ``None``).
        pos_weight: BCE-with-logits ``pos_weight`` (or ``None``).
        declared: the ``reduction=`` the user passed (``None``: read from the loss).
        normalizer: a user-declared normaliser ``(inputs, targets) -> Z`` (or ``None``).
        class_dim: cross-entropy's class dimension: ``1`` (PyTorch's layout) or ``-1``
            (:class:`TokenCrossEntropyLoss`, logits ``(..., V)``).
        shift: :class:`TokenCrossEntropyLoss` predicts token ``t + 1`` at position ``t``.
    """

    kind: str
    reduction: str
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    weight: Tensor | None = field(default=None, compare=False, repr=False)
    pos_weight: Tensor | None = field(default=None, compare=False, repr=False)
    declared: str | None = None
    normalizer: Callable[[Any, Any], float] | None = field(default=None, compare=False, repr=False)
    class_dim: int = field(default=1, repr=False)
    shift: bool = field(default=False, repr=False)

    @property
    def has_closed_form(self) -> bool:
        """Whether the output-space Hessian has a closed form here."""
        return self.kind != "generic"

    @property
    def is_likelihood(self) -> bool:
        """Whether the loss is a negative log-likelihood with a sampler (the Fisher needs one)."""
        return self.kind in ("cross_entropy", "mse", "bce_with_logits") and self.weight is None and (
            self.pos_weight is None
        )


@dataclass(frozen=True)
class Normalizer:
    """The normaliser ``Z`` of one batch's loss: ``L = (1/Z) sum_u nll_u``.

    Attributes:
        value: ``Z`` (``1.0`` for a sum).
        reduction: ``"mean"`` (``Z`` grows with the batch) or ``"sum"``.
        source: how it was found (``"closed form"``, ``"recorded"``, ``"declared"``).
        num_means: mean reductions recorded (for ``"recorded"``).
    """

    value: float
    reduction: str
    source: str = "closed form"
    num_means: int = 0


class TokenCrossEntropyLoss(nn.Module):
    """Token-level cross-entropy of language-model logits ``(..., S, V)`` against labels ``(..., S)``.

    What Hugging Face causal LMs compute from ``labels``: with ``shift=True`` position ``t``
    predicts label ``t + 1``; labels equal to ``ignore_index`` (padding, prompts) are left out of
    the loss AND of its normaliser (``mean`` divides by the number of valid tokens). The
    curvature operators use its closed form (as for ``nn.CrossEntropyLoss``).

    Example:
        >>> logits, labels = torch.zeros(2, 4, 5), torch.tensor([[1, 2, 3, -100], [4, 0, -100, -100]])
        >>> round(TokenCrossEntropyLoss(shift=True)(logits, labels).item(), 4)  # log(5) over 4 tokens
        1.6094
    """

    def __init__(
        self, *, ignore_index: int = -100, label_smoothing: float = 0.0, shift: bool = False, reduction: str = "mean"
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.shift = shift
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction,
        )


# -- recognising the loss --------------------------------------------------------------------------
def _unwrap_partial(loss_fn: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        inner, kwargs = _unwrap_partial(loss_fn.func)
        return inner, {**kwargs, **loss_fn.keywords}
    return loss_fn, {}


def _exact(loss_fn: Any, cls: type) -> bool:
    """An instance of ``cls`` whose ``forward`` is ``cls``'s own (a subclass may compute anything)."""
    return isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward


def describe_loss(loss_fn: Callable[..., Tensor], reduction: ReductionSpec = None) -> LossInfo:
    """Classify ``loss_fn``; closed forms are used only where they are exactly the loss computed.

    Recognised: ``nn.CrossEntropyLoss`` (class weights, ``ignore_index``, label smoothing),
    ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (``weight``/``pos_weight``), the matching
    ``torch.nn.functional`` functions and ``functools.partial`` of them with keyword options.
    Subclasses that override ``forward`` and all other callables are ``"generic"``: their
    curvature comes from autodiff and their normaliser from :func:`evaluate_loss`.

    ``reduction`` declares the reduction: ``"mean"``/``"sum"`` (checked against the loss on
    the first product), or a callable ``(inputs, targets) -> Z`` giving each batch's normaliser
    (then the loss is taken to be a mean: ``L = (1/Z) sum_u nll_u``).

    Example:
        >>> describe_loss(nn.MSELoss(reduction="sum"))
        LossInfo(kind='mse', reduction='sum', ignore_index=None, label_smoothing=0.0, declared=None)
        >>> describe_loss(functools.partial(F.cross_entropy, reduction="sum")).reduction
        'sum'
    """
    declared: str | None = None
    normalizer = None
    if callable(reduction):
        normalizer = reduction
    elif reduction is not None:
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"reduction must be 'mean', 'sum' or a callable (inputs, targets) -> normaliser, got {reduction!r}"
            )
        declared = reduction
    fn, kwargs = _unwrap_partial(loss_fn)
    own = kwargs.get("reduction", getattr(fn, "reduction", "mean"))
    if own not in ("mean", "sum", "batchmean"):
        raise ValueError(
            f"the loss's reduction must be 'mean' or 'sum' (the loss must return a scalar), got {own!r}"
        )
    red = declared or ("mean" if own == "batchmean" else own)
    common = {"declared": declared, "normalizer": normalizer}
    if _exact(fn, TokenCrossEntropyLoss) and not kwargs:
        return LossInfo(
            "cross_entropy", red, int(fn.ignore_index), float(fn.label_smoothing), class_dim=-1, shift=fn.shift,
            **common,
        )
    if _exact(fn, nn.CrossEntropyLoss) or fn is F.cross_entropy:
        opts = (
            {"weight": fn.weight, "ignore_index": fn.ignore_index, "label_smoothing": fn.label_smoothing}
            if isinstance(fn, nn.Module)
            else {"weight": None, "ignore_index": -100, "label_smoothing": 0.0}
        )
        opts.update({k: v for k, v in kwargs.items() if k in opts})
        if set(kwargs) - {"weight", "ignore_index", "label_smoothing", "reduction"}:
            return LossInfo("generic", red, **common)
        return LossInfo(
            "cross_entropy", red, int(opts["ignore_index"]), float(opts["label_smoothing"]),
            weight=opts["weight"], **common,
        )
    if _exact(fn, nn.MSELoss) or fn is F.mse_loss:
        if set(kwargs) - {"reduction"}:
            return LossInfo("generic", red, **common)
        return LossInfo("mse", red, **common)
    if _exact(fn, nn.BCEWithLogitsLoss) or fn is F.binary_cross_entropy_with_logits:
        opts = (
            {"weight": fn.weight, "pos_weight": fn.pos_weight}
            if isinstance(fn, nn.Module)
            else {"weight": None, "pos_weight": None}
        )
        if set(kwargs) - {"weight", "pos_weight", "reduction"}:
            return LossInfo("generic", red, **common)
        opts.update({k: v for k, v in kwargs.items() if k in opts})
        return LossInfo("bce_with_logits", red, weight=opts["weight"], pos_weight=opts["pos_weight"], **common)
    return LossInfo("generic", red, **common)


# -- normalisers -----------------------------------------------------------------------------------
def _shape_numel(*tensors: Any) -> int:
    shapes = [t.shape for t in tensors if isinstance(t, Tensor)]
    return math.prod(torch.broadcast_shapes(*shapes)) if shapes else 1


def _class_count_normalizer(input: Tensor, target: Any, weight: Tensor | None, ignore_index: int) -> float:
    """``Z`` of a mean cross-entropy / NLL loss: valid targets, or their summed class weights."""
    if not isinstance(target, Tensor):
        return 1.0
    if target.is_floating_point():  # class probabilities: the mean is over positions
        return float(max(input.numel() // max(input.shape[1] if input.ndim > 1 else input.shape[0], 1), 1))
    valid = target != ignore_index
    if weight is None:
        return float(valid.sum().item())
    return float(weight.detach().to(target.device)[target[valid]].sum().item())


_ELEMENTWISE = {
    F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
    F.binary_cross_entropy_with_logits, F.soft_margin_loss, F.poisson_nll_loss, F.gaussian_nll_loss,
    F.multilabel_soft_margin_loss, F.hinge_embedding_loss,
}
_CLASS = {F.cross_entropy, F.nll_loss}
_MEANS = {torch.mean, Tensor.mean}


def _bound(func: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        sig = inspect.signature(func)
        b = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    b.apply_defaults()
    return dict(b.arguments)


class _ReductionRecorder(TorchFunctionMode):
    """Records the denominators of the mean reductions a loss performs (top-level calls only:
    the mode is off while a recorded function runs, so library internals are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.denominators: list[float] = []
        self.opaque: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ELEMENTWISE or func in _CLASS or func is F.kl_div:
            self._record_loss(func, args, kwargs)
        elif func in _MEANS:
            a = _bound(torch.mean, args, kwargs) if func is torch.mean else None
            x = args[0] if args else kwargs.get("input")
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None) if a is None else a.get("dim")
            if isinstance(x, Tensor):
                if dim is None:
                    self.denominators.append(float(x.numel()))
                else:
                    dims = [dim] if isinstance(dim, int) else list(dim)
                    self.denominators.append(float(math.prod(x.shape[d] for d in dims)) if x.ndim else 1.0)
        return func(*args, **kwargs)

    def _record_loss(self, func: Any, args: tuple, kwargs: dict) -> None:
        a = _bound(func, args, kwargs)
        if a is None or a.get("size_average") is not None or a.get("reduce") is not None:
            self.opaque.append(getattr(func, "__name__", str(func)))
            return
        red = a.get("reduction", "mean")
        if red in ("sum", "none"):
            return
        inp, tgt = a.get("input"), a.get("target")
        if func in _CLASS:
            z = _class_count_normalizer(inp, tgt, a.get("weight"), a.get("ignore_index", -100))
        elif func is F.kl_div and red == "batchmean":
            z = float(inp.shape[0]) if isinstance(inp, Tensor) and inp.ndim else 1.0
        elif func is F.gaussian_nll_loss or func is F.poisson_nll_loss:
            z = float(_shape_numel(inp, tgt))
        else:
            z = float(_shape_numel(inp, tgt))
        self.denominators.append(z)


def _closed_form_normalizer(info: LossInfo, outputs: Tensor, targets: Any) -> float:
    if info.kind == "cross_entropy" and info.class_dim == -1:
        return _targets_normalizer(info, targets)
    if info.kind == "cross_entropy":
        return _class_count_normalizer(outputs, targets, info.weight, info.ignore_index)
    return float(_shape_numel(outputs, targets))


def evaluate_loss(
    info: LossInfo,
    loss_fn: Callable[..., Tensor],
    outputs: Tensor,
    targets: Any,
    inputs: Any = None,
    *,
    rule: int | None = None,
) -> tuple[Any, Normalizer]:
    """``loss_fn(outputs, targets)`` and the batch's :class:`Normalizer`.

    Closed-form losses get their normaliser from the targets; other losses are evaluated while
    recording their mean reductions. A declared callable gives its value on ``(inputs, targets)``.
    ``rule`` says how several recorded means combine: ``None`` their product (nested means, as
    in ``x.mean(1).mean()``), ``i`` the ``i``-th alone (a sum of means of proportional sizes).

    Example:
        >>> out, y = torch.zeros(4, 3), torch.tensor([0, 1, -100, 2])
        >>> evaluate_loss(describe_loss(nn.CrossEntropyLoss()), nn.CrossEntropyLoss(), out, y)[1].value
        3.0
        >>> mse = lambda o, t: F.mse_loss(o, t)
        >>> evaluate_loss(describe_loss(mse), mse, out, torch.ones(4, 3))[1]
        Normalizer(value=12.0, reduction='mean', source='recorded', num_means=1)
    """
    if info.normalizer is not None:
        value = float(info.normalizer(inputs, targets))
        if not value > 0:
            raise ValueError(f"the declared normaliser reduction=callable returned {value}; it must be positive")
        return loss_fn(outputs, targets), Normalizer(value, "mean", "declared")
    if info.kind != "generic":
        loss = loss_fn(outputs, targets)
        red = _own_reduction(loss_fn)
        z = _closed_form_normalizer(info, outputs, targets) if red == "mean" else 1.0
        return loss, Normalizer(z, red)
    recorder = _ReductionRecorder()
    with recorder:
        loss = loss_fn(outputs, targets)
    if recorder.opaque:
        raise ValueError(
            f"cannot tell the normaliser of loss_fn: it calls {recorder.opaque[0]} with the deprecated "
            "size_average/reduce arguments; use reduction= instead"
        )
    dens = recorder.denominators
    if dens:
        value = math.prod(dens) if rule is None or rule >= len(dens) else dens[rule]
        return loss, Normalizer(float(value), "mean", "recorded", len(dens))
    return loss, Normalizer(1.0, "sum", "recorded")


def _own_reduction(loss_fn: Any) -> str:
    fn, kwargs = _unwrap_partial(loss_fn)
    red = kwargs.get("reduction", getattr(fn, "reduction", "mean"))
    return "mean" if red == "batchmean" else red


def _doubled(x: Any) -> Any:
    """The batch structure concatenated with itself along the sample dimension."""
    if isinstance(x, Tensor) and x.ndim > 0:
        return torch.cat([x, x])
    if isinstance(x, Mapping):
        return {k: _doubled(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_doubled(v) for v in x)
    raise TypeError(f"cannot concatenate a {type(x).__name__} with itself")


def verify_normalizer(
    info: LossInfo,
    loss_fn: Callable[..., Tensor],
    outputs: Tensor,
    targets: Any,
    *,
    inputs: Any = None,
    strict: bool = True,
) -> tuple[Normalizer, int | None]:
    """Evaluate a batch's normaliser, check it against the loss and the declaration; return it
    with the rule (see :func:`evaluate_loss`) that passed the check.

    The loss's unnormalised sum ``S = Z L`` must double when the batch is concatenated with
    itself, which holds for every sum or normalised sum of unit losses and exposes a normaliser
    the recorder did not see (``x.sum() / len(x)``). A declared ``reduction`` that contradicts
    the (verified) loss raises. ``strict``: also raise when the check fails (needed when several
    batches are combined, or a per-unit residual scale is used); otherwise only log it.

    Example:
        >>> out, y = torch.randn(4, 3), torch.randn(4, 3)
        >>> verify_normalizer(describe_loss(nn.MSELoss()), nn.MSELoss(), out, y)[0].value
        12.0
        >>> bad = describe_loss(nn.MSELoss(), "sum")
        >>> verify_normalizer(bad, nn.MSELoss(), out, y)
        Traceback (most recent call last):
        ...
        ValueError: reduction='sum' contradicts loss_fn, which takes a mean (normaliser 12 on this batch)
    """
    out = outputs.detach()
    with torch.no_grad():
        loss, norm = evaluate_loss(info, loss_fn, out, targets, inputs)
    if norm.reduction == "mean" and norm.value == 0:
        return norm, None  # a batch of weight 0 (all targets ignored) shows nothing: verify on the next
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        return norm, None  # the operators report a non-scalar loss themselves
    if not torch.is_floating_point(loss):
        raise TypeError(
            f"loss_fn returned a {loss.dtype} tensor; curvature needs a loss that is twice differentiable "
            "in the model outputs (a floating-point scalar)"
        )
    rules: list[int | None] = [None] + (list(range(norm.num_means)) if norm.num_means > 1 else [])
    ok, rule, s1, s2 = True, None, 0.0, 0.0
    try:
        with torch.no_grad():
            doubled = (_doubled(out), _doubled(targets), _doubled(inputs) if info.normalizer else None)
            loss2 = loss_fn(doubled[0], doubled[1])
    except Exception as exc:  # noqa: BLE001 - any loss may refuse a doubled batch; the check is then skipped
        logger.info("loss normaliser check skipped: the loss does not take a doubled batch (%s)", exc)
    else:
        for rule in rules:
            with torch.no_grad():
                norm = evaluate_loss(info, loss_fn, out, targets, inputs, rule=rule)[1]
                norm2 = evaluate_loss(info, loss_fn, *doubled, rule=rule)[1]
            s1, s2 = float(loss) * norm.value, float(loss2) * norm2.value
            tol = 1e3 * torch.finfo(out.dtype).eps * (abs(s2) + 2 * abs(s1)) + 1e-300
            ok = abs(s2 - 2 * s1) <= tol
            if ok:
                break
    if ok and info.declared is not None and info.declared != norm.reduction:
        raise ValueError(
            f"reduction={info.declared!r} contradicts loss_fn, which takes a {norm.reduction} "
            f"(normaliser {norm.value:g} on this batch)"
        )
    if not ok:
        message = (
            f"cannot tell how loss_fn normalises its batch: with normaliser {norm.value:g} ({norm.reduction}, "
            f"{norm.source}) its unnormalised value does not double on the batch concatenated with itself "
            f"({s1:.6g} -> {s2:.6g}); declare it with reduction='sum' or reduction=callable(inputs, targets) -> "
            "normaliser, so that batches are combined as the loss of the whole data set"
        )
        if strict:
            raise ValueError(message)
        logger.info(message)
        rule = None
    return norm, rule


def _token_labels(info: LossInfo, labels: Tensor) -> Tensor:
    """Labels aligned with the logits' positions (shifted left, the last position ignored)."""
    if not info.shift:
        return labels
    pad = torch.full_like(labels[..., :1], info.ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _targets_normalizer(info: LossInfo, targets: Any) -> float:
    """``Z`` of a closed-form mean loss from its targets (outputs and targets have the same shape
    for MSE/BCE, and class targets or probabilities for cross-entropy)."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor for {info.kind}, got {type(targets).__name__}")
    if info.kind == "cross_entropy" and info.class_dim == -1:
        return float((_token_labels(info, targets) != info.ignore_index).sum().item())
    if info.kind == "cross_entropy":
        if targets.is_floating_point():
            return float(targets.numel() // max(targets.shape[1] if targets.ndim > 1 else targets.numel(), 1))
        return _class_count_normalizer(targets, targets, info.weight, info.ignore_index)
    return float(targets.numel())


def _fingerprint(obj: Any) -> tuple:
    """Shapes of a batch structure plus a cheap content hash of its tensors (small: targets)."""
    if isinstance(obj, Tensor):
        flat = obj.detach().reshape(-1)
        if flat.numel() == 0:
            return (tuple(obj.shape), str(obj.dtype))
        w = (torch.arange(flat.numel(), device=flat.device) % 9973 + 1).to(torch.float64)
        x = flat.to(torch.float64)
        return (tuple(obj.shape), str(obj.dtype), float(x.sum()), float((x * w).sum()))
    if isinstance(obj, Mapping):
        return tuple((k, _fingerprint(v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return tuple(_fingerprint(v) for v in obj)
    return (repr(obj),)


def _shapes(obj: Any) -> tuple:
    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    if isinstance(obj, Mapping):
        return tuple((k, _shapes(v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return tuple(_shapes(v) for v in obj)
    return ()


def _shows_nothing(norm: Normalizer) -> bool:
    """A mean over nothing (every target ignored): the batch weighs 0 and verifies nothing."""
    return norm.reduction == "mean" and norm.value == 0


class LossNormaliser:
    """A loss's own normaliser per batch, ``normaliser(inputs, targets) -> Z``, for batch weights.

    Closed-form losses compute ``Z`` from the targets; a declared ``reduction=callable`` is
    called; any other loss is evaluated on the batch's outputs (``forward(inputs)`` without a
    graph, once per distinct batch: the result is remembered by the batch's shapes and target
    contents) while its reductions are recorded. The first batch's reading is checked with
    :func:`verify_normalizer` (``strict``: raise when it cannot be verified).

    Example:
        >>> f = lambda x: x
        >>> loss = lambda o, t: F.cross_entropy(o, t, ignore_index=0)
        >>> z = LossNormaliser(describe_loss(loss), loss, f)
        >>> z(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
        2.0
    """

    def __init__(
        self,
        info: LossInfo,
        loss_fn: Callable[..., Tensor],
        forward: Callable[[Any], Tensor],
        *,
        device: torch.device | None = None,
        strict: bool = True,
    ):
        self.info = info
        self.loss_fn = loss_fn
        self.forward = forward
        self.device = device
        self.strict = strict
        self._memo: dict[tuple, float] = {}
        self._verified = False
        self._awaiting = False
        self._rule: int | None = None

    def _outputs(self, inputs: Any) -> Tensor:
        from .data import move_to

        if self.device is not None:
            inputs = move_to(inputs, self.device)
        with torch.no_grad():
            return self.forward(inputs)

    def resolve(self, first_batch: Any) -> LossInfo:
        """For a loss the toolkit does not recognise (a lambda), read off ``first_batch`` whether
        it sums or averages and verify its normaliser (and any declaration) with
        :func:`verify_normalizer`; return the (possibly updated) :class:`LossInfo`."""
        info = self.info
        if info.kind != "generic" or info.normalizer is not None:
            return info
        inputs, targets = first_batch
        outputs = self._outputs(inputs)
        if not isinstance(outputs, Tensor):
            return info
        norm, self._rule = verify_normalizer(
            info, self.loss_fn, outputs, self._moved(targets), inputs=inputs, strict=self.strict
        )
        self._verified = not _shows_nothing(norm)
        self._awaiting = not self._verified
        self._memo[(_shapes(inputs), _fingerprint(self._moved(targets)))] = norm.value
        if norm.reduction != info.reduction:
            self.info = dataclasses.replace(info, reduction=norm.reduction)
        return self.info

    @property
    def awaiting_batch(self) -> bool:
        """Whether the last :meth:`resolve` met a batch of weight 0 (every target ignored), which
        shows nothing about the normaliser: resolve on the next batch."""
        return self._awaiting

    def _moved(self, targets: Any) -> Any:
        from .data import move_to

        return move_to(targets, self.device) if self.device is not None else targets

    def check_declaration(self) -> None:
        """Raise if a declared ``reduction`` contradicts a recognised loss's own (cheap; every product)."""
        info = self.info
        if info.kind != "generic" and info.declared is not None and info.normalizer is None:
            own = _own_reduction(self.loss_fn)
            if own != info.declared:
                raise ValueError(
                    f"reduction={info.declared!r} contradicts loss_fn, whose reduction is {own!r}; "
                    "leave reduction= out (the operators follow the loss) or change the loss"
                )

    def of_outputs(self, inputs: Any, outputs: Tensor, targets: Any) -> Normalizer:
        """The batch's :class:`Normalizer` when its outputs are at hand (no extra forward)."""
        info = self.info
        if not self._verified:
            self.check_declaration()
            if info.kind == "generic" or info.normalizer is not None:
                norm, self._rule = verify_normalizer(
                    info, self.loss_fn, outputs, targets, inputs=inputs, strict=self.strict
                )
                self._verified = not _shows_nothing(norm)
                self._memo[(_shapes(inputs), _fingerprint(targets))] = norm.value
                return norm
            self._verified = True
        if info.normalizer is not None:
            return Normalizer(float(info.normalizer(inputs, targets)), "mean", "declared")
        if info.kind != "generic":
            red = _own_reduction(self.loss_fn)
            return Normalizer(_targets_normalizer(info, targets) if red == "mean" else 1.0, red)
        with torch.no_grad():
            _, norm = evaluate_loss(info, self.loss_fn, outputs.detach(), targets, rule=self._rule)
        self._memo[(_shapes(inputs), _fingerprint(targets))] = norm.value
        return norm

    def __call__(self, inputs: Any, targets: Any) -> float:
        info = self.info
        if info.kind != "generic" and info.normalizer is None:
            if not self._verified:
                self.check_declaration()
                self._verified = True
            red = _own_reduction(self.loss_fn)
            return _targets_normalizer(info, targets) if red == "mean" else 1.0
        key = (_shapes(inputs), _fingerprint(targets))
        if key in self._memo:
            return self._memo[key]
        if info.normalizer is not None and self._verified:
            return float(info.normalizer(inputs, targets))
        return self.of_outputs(inputs, self._outputs(inputs), self._moved(targets)).value


# -- output-space curvature -----------------------------------------------------------------------
def check_outputs(info: LossInfo, outputs: Any, targets: Any) -> None:
    """Clear errors, before autograd's, for outputs the loss cannot take: not floating point,
    targets on another device, shapes that do not match (MSE/BCE would silently broadcast).

    Example:
        >>> check_outputs(describe_loss(nn.MSELoss()), torch.zeros(4, 2), torch.zeros(4, 1))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: model outputs of shape (4, 2) do not match targets of shape (4, 1) for mse ...
    """
    if not isinstance(outputs, Tensor):
        return
    if not outputs.is_floating_point():
        raise TypeError(
            f"the model outputs are {outputs.dtype}; curvature needs floating-point outputs the loss is "
            "twice differentiable in"
        )
    if isinstance(targets, Tensor) and targets.device != outputs.device:
        raise ValueError(f"targets are on {targets.device} but the model outputs are on {outputs.device}")
    if info.kind in ("mse", "bce_with_logits") and isinstance(targets, Tensor) and targets.shape != outputs.shape:
        raise ValueError(
            f"model outputs of shape {tuple(outputs.shape)} do not match targets of shape {tuple(targets.shape)} "
            f"for {info.kind} (PyTorch would broadcast them); reshape the outputs or targets"
        )
    if info.kind == "cross_entropy" and info.class_dim == -1:
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.shape != outputs.shape[:-1]:
            raise ValueError(
                f"token cross-entropy needs logits (..., S, V) and integer labels (..., S); got logits of shape "
                f"{tuple(outputs.shape)} and targets of shape {tuple(getattr(targets, 'shape', ()))}"
            )
    elif info.kind == "cross_entropy":
        if outputs.ndim < 2:
            raise ValueError(f"cross-entropy outputs need a class dimension, got shape {tuple(outputs.shape)}")
        if isinstance(targets, Tensor):
            expected = (outputs.shape[0], *outputs.shape[2:])
            ok = targets.shape == outputs.shape if targets.is_floating_point() else tuple(targets.shape) == expected
            if not ok:
                raise ValueError(
                    f"cross-entropy outputs of shape {tuple(outputs.shape)} (classes in dim 1) need class targets "
                    f"of shape {expected} or probabilities of shape {tuple(outputs.shape)}, got "
                    f"{tuple(targets.shape)}; for (N, S, V) language-model logits pass outputs.transpose(1, 2) "
                    "or flatten both"
                )


class OutputCurvature:
    """Curvature of one batch's loss with respect to the model outputs ``F``.

    Built once per batch from the detached outputs and targets; applies, to a stack of output
    tangents ``U`` of shape ``(k, *F.shape)``, the loss Hessian (GGN / exact Fisher), a
    Monte-Carlo Fisher, or the empirical-Fisher residual outer products. ``normalizer`` is the
    batch's :class:`Normalizer` (``kappa = 1/Z``).
    """

    def __init__(
        self,
        info: LossInfo,
        loss_fn: Callable[..., Tensor],
        outputs: Tensor,
        targets: Any,
        normalizer: Normalizer | None = None,
    ):
        self.info = info
        self.loss_fn = loss_fn
        self.outputs = outputs.detach()
        self.targets = targets
        check_outputs(info, self.outputs, targets)
        if normalizer is None:
            with torch.no_grad():
                normalizer = evaluate_loss(info, loss_fn, self.outputs, targets)[1]
        self.normalizer = normalizer
        self.kappa = 1.0 / max(normalizer.value, 1e-300) if normalizer.value > 0 else 0.0
        self._scale: Tensor | None = None  # per-unit factor of the closed-form Hessian
        self._generic_grad: tuple[Tensor, Tensor] | None = None
        if info.kind == "cross_entropy":
            # Class dimension last; each remaining position is one categorical unit.
            C = self.outputs.shape[info.class_dim]
            self._logits = self.outputs.movedim(info.class_dim, -1).reshape(-1, C)
            self._probs = torch.softmax(self._logits, dim=-1)
            self._targets_dist = self._target_distribution(targets)  # q_u with sum_c q_uc = scale_u
            self._scale = self._targets_dist.sum(-1)
        elif info.kind == "bce_with_logits":
            s = torch.sigmoid(self.outputs)
            factor = s * (1 - s)
            if info.weight is not None or info.pos_weight is not None:
                y = targets.to(self.outputs.dtype)
                if info.pos_weight is not None:
                    factor = factor * (info.pos_weight.to(y.dtype) * y + 1 - y)
                if info.weight is not None:
                    factor = factor * info.weight.to(y.dtype)
            self._bce_factor = factor

    def _target_distribution(self, targets: Any) -> Tensor:
        """Per unit the (unnormalised) target weights ``q_u`` with ``nll_u = -sum_c q_uc log p_uc``."""
        p = self._probs
        C = p.shape[-1]
        eps = self.info.label_smoothing
        w = self.info.weight.to(device=p.device, dtype=p.dtype) if self.info.weight is not None else None
        if targets.is_floating_point():
            q = targets.movedim(1, -1).reshape(-1, C).to(p.dtype)
            if eps:
                q = (1 - eps) * q + eps / C
            return q * w if w is not None else q
        t = _token_labels(self.info, targets).reshape(-1)
        valid = (t != self.info.ignore_index).to(p.dtype)
        onehot = F.one_hot(t.clamp(0, C - 1), C).to(p.dtype)
        if w is not None:
            q = (1 - eps) * onehot * w + (eps / C) * w
        else:
            q = (1 - eps) * onehot + eps / C
        return q * valid[:, None]

    # -- unit layout -------------------------------------------------------------------------
    def _to_units(self, U: Tensor) -> Tensor:
        """``(k, *F.shape) -> (k, units, per_unit)``."""
        k = U.shape[0]
        if self.info.kind == "cross_entropy" and self.info.class_dim == -1:
            return U.reshape(k, -1, self.outputs.shape[-1])
        if self.info.kind == "cross_entropy":
            return U.movedim(2, -1).reshape(k, -1, self.outputs.shape[1])
        return U.reshape(k, self.outputs.shape[0] if self.outputs.ndim else 1, -1)

    def _from_units(self, W: Tensor) -> Tensor:
        k = W.shape[0]
        if self.info.kind == "cross_entropy" and self.info.class_dim == -1:
            return W.reshape(k, *self.outputs.shape)
        if self.info.kind == "cross_entropy":
            moved_shape = (k, *self.outputs.movedim(1, -1).shape)
            return W.reshape(moved_shape).movedim(-1, 2)
        return W.reshape(k, *self.outputs.shape)

    # -- loss Hessian ---------------------------------------------------------------------------
    def hessian_product(self, U: Tensor) -> Tensor:
        """``(d^2 L / dF^2) U`` for each of the ``k`` stacked tangents."""
        kind = self.info.kind
        if kind == "cross_entropy":
            p = self._probs
            Uu = self._to_units(U)
            W = p * Uu - p * (Uu * p).sum(-1, keepdim=True)
            return self._from_units(W * (self._scale * self.kappa)[:, None])
        if kind == "mse":
            return U * (2.0 * self.kappa)
        if kind == "bce_with_logits":
            return U * (self._bce_factor * self.kappa)
        return self._generic_hessian_product(U)

    def _generic_hessian_product(self, U: Tensor) -> Tensor:
        """Reverse-over-reverse on the (small) output space: one create-graph gradient of the loss
        in the outputs, then one batched backward for all tangents. Unlike forward-mode AD this
        works for every loss with a double backward (``huber_loss`` has no forward-AD formula,
        ``mse_loss`` trips forward AD's zero tangents) and respects ``no_grad``/``detach`` in it."""
        if self._generic_grad is None:
            out = self.outputs.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = self.loss_fn(out, self.targets)
                if not (isinstance(loss, Tensor) and loss.is_floating_point() and loss.requires_grad):
                    raise TypeError(
                        "loss_fn is not differentiable in the model outputs (it returned "
                        f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else ' of dtype ' + str(loss.dtype)}"
                        " without a gradient); curvature needs a twice-differentiable loss"
                    )
                (g,) = torch.autograd.grad(loss, out, create_graph=True)
            self._generic_grad = (out, g)
            logger.info("loss-Hessian products by reverse-over-reverse on the output space (%s)", type(self.loss_fn))
        out, g = self._generic_grad
        if not g.requires_grad:  # the loss is linear in the outputs
            return torch.zeros_like(U)
        with torch.enable_grad():
            try:
                (HU,) = torch.autograd.grad(g, out, U, retain_graph=True, is_grads_batched=True, allow_unused=True,
                                            materialize_grads=True)
            except (RuntimeError, NotImplementedError) as exc:
                logger.info("loss-Hessian: batched backward unavailable (%s); one backward per tangent", exc)
                HU = torch.stack([
                    torch.autograd.grad(g, out, u, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
                    for u in U
                ])
        return HU

    # -- Fisher variants ------------------------------------------------------------------------
    def sampled_residuals(self, num_samples: int, generator: torch.Generator) -> Tensor:
        """Gradients of the raw negative log-likelihood at labels drawn from the model, ``(S, units, per_unit)``."""
        kind = self.info.kind
        if not self.info.is_likelihood:
            raise ValueError(
                "the Fisher needs a likelihood: supported losses are CrossEntropyLoss, MSELoss and BCEWithLogitsLoss "
                "without weights; use GGN for other losses"
            )
        if kind == "cross_entropy":
            p = self._probs
            labels = torch.multinomial(p, num_samples, replacement=True, generator=generator).T  # (S, units)
            onehot = F.one_hot(labels, p.shape[-1]).to(p.dtype)
            R = p.unsqueeze(0) - onehot
            # Each unit's Fisher carries the same factor as its Hessian (0 for ignored tokens).
            return R * self._scale.sqrt()[:, None]
        flat = self.outputs.reshape(self.outputs.shape[0], -1)
        if kind == "mse":
            # nll (f - y)^2 is a Gaussian with variance 1/2; its score 2(f - y~) ~ N(0, 2).
            noise = torch.randn((num_samples, *flat.shape), generator=generator, dtype=flat.dtype, device=flat.device)
            return noise * (2.0**0.5)
        s = torch.sigmoid(flat)
        draws = torch.rand((num_samples, *flat.shape), generator=generator, dtype=flat.dtype, device=flat.device)
        return s.unsqueeze(0) - (draws < s).to(flat.dtype)

    def residuals(self) -> Tensor:
        """Per-unit gradients of the raw (unnormalised) loss at the observed targets, ``(units, per_unit)``."""
        kind = self.info.kind
        if kind == "cross_entropy":
            return self._probs * self._scale[:, None] - self._targets_dist
        flat = self.outputs.reshape(self.outputs.shape[0], -1)
        if kind == "mse":
            return 2.0 * (flat - self.targets.reshape(flat.shape).to(flat.dtype))
        if kind == "bce_with_logits" and self.info.weight is None and self.info.pos_weight is None:
            return torch.sigmoid(flat) - self.targets.reshape(flat.shape).to(flat.dtype)
        # Other losses: the gradient of the batch loss w.r.t. the outputs is (1/Z) times the units' residuals.
        outputs = self.outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss_fn(outputs, self.targets), outputs)
        return g.reshape(g.shape[0] if g.ndim else 1, -1) * self.normalizer.value

    def outer_product(self, R: Tensor, U: Tensor) -> Tensor:
        """``kappa * mean_s R_s R_s^T U`` per unit; ``R`` is ``(S, units, per_unit)`` or ``(units, per_unit)``."""
        if R.ndim == 2:
            R = R.unsqueeze(0)
        Uu = self._to_units(U)
        coeff = torch.einsum("sup,kup->ksu", R, Uu)
        W = torch.einsum("ksu,sup->kup", coeff, R) * (self.kappa / R.shape[0])
        return self._from_units(W)
