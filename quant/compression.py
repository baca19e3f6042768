"""Joint compression plans: a pruning mask and bit-widths in one plan, applied and predicted together.

A :class:`CompressionPlan` zeroes the masked weights and fake-quantizes the kept ones
(``W ← mask ⊙ Q_b(mask ⊙ W)``). Its loss change is predicted with the second-order model of
:class:`quant.LossChangePredictor`, ``gᵀΔw + ½ ΔwᵀHΔw`` with every cross-layer term, for the
WHOLE perturbation from the dense model: the pruning step with its OBS correction plus the
quantization noise (:func:`predict_compression`).

Workflow: ``pruned = copy.deepcopy(dense)``; ``result = quant.prune(pruned, ...)`` (OBS-corrected
weights); ``plan = CompressionPlan(bits, result.mask)``; ``compressed = plan.apply(pruned)``;
``predict_compression(dense, compressed, loss_fn, data)``. Applied to the dense model instead, the
plan masks without the OBS correction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence, cast

import torch
from torch import Tensor, nn

from .interlayer import LossChangePrediction, LossChangePredictor
from .layers import quantizable_layers
from .masks import MaskFileError, PruneMask
from .plan import with_weights
from .quantizers import check_bits, quantize_weight

__all__ = ["COMPRESSION_SCHEMA_VERSION", "CompressionPlan", "predict_compression"]

#: Version of the JSON layout written by :meth:`CompressionPlan.to_json`.
COMPRESSION_SCHEMA_VERSION = 1
_KIND = "quant.CompressionPlan"


@dataclass(frozen=True)
class CompressionPlan:
    """Sparsity and bit-widths in one plan.

    Attributes:
        bits: ``{layer: weight bits}`` for the quantized layers (read-only mapping; may be empty).
        mask: the pruning mask (``None``: no pruning).
        symmetric, per_channel: the weight quantizer (:func:`quant.quantize_weight`).
        method: how the plan was made.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]]))
        >>> mask = PruneMask({"0": torch.tensor([[True, False, True, False], [False, True, True, False]])})
        >>> plan = CompressionPlan({"0": 4}, mask)
        >>> compressed = plan.apply(model)
        >>> int((compressed[0].weight == 0).sum()), plan.size_bytes(model)  # 4 x 4 bits + 8-bit map + 2 biases
        (4, 11.0)
    """

    bits: Mapping[str, int]
    mask: PruneMask | None = None
    symmetric: bool = True
    per_channel: bool = True
    method: str = "manual"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, Mapping):
            raise TypeError(f"bits must be a mapping from layer name to bit-width, got {type(self.bits).__name__}")
        bits = {}
        for name, b in self.bits.items():
            if not isinstance(name, str):
                raise TypeError(f"bits: layer names must be strings, got {type(name).__name__}")
            bits[name] = check_bits(b, name=f"bits[{name!r}]")
        if not bits and self.mask is None:
            raise ValueError("a compression plan needs bits or a mask")
        if self.mask is not None and not isinstance(self.mask, PruneMask):
            raise TypeError(f"mask must be a quant.PruneMask, got {type(self.mask).__name__}")
        object.__setattr__(self, "bits", MappingProxyType(bits))

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer the plan changes (quantized or masked)."""
        masked = list(self.mask.masks) if self.mask is not None else []
        return tuple(dict.fromkeys([*self.bits, *masked]))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CompressionPlan) and dict(self.bits) == dict(other.bits)
                and self.mask == other.mask and (self.symmetric, self.per_channel, self.method)
                == (other.symmetric, other.per_channel, other.method))

    def __hash__(self) -> int:
        return hash((tuple(self.bits.items()), self.mask, self.method))

    # -- use ----------------------------------------------------------------------------------
    def compressed_weights(self, model: nn.Module) -> dict[str, Tensor]:
        """``{layer: mask ⊙ Q_b(mask ⊙ W)}`` (the model is not modified)."""
        layers = quantizable_layers(model, list(self.layers))
        out = {}
        for name, module in layers.items():
            w = cast(Tensor, module.weight).detach()
            keep = None
            if self.mask is not None and name in self.mask.masks:
                keep = self.mask.masks[name].to(device=w.device)
                if keep.shape != w.shape:
                    raise ValueError(
                        f"mask of layer {name!r} has shape {tuple(keep.shape)}, the weight {tuple(w.shape)}"
                    )
                w = w * keep
            if name in self.bits:
                w = quantize_weight(w, self.bits[name], symmetric=self.symmetric, per_channel=self.per_channel)
                if keep is not None:  # an asymmetric grid need not hold 0 exactly: keep the pattern
                    w = w * keep
            out[name] = w.clone()
        return out

    def apply(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with the plan's weights (pruned, then fake-quantized)."""
        return with_weights(model, self.compressed_weights(model))

    def size_bytes(self, model: nn.Module) -> float:
        """Storage: kept weights at their bits (dtype bits if unquantized), one bit per weight of a
        masked layer for the sparsity map, and every other parameter at its dtype."""
        layers = quantizable_layers(model, list(self.layers))
        planned = {id(m.weight): name for name, m in layers.items()}
        total_bits = 0.0
        seen = set()
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = planned.get(id(p))
            width = p.element_size() * 8
            if name is None:
                total_bits += p.numel() * width
                continue
            bits = self.bits.get(name, width)
            if self.mask is not None and name in self.mask.masks:
                kept = int(self.mask.masks[name].sum())
                total_bits += kept * bits + p.numel()
            else:
                total_bits += p.numel() * bits
        return total_bits / 8

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON; the mask goes to ``<path>.mask.pt`` beside it (named in the JSON).

        Schema version 1: ``{"schema_version": 1, "kind": "quant.CompressionPlan", "bits": {layer:
        int}, "quantizer": {"symmetric", "per_channel"}, "method", "mask_file": name or null,
        "layer_sparsity": {layer: fraction} (informative)}``.
        """
        path = Path(path)
        mask_file = None
        if self.mask is not None:
            mask_file = path.name + ".mask.pt"
            self.mask.save(path.parent / mask_file)
        payload = {
            "schema_version": COMPRESSION_SCHEMA_VERSION,
            "kind": _KIND,
            "bits": dict(self.bits),
            "quantizer": {"symmetric": self.symmetric, "per_channel": self.per_channel},
            "method": self.method,
            "mask_file": mask_file,
            "layer_sparsity": dict(self.mask.layer_sparsity) if self.mask is not None else {},
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CompressionPlan:
        """Read a plan written by :meth:`to_json` (and its mask file), validated.

        Raises:
            MaskFileError: a malformed plan or mask file.
        """
        path = Path(path)
        try:
            with open(path) as f:
                payload = json.load(f)
        except json.JSONDecodeError as exc:
            raise MaskFileError(f"{os.fspath(path)!r} is not JSON: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("kind") != _KIND:
            raise MaskFileError(f"{os.fspath(path)!r} is not a compression plan")
        if payload.get("schema_version") != COMPRESSION_SCHEMA_VERSION:
            raise MaskFileError(
                f"unsupported compression-plan schema_version {payload.get('schema_version')!r}; "
                f"this reader knows {COMPRESSION_SCHEMA_VERSION}"
            )
        mask_file = payload.get("mask_file")
        if mask_file is not None and (not isinstance(mask_file, str) or Path(mask_file).name != mask_file):
            raise MaskFileError(f"mask_file must be a file name beside the plan, got {mask_file!r}")
        mask = PruneMask.load(path.parent / mask_file) if mask_file else None
        quantizer = payload.get("quantizer", {})
        try:
            return cls(bits=payload.get("bits", {}), mask=mask, symmetric=bool(quantizer.get("symmetric", True)),
                       per_channel=bool(quantizer.get("per_channel", True)),
                       method=str(payload.get("method", "manual")))
        except (TypeError, ValueError) as exc:
            raise MaskFileError(f"{os.fspath(path)!r}: {exc}") from exc


def predict_compression(
    dense: nn.Module,
    compressed: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    layers: Sequence[str] | None = None,
    interactions: bool = True,
    hessian_options: Mapping[str, Any] | None = None,
) -> LossChangePrediction:
    """Second-order loss change ``gᵀΔw + ½ΔwᵀHΔw`` of going from ``dense`` to ``compressed``.

    ``Δw`` is the difference of the two models' layer weights (the pruning step with its OBS
    correction plus the quantization noise), ``g`` and ``H`` those of ``dense`` on ``data``
    (:class:`quant.LossChangePredictor`); with ``interactions`` the per-layer matrix
    ``ΔW_iᵀ H_ij ΔW_j`` gives the cross-layer part. The other parameters must be equal.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> dense = nn.Sequential(nn.Linear(3, 2)).double()
        >>> data = (torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g,
        ...         dtype=torch.float64))
        >>> compressed = CompressionPlan({"0": 4}).apply(dense)
        >>> pred = predict_compression(dense, compressed, nn.MSELoss(), data)
        >>> with torch.no_grad():
        ...     measured = float(nn.MSELoss()(compressed(data[0]), data[1]) - nn.MSELoss()(dense(data[0]), data[1]))
        >>> abs(pred.total - measured) < 1e-12  # a linear model's MSE is quadratic: the prediction is exact
        True
    """
    names = list(quantizable_layers(dense, layers))
    other = dict(compressed.named_modules())
    dense_params = dict(dense.named_parameters())
    planned = {f"{n}.weight" if n else "weight" for n in names}
    for pname, p in compressed.named_parameters():
        if pname not in planned and pname in dense_params and not torch.equal(p.detach(), dense_params[pname].detach()):
            raise ValueError(f"parameter {pname!r} differs between the models but is not in the predicted layers")
    with LossChangePredictor(dense, loss_fn, data, layers=names, hessian_options=hessian_options) as predictor:
        H = predictor.hessian
        by_weight = {id(m.weight): n for n, m in predictor.layers.items()}
        parts = []
        for weight in H.params:
            name = by_weight[id(weight)]
            new = cast(Tensor, other[name].weight).detach().to(torch.float64)
            parts.append(new - weight.detach().to(torch.float64))
        delta = H.flatten(parts)
        linear = float(predictor.gradient @ delta)
        order = tuple(by_weight[id(weight)] for weight in H.params)
        if not interactions:
            quad = 0.5 * float(delta @ (H @ delta.to(H.dtype)).to(torch.float64))
            return LossChangePrediction(linear, quad, linear + quad, None, order, 1)
        D = torch.zeros(H.shape[0], len(H.blocks), dtype=torch.float64, device=delta.device)
        for j, b in enumerate(H.blocks):
            D[b.slice, j] = delta[b.slice]
        HD = (H @ D.to(H.dtype)).to(torch.float64)
        M = torch.stack([D[b.slice, i] @ HD[b.slice] for i, b in enumerate(H.blocks)])
        M = 0.5 * (M + M.T)
        quad = 0.5 * float(M.sum())
        return LossChangePrediction(linear, quad, linear + quad, M, order, len(H.blocks))
