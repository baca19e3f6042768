"""Which layers are quantized, checks on calibration data, per-layer MACs and model evaluation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from curvature import call_model, match_names

logger = logging.getLogger(__name__)

__all__ = [
    "QUANTIZABLE_TYPES",
    "quantizable_layers",
    "check_calibration_data",
    "iterate_batches",
    "layer_macs",
    "Evaluation",
    "evaluate_model",
    "eval_mode",
]

#: Module types quantized by default: their ``weight`` is the quantized tensor.
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def quantizable_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The layers whose weights are quantized, by module name, in model order.

    Args:
        model: the network.
        layers: module names to use; default every Linear, Conv1d/2d/3d and Embedding module.
            A named module must exist and have a ``weight`` parameter.

    Example:
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
            if not isinstance(m, QUANTIZABLE_TYPES):
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
    known = [n for n, m in modules.items() if isinstance(m, QUANTIZABLE_TYPES)]
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


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and (isinstance(data[0], (Tensor, Mapping)) or (
            isinstance(data[0], (tuple, list)) and len(data[0]) > 0 and all(isinstance(t, Tensor) for t in data[0])
        ))
    )


def iterate_batches(data: Any) -> Iterator[tuple[Any, Tensor]]:
    """Yield ``(inputs, targets)`` from one batch or an iterable of batches."""
    if _is_single_batch(data):
        yield data[0], data[1]
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an (inputs, targets) batch or an iterable of batches, got {type(data).__name__}")
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
        yield batch[0], batch[1]


def check_calibration_data(data: Any, *, name: str = "data") -> None:
    """Raise ``ValueError`` if ``data`` holds no sample, ``TypeError`` if it is not batches.

    One-shot iterators are refused: calibration iterates the data several times.

    Example:
        >>> check_calibration_data([])
        Traceback (most recent call last):
        ...
        ValueError: data is empty: the calibration data must hold at least one sample
    """
    if isinstance(data, Iterator):
        raise TypeError(f"{name} is a one-shot iterator; pass a list of batches or a re-iterable DataLoader")
    for _, targets in iterate_batches(data):
        if not isinstance(targets, Tensor) or targets.ndim == 0 or targets.shape[0] > 0:
            return
    raise ValueError(f"{name} is empty: the calibration data must hold at least one sample")


def _num_samples(inputs: Any, targets: Tensor) -> int:
    if isinstance(targets, Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    return 1


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
    """Multiply-accumulates per sample of each layer on the first batch of ``data``.

    Linear: ``in_features`` per output element; conv: ``in_channels/groups · prod(kernel)`` per
    output element; Embedding: 0 (a lookup).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 5))
        >>> layer_macs(m, quantizable_layers(m), (torch.zeros(2, 1, 4, 4), torch.zeros(2)))
        {'0': 288, '2': 160}
    """
    inputs, targets = next(iterate_batches(data))
    n = _num_samples(inputs, targets)
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module) -> Callable[..., None]:
        def record(_m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(module, nn.Embedding) or not isinstance(out, Tensor):
                counts[name] = 0
                return
            per_output = module.weight[0].numel()  # in_features, or in_channels/groups * kernel
            counts[name] = int(out.numel() // max(n, 1) * per_output)

        return record

    handles = [m.register_forward_hook(hook(name, m)) for name, m in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: counts.get(name, 0) for name in layers}


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of a model over a data set.

    Attributes:
        loss: the mean loss per sample (for ``reduction="mean"`` losses; the summed loss for
            ``reduction="sum"``).
        accuracy: fraction of samples whose arg-max output equals the target (``None`` if not
            asked for).
        metric: the sample-weighted mean of a custom ``metric(outputs, targets)`` (or ``None``).
        num_samples: samples evaluated.
    """

    loss: float
    accuracy: float | None
    metric: float | None
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "accuracy": self.accuracy, "metric": self.metric, "num_samples": self.num_samples}


def evaluate_model(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    metric: str | Callable[[Any, Tensor], Any] | None = "accuracy",
) -> Evaluation:
    """Evaluate ``model`` (in eval mode, without gradients) on ``data``.

    Args:
        model, loss_fn, data: as for :class:`curvature.Hessian`.
        metric: ``"accuracy"`` (arg-max over the last output dimension), ``None`` (loss only),
            or a callable ``metric(outputs, targets)`` returning a batch mean.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> ev = evaluate_model(m, nn.CrossEntropyLoss(), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
        >>> ev.num_samples, 0.0 <= ev.accuracy <= 1.0
        (4, True)
    """
    if metric is not None and metric != "accuracy" and not callable(metric):
        raise ValueError(f"metric must be 'accuracy', None or a callable, got {metric!r}")
    check_calibration_data(data)
    reduction = getattr(loss_fn, "reduction", "mean")
    total_loss, total_metric, correct, count = 0.0, 0.0, 0, 0
    with torch.no_grad(), eval_mode(model):
        for inputs, targets in iterate_batches(data):
            out = call_model(model, inputs)
            n = _num_samples(inputs, targets)
            loss = float(loss_fn(out, targets))
            total_loss += loss * n if reduction == "mean" else loss
            if metric == "accuracy":
                correct += int((out.argmax(dim=-1) == targets).sum())
            elif callable(metric):
                total_metric += float(metric(out, targets)) * n
            count += n
    if count == 0:
        raise ValueError("data is empty: the calibration data must hold at least one sample")
    loss = total_loss / count if reduction == "mean" else total_loss
    acc = correct / count if metric == "accuracy" else None
    value = total_metric / count if callable(metric) else None
    return Evaluation(loss, acc, value, count)

