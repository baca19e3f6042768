"""Pruning masks: which weights of which layers are kept, saved and applied like a bit plan.

A :class:`PruneMask` maps layer names (as in :func:`quant.quantizable_layers`) to boolean tensors
of the weight's shape, ``True`` where the weight is kept. It is applied in place (the pruned
weights set to zero), kept through fine-tuning by :func:`keep_pruned` (re-applied after every
optimizer step), and stored with :meth:`PruneMask.save` as one ``torch.save`` file that
:meth:`PruneMask.load` reads with ``weights_only=True`` and validates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import quantizable_layers

__all__ = ["MASK_SCHEMA_VERSION", "MaskFileError", "MaskMismatchError", "PruneMask", "keep_pruned"]

#: Version of the file layout written by :meth:`PruneMask.save`.
MASK_SCHEMA_VERSION = 1
_KIND = "quant.PruneMask"


class MaskFileError(ValueError):
    """A mask file that is not a valid :class:`PruneMask` (wrong kind, version, names or tensors)."""


class MaskMismatchError(ValueError):
    """A mask that does not fit a model (a missing layer or a different weight shape)."""


@dataclass(frozen=True)
class PruneMask:
    """Boolean keep-masks per layer weight (``True``: kept, ``False``: pruned to zero).

    Attributes:
        masks: ``{layer name: bool tensor of the weight's shape}`` (read-only mapping; the
            tensors are private CPU copies).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> mask = PruneMask({"0": torch.tensor([[True, False, True, False]] * 2)})
        >>> mask.sparsity, dict(mask.layer_sparsity)
        (0.5, {'0': 0.5})
        >>> _ = mask.apply(model)
        >>> int((model[0].weight == 0).sum())
        4
    """

    masks: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.masks, Mapping) or not self.masks:
            raise ValueError("masks must be a non-empty mapping from layer name to a boolean tensor")
        clean = {}
        for name, m in self.masks.items():
            if not isinstance(name, str):
                raise TypeError(f"masks: layer names must be strings, got {type(name).__name__}")
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                got = getattr(m, "dtype", type(m).__name__)
                raise TypeError(f"masks[{name!r}] must be a boolean tensor, got {got}")
            clean[name] = m.detach().to("cpu").clone()
        object.__setattr__(self, "masks", MappingProxyType(clean))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PruneMask) or list(self.masks) != list(other.masks):
            return False
        return all(torch.equal(a, other.masks[k]) for k, a in self.masks.items())

    def __hash__(self) -> int:
        return hash(tuple((k, int(m.sum())) for k, m in self.masks.items()))

    # -- views ------------------------------------------------------------------------------------
    @property
    def num_weights(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def num_pruned(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the masked weights that are pruned."""
        return self.num_pruned / max(self.num_weights, 1)

    @property
    def layer_sparsity(self) -> Mapping[str, float]:
        """``{layer: fraction pruned}``."""
        return MappingProxyType({k: float((~m).sum()) / max(m.numel(), 1) for k, m in self.masks.items()})

    def __str__(self) -> str:
        layers = ", ".join(f"{k}:{v:.0%}" for k, v in self.layer_sparsity.items())
        return f"PruneMask({self.sparsity:.1%} pruned; {layers})"

    # -- use ----------------------------------------------------------------------------------
    def _weights(self, model: nn.Module) -> dict[str, Tensor]:
        try:
            layers = quantizable_layers(model, list(self.masks))
        except ValueError as exc:
            raise MaskMismatchError(str(exc)) from exc
        out = {}
        for name, module in layers.items():
            w = cast(Tensor, module.weight)
            if tuple(w.shape) != tuple(self.masks[name].shape):
                raise MaskMismatchError(
                    f"mask of layer {name!r} has shape {tuple(self.masks[name].shape)}, the weight {tuple(w.shape)}"
                )
            out[name] = w
        return out

    def apply(self, model: nn.Module) -> nn.Module:
        """Set the pruned weights of ``model`` to zero, in place, and return ``model``.

        Raises:
            MaskMismatchError: if a layer is missing or its weight has another shape.
        """
        with torch.no_grad():
            for name, w in self._weights(model).items():
                w.mul_(self.masks[name].to(device=w.device, dtype=w.dtype))
        return model

    def check(self, model: nn.Module) -> None:
        """Raise :class:`MaskMismatchError` unless every pruned weight of ``model`` is zero."""
        for name, w in self._weights(model).items():
            kept = self.masks[name].to(w.device)
            if bool((w.detach()[~kept] != 0).any()):
                raise MaskMismatchError(f"layer {name!r} has nonzero weights where the mask prunes them")

    # -- serialisation ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """The saved object: ``{"kind", "schema_version", "masks": {layer: bool tensor}}``."""
        return {"kind": _KIND, "schema_version": MASK_SCHEMA_VERSION, "masks": dict(self.masks)}

    @classmethod
    def from_state(cls, state: Any) -> PruneMask:
        """Rebuild a mask from :meth:`to_state`'s output; :class:`MaskFileError` if malformed."""
        if not isinstance(state, Mapping):
            raise MaskFileError(f"a prune mask must be a dict, got {type(state).__name__}")
        if state.get("kind") != _KIND:
            raise MaskFileError(f"not a prune mask (kind {state.get('kind')!r}, expected {_KIND!r})")
        if state.get("schema_version") != MASK_SCHEMA_VERSION:
            raise MaskFileError(
                f"unsupported prune-mask schema_version {state.get('schema_version')!r}; "
                f"this reader knows {MASK_SCHEMA_VERSION}"
            )
        masks = state.get("masks")
        if not isinstance(masks, Mapping) or not masks:
            raise MaskFileError("a prune mask needs a non-empty 'masks' dict")
        for name, m in masks.items():
            if not isinstance(name, str):
                raise MaskFileError(f"mask layer names must be strings, got {type(name).__name__}")
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise MaskFileError(f"mask of layer {name!r} must be a boolean tensor")
        return cls(dict(masks))

    def save(self, path: str | os.PathLike) -> None:
        """Write the mask to ``path`` (one ``torch.save`` file; no pickled code)."""
        torch.save(self.to_state(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruneMask:
        """Read a mask written by :meth:`save` (``weights_only=True``), validated.

        Raises:
            MaskFileError: a file that torch cannot read safely, or not a valid mask.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # torch raises several types for corrupt or unsafe files
            raise MaskFileError(f"{os.fspath(path)!r} is not a readable prune-mask file: {exc}") from exc
        return cls.from_state(state)


def keep_pruned(model: nn.Module, mask: PruneMask, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Keep ``model`` pruned through training: re-apply ``mask`` after every ``optimizer.step()``.

    The mask is applied once now. Returns the hook's handle (``handle.remove()`` to stop).

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> mask = PruneMask({"0": torch.tensor([[True, False]])})
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = keep_pruned(model, mask, opt)
        >>> model(torch.ones(3, 2)).sum().backward(); opt.step()
        >>> float(model[0].weight[0, 1].detach())
        0.0
    """
    mask.apply(model)

    def reapply(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
        mask.apply(model)

    return optimizer.register_step_post_hook(reapply)
