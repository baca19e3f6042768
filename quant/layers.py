"""Which layers are quantized, checks on calibration data, per-layer MACs and model evaluation."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from curvature import BatchSource, call_model, match_names

logger = logging.getLogger(__name__)

__all__ = [
    "QUANTIZABLE_TYPES",
    "is_quantizable",
    "channel_axis",
    "quantizable_layers",
    "check_calibration_data",
    "iterate_batches",
    "layer_macs",
    "Evaluation",
    "EVALUATION_METRICS",
    "MetricNotApplicableError",
    "evaluate_model",
    "eval_mode",
]

#: Module types quantized by default: their ``weight`` is the quantized tensor. Hugging Face's
#: ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers, weight stored ``(in, out)``) is
#: quantized too, see :func:`is_quantizable`.
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _hf_conv1d_type() -> type | None:
    # A model holding a Conv1D has imported transformers already: look it up rather than import
    # transformers (seconds) for every user of quant.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is quantized by default: a :data:`QUANTIZABLE_TYPES` instance or a
    Hugging Face ``Conv1D`` (GPT-2).

    Examples:
        >>> is_quantizable(nn.Linear(2, 2)), is_quantizable(nn.ReLU())
        (True, False)
    """
    if isinstance(module, QUANTIZABLE_TYPES):
        return True
    conv1d = _hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def channel_axis(module: nn.Module) -> int:
    """The output-channel axis of ``module.weight``: 1 for Hugging Face ``Conv1D`` (stored
    ``(in, out)``), 0 for Linear/Conv (``(out, in, ...)``) and Embedding (one scale per token).

    Examples:
        >>> channel_axis(nn.Linear(3, 2))
        0
    """
    conv1d = _hf_conv1d_type()
    return 1 if conv1d is not None and isinstance(module, conv1d) else 0


def _macs_per_output(module: nn.Module) -> int:
    """Multiply-accumulates per output element: the fan-in of one output."""
    w = module.weight
    if channel_axis(module) == 1:
        return int(w.shape[0])  # Conv1D: (in, out)
    return int(w[0].numel())  # in_features, or in_channels/groups * prod(kernel)


def quantizable_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The layers whose weights are quantized, by module name, in model order.

    Args:
        model: the network.
        layers: module names to use; default every Linear, Conv1d/2d/3d, Embedding and Hugging
            Face Conv1D module.
            A named module must exist and have a ``weight`` parameter.

    Examples:
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(quantizable_layers(m))
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if layers is None:
        found: dict[str, nn.Module] = {}
        owner: dict[int, str] = {}
        for name, m in modules.items():
            if not is_quantizable(m):
                continue
            # A weight tied between layers (a language model's embedding and output head) is one
            # tensor with one bit-width: it is listed once, under the first module that holds it.
            key = id(m.weight)
            if key in owner:
                logger.info("layer %r shares its weight with %r; quantized once, as %r", name, owner[key], owner[key])
                continue
            owner[key] = name
            found[name] = m
        if not found:
            raise ValueError(
                "model has no quantizable layer (Linear, Conv1d/2d/3d or Embedding); "
                "name the layers to quantize with layers=[...]"
            )
        return found
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    known = [n for n, m in modules.items() if is_quantizable(m)]
    # Glob patterns ("transformer.h.*.mlp.*") expand to the quantizable layers they match, a tied
    # weight once (under its first module), as in the default selection.
    weights = {n: id(modules[n].weight) for n in known}
    first = {w: n for n, w in reversed(list(weights.items()))}
    untied = [n for n in known if first[weights[n]] == n]
    layers = [n for item in layers for n in ([item] if "*" not in item and "?" not in item and "[" not in item
                                              else match_names(untied, item, what="layer", option="layers"))]
    layers = list(dict.fromkeys(layers))
    out: dict[str, nn.Module] = {}
    for name in layers:
        if name not in modules or name == "":
            raise ValueError(f"layers: the model has no module named {name!r}; quantizable layers: {known}")
        w = getattr(modules[name], "weight", None)
        if not isinstance(w, nn.Parameter):
            raise ValueError(f"layers: module {name!r} ({type(modules[name]).__name__}) has no weight parameter")
        for other, m in out.items():
            if m.weight is w:
                raise ValueError(
                    f"layers: {other!r} and {name!r} share one weight tensor (tied weights); name only one of them"
                )
        out[name] = modules[name]
    order = {n: i for i, n in enumerate(modules)}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def iterate_batches(data: Any) -> Iterator[tuple[Any, Any]]:
    """Yield ``(inputs, targets)`` from one batch or an iterable of batches (the core's
    :class:`curvature.BatchSource` recognises them)."""
    for batch in BatchSource(data):
        yield batch.inputs, batch.targets


def check_calibration_data(data: Any, *, name: str = "data") -> None:
    """Raise ``ValueError`` if ``data`` holds no sample, ``TypeError`` if it is not batches.

    One-shot iterators are refused: calibration iterates the data several times.

    Examples:
        >>> check_calibration_data([])
        Traceback (most recent call last):
        ...
        ValueError: data is empty: the calibration data must hold at least one sample
    """
    if isinstance(data, Iterator):
        raise TypeError(f"{name} is a one-shot iterator; pass a list of batches or a re-iterable DataLoader")
    try:
        for _, targets in iterate_batches(data):
            if not isinstance(targets, Tensor) or targets.ndim == 0 or targets.shape[0] > 0:
                return
    except ValueError as e:
        if "empty" not in str(e):
            raise
    raise ValueError(f"{name} is empty: the calibration data must hold at least one sample")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block and restore each one's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def layer_macs(model: nn.Module, layers: Mapping[str, nn.Module], data: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of each layer's weight on the first batch of ``data``.

    Linear: ``in_features`` per output element; conv: ``in_channels/groups · prod(kernel)`` per
    output element; Hugging Face Conv1D: ``in`` (its weight's first axis); Embedding: 0 (a
    lookup). A weight's MACs are those of EVERY use of it: a module called several times counts
    each call, and a weight tied between modules (an embedding and a language model's output
    head) counts every module that holds it, whichever one names the layer.

    Examples:
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 5))
        >>> layer_macs(m, quantizable_layers(m), (torch.zeros(2, 1, 4, 4), torch.zeros(2)))
        {'0': 288, '2': 160}
    """
    first = next(iter(BatchSource(data)))
    inputs, n = first.inputs, max(first.num_samples, 1)
    layer_of = {id(m.weight): name for name, m in layers.items()}
    counts = {name: 0 for name in layers}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(module, nn.Embedding) or not isinstance(out, Tensor):
                return
            counts[name] += int(out.numel() // n * _macs_per_output(module))  # += : every call counts

        return record

    # Every module holding a layer's weight is hooked (tied weights: the head as well as the embedding).
    handles = [
        m.register_forward_hook(hook(layer_of[id(w)]))
        for m in model.modules()
        if isinstance(w := getattr(m, "weight", None), Tensor) and id(w) in layer_of
    ]
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return counts


class MetricNotApplicableError(ValueError):
    """The asked metric does not apply to this model and loss (accuracy of a regression)."""


#: ``metric=`` values of :func:`evaluate_model` besides a callable and ``None``.
EVALUATION_METRICS = ("auto", "accuracy")


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of a model over a data set.

    Attributes:
        loss: the loss of the whole data set as one batch: for a ``mean`` loss each batch's loss
            weighted by its normalizer (valid targets, summed class weights, samples; the core's
            :func:`curvature.batch_weight`) over the summed normalizers; for a ``sum`` loss the
            summed batch losses.
        accuracy: the fraction of predictions (arg-max over the last output dimension, one per
            target entry: per sample for a classifier, per token for a tagger or LM) equal to
            their target, targets equal to ``ignore_index`` left out (``None`` when not asked
            for or not applicable).
        metric: the sample-weighted mean of a custom ``metric(outputs, targets)`` (or ``None``).
        num_samples: samples evaluated.
        num_predictions: predictions counted by :attr:`accuracy` (``None`` without accuracy).
    """

    loss: float
    accuracy: float | None
    metric: float | None
    num_samples: int
    num_predictions: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "accuracy": self.accuracy, "metric": self.metric, "num_samples": self.num_samples,
                "num_predictions": self.num_predictions}


def _accuracy_applies(out: Any, targets: Any) -> str | None:
    """Why arg-max accuracy does not apply to ``(out, targets)``, or ``None`` when it does."""
    if not isinstance(out, Tensor) or not isinstance(targets, Tensor):
        return "outputs and targets must be tensors"
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        return f"the targets are {targets.dtype} values, not class indices (a regression?)"
    if out.ndim < 1 or tuple(out.shape[:-1]) != tuple(targets.shape):
        return (f"the outputs {tuple(out.shape)} are not class scores over the last axis of targets "
                f"{tuple(targets.shape)}")
    return None


def _ignore_index(loss_fn: Any, ignore_index: int | None) -> int:
    if ignore_index is not None:
        return int(ignore_index)
    own = getattr(loss_fn, "ignore_index", None)
    return int(own) if isinstance(own, int) else -100  # PyTorch's default for cross-entropy


def evaluate_model(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    metric: str | Callable[[Any, Tensor], Any] | None = "auto",
    ignore_index: int | None = None,
) -> Evaluation:
    """Evaluate ``model`` (in eval mode, without gradients) on ``data``.

    Batches are weighted as the core weights them (:func:`curvature.batch_weight` with the loss's
    normalizer), so the loss equals that of all batches concatenated into one, also for padded
    token batches; a fully padded batch (weight 0) contributes nothing.

    Args:
        model, loss_fn, data: as for :class:`curvature.Hessian`.
        metric: ``"auto"`` (default: accuracy where it applies: integer class targets and class
            scores over the outputs' last axis; else none), ``"accuracy"`` (the same, and
            :class:`MetricNotApplicableError` where it does not apply, e.g. a regression),
            ``None`` (loss only), or a callable ``metric(outputs, targets)`` returning a
            per-sample batch mean (averaged over samples).
        ignore_index: targets left out of the accuracy (default: the loss's ``ignore_index``,
            else PyTorch's -100).

    A loss with ``shift=True`` (:class:`curvature.TokenCrossEntropyLoss` of a causal LM) scores
    position ``t``'s outputs against target ``t + 1``, and so does the accuracy.

    Examples:
        >>> m = nn.Linear(2, 2)
        >>> ev = evaluate_model(m, nn.CrossEntropyLoss(), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
        >>> ev.num_samples, 0.0 <= ev.accuracy <= 1.0
        (4, True)
    """
    from ._batches import loss_batches

    if metric is not None and metric not in EVALUATION_METRICS and not callable(metric):
        raise ValueError(f"metric must be 'auto', 'accuracy', None or a callable, got {metric!r}")
    check_calibration_data(data)
    ignored = _ignore_index(loss_fn, ignore_index)
    total_loss, total_weight, total_metric, count = 0.0, 0.0, 0.0, 0
    hits, predictions = 0, 0
    accuracy_off: str | None = None  # why accuracy does not apply
    with torch.no_grad(), eval_mode(model), loss_batches(model, loss_fn, data) as (source, forward, reduction):
        for batch in source:
            out = forward(batch.inputs)
            targets, n = batch.targets, batch.num_samples
            if batch.weight != 0:  # a fully padded batch's mean loss is 0/0: it weighs nothing
                loss = float(loss_fn(out, targets))
                total_loss += batch.weight * loss
                total_weight += batch.weight
            if metric in EVALUATION_METRICS and accuracy_off is None:
                accuracy_off = _accuracy_applies(out, targets)
                if accuracy_off is None:
                    if getattr(loss_fn, "shift", False) is True:
                        # a causal LM loss (curvature.TokenCrossEntropyLoss(shift=True)): the
                        # scores at position t predict the target at t + 1
                        out, targets = out[..., :-1, :], targets[..., 1:]
                    valid = targets != ignored
                    hits += int(((out.argmax(dim=-1) == targets) & valid).sum())
                    predictions += int(valid.sum())
            elif callable(metric):
                total_metric += float(metric(out, targets)) * n
            count += n
    if count == 0:
        raise ValueError("data is empty: the calibration data must hold at least one sample")
    if reduction == "mean":
        if total_weight == 0:
            raise ValueError("every target of data is ignored: the mean loss has no target to average")
        loss_value = total_loss / total_weight
    else:
        loss_value = total_loss
    acc: float | None = None
    if metric == "accuracy" and accuracy_off is not None:
        raise MetricNotApplicableError(f"accuracy does not apply: {accuracy_off}; pass metric=None or a callable")
    if metric in EVALUATION_METRICS and accuracy_off is None:
        if predictions == 0:
            if metric == "accuracy":
                raise MetricNotApplicableError("accuracy: every target is ignore_index; no prediction to count")
        else:
            acc = hits / predictions
    value = total_metric / count if callable(metric) else None
    return Evaluation(loss_value, acc, value, count, predictions if acc is not None else None)
