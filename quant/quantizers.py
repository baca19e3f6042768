"""Uniform fake quantizers for weights and activations, and conv + BatchNorm folding.

Rounding is round-half-to-even (``torch.round``), as in the HAWQ-V3 reference quantizers
(Yao et al. 2021).  Symmetric codes use the asymmetric clamp range ``[-2^(b-1), 2^(b-1) - 1]``
with scale ``S = max(alpha, 1e-8) / (2^(b-1) - 1)``; asymmetric (zero-point) codes use
``[0, 2^b - 1]`` with ``S = max(max - min, 1e-8) / (2^b - 1)`` and ``z = round(-min / S)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "QuantizedTensor",
    "check_bits",
    "quantize",
    "quantize_weight",
    "perturbation_norm_sq",
    "ActivationQuantizer",
    "fold_batchnorm",
]

#: Smallest range a scale is computed from (all-zero channels would otherwise divide by zero).
MIN_RANGE = 1e-8


def check_bits(bits: object, *, name: str = "bits") -> int:
    """Validate a bit-width: an integer in ``1..32``.

    Examples:
        >>> check_bits(4)
        4
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an integer in 1..32, got {type(bits).__name__} {bits!r}")
    if not 1 <= bits <= 32:
        raise ValueError(f"{name} must be in 1..32, got {bits}")
    return bits


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer codes with their scale and zero point: ``dequantize() = scale * (codes - zero_point)``.

    Attributes:
        codes: integer codes (stored as float64 so that 32-bit codes are exact).
        scale: per-tensor (shape ``()``) or per-channel scale, broadcastable to ``codes``.
        zero_point: same shape as ``scale`` (zeros for symmetric quantizers).
        bits: the bit-width.
        symmetric: whether the symmetric quantizer was used.
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    bits: int
    symmetric: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The fake-quantized values ``scale * (codes - zero_point)`` in ``dtype``."""
        return (self.scale * (self.codes - self.zero_point)).to(dtype)


def _ranges(w: Tensor, per_channel: bool, channel_axis: int, percentile: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(min, max) per channel (shapes broadcastable to ``w``) and the reshaped float64 view."""
    x = w.detach().to(torch.float64)
    if per_channel and x.ndim > 0:
        axis = channel_axis % x.ndim
        moved = x.movedim(axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
    else:
        axis = None
        flat = x.reshape(1, -1)
    if percentile is None:
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        lo = torch.quantile(flat, 1.0 - percentile / 100.0, dim=1)
        hi = torch.quantile(flat, percentile / 100.0, dim=1)
    if axis is None:
        return lo.reshape(()), hi.reshape(()), x
    shape = [1] * x.ndim
    shape[axis] = -1
    return lo.reshape(shape), hi.reshape(shape), x


def quantize(
    w: Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    channel_axis: int = 0,
    percentile: float | None = None,
) -> QuantizedTensor:
    """Uniform quantization of ``w`` to ``bits`` bits: integer codes, scale and zero point.

    Args:
        w: the tensor (a weight: output channels along ``channel_axis``).
        bits: bit-width in ``1..32``. With ``bits=1`` the symmetric codes are ``{-1, 0}`` with
            ``S = alpha`` (the formula's ``2^(b-1) - 1`` is zero there).
        symmetric: symmetric codes around zero (default) or asymmetric codes with a zero point.
        per_channel: one scale per slice along ``channel_axis`` (default) or one for the tensor.
        channel_axis: the output-channel axis.
        percentile: clip the range to this percentile (e.g. ``99.9``) instead of min/max.

    Examples:
        >>> w = torch.tensor([[-1.0, 0.5, 0.25], [2.0, -0.1, 0.0]])
        >>> q = quantize(w, 4)
        >>> q.codes.tolist(), (q.scale.flatten() * 7).tolist()
        ([[-7.0, 4.0, 2.0], [7.0, 0.0, 0.0]], [1.0, 2.0])
    """
    bits = check_bits(bits)
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.numel() == 0:
        raise ValueError("w must not be empty")
    lo, hi, x = _ranges(w, per_channel, channel_axis, percentile)
    if symmetric:
        alpha = torch.maximum(lo.abs(), hi.abs()).clamp_min(MIN_RANGE)
        levels = max(2 ** (bits - 1) - 1, 1)
        scale = alpha / levels
        zero = torch.zeros_like(scale)
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        codes = torch.clamp(torch.round(x / scale), qmin, qmax) + 0.0  # no negative zeros
    else:
        scale = (hi - lo).clamp_min(MIN_RANGE) / (2**bits - 1)
        zero = torch.round(-lo / scale)
        codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return QuantizedTensor(codes, scale, zero, bits, symmetric)


def quantize_weight(
    w: Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    channel_axis: int = 0,
    percentile: float | None = None,
) -> Tensor:
    """Fake-quantize ``w``: ``Q_b(w) = S * (q - z)`` in ``w``'s dtype (see :func:`quantize`).

    Examples:
        >>> quantize_weight(torch.tensor([0.0, 0.3, 1.0]), 2, symmetric=False, per_channel=False).tolist()
        [0.0, 0.3333..., 1.0]
    """
    q = quantize(w, bits, symmetric=symmetric, per_channel=per_channel, channel_axis=channel_axis,
                 percentile=percentile)
    return q.dequantize(w.dtype)


def perturbation_norm_sq(w: Tensor, bits: int, **options: object) -> float:
    """``||Q_b(w) - w||²`` (a plain sum, not a mean), computed in float64.

    ``options`` are those of :func:`quantize`.

    Examples:
        >>> w = torch.tensor([[-1.0, 0.5, 0.25], [2.0, -0.1, 0.0]], dtype=torch.float64)
        >>> abs(perturbation_norm_sq(w, 4) - ((4/7 - 0.5)**2 + (2/7 - 0.25)**2 + 0.1**2)) < 1e-15
        True
    """
    q = quantize(w, bits, **options)  # type: ignore[arg-type]
    return float(((q.dequantize(torch.float64) - w.detach().to(torch.float64)) ** 2).sum())


class ActivationQuantizer(nn.Module):
    """Fake quantizer for activations with a static range calibrated by an EMA of batch min/max.

    While ``calibrating`` is true, each forward updates the range (the first batch initialises it,
    later ones move it by ``1 - momentum``) and returns its input unchanged; afterwards it
    quantizes. ``unsigned=True`` (after a ReLU) uses codes ``[0, 2^b - 1]`` with
    ``S = x_max / (2^b - 1)``; otherwise symmetric per-tensor codes with
    ``S = max(|x_min|, |x_max|) / (2^(b-1) - 1)``, as in the HAWQ-V3 reference.

    Examples:
        >>> aq = ActivationQuantizer(2, unsigned=True)
        >>> _ = aq(torch.tensor([0.0, 3.0]))          # calibrate: range [0, 3]
        >>> aq.calibrating = False
        >>> aq(torch.tensor([0.4, 1.6, 5.0])).tolist()
        [0.0, 2.0, 3.0]
    """

    def __init__(self, bits: int, *, unsigned: bool = False, momentum: float = 0.95):
        super().__init__()
        self.bits = check_bits(bits)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.unsigned = unsigned
        self.momentum = momentum
        self.calibrating = True
        self.register_buffer("x_min", torch.tensor(float("nan")))
        self.register_buffer("x_max", torch.tensor(float("nan")))

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            lo, hi = x.detach().min().to(self.x_min), x.detach().max().to(self.x_max)
            if torch.isnan(self.x_min):
                self.x_min.copy_(lo)
                self.x_max.copy_(hi)
            else:
                self.x_min.mul_(self.momentum).add_(lo, alpha=1 - self.momentum)
                self.x_max.mul_(self.momentum).add_(hi, alpha=1 - self.momentum)
            return x
        if torch.isnan(self.x_min):
            raise RuntimeError("ActivationQuantizer has no range: run calibration batches first")
        b = self.bits
        if self.unsigned:
            scale = self.x_max.clamp_min(MIN_RANGE) / (2**b - 1)
            return torch.clamp(torch.round(x / scale), 0, 2**b - 1) * scale
        alpha = torch.maximum(self.x_min.abs(), self.x_max.abs()).clamp_min(MIN_RANGE)
        scale = alpha / max(2 ** (b - 1) - 1, 1)
        return torch.clamp(torch.round(x / scale), -(2 ** (b - 1)), 2 ** (b - 1) - 1) * scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, unsigned={self.unsigned}, momentum={self.momentum}"


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every conv directly followed by a BatchNorm (inside an
    ``nn.Sequential``) folded into the conv, the BatchNorm replaced by ``nn.Identity``.

    ``W_fold = W · γ/√(σ² + ε)`` per output channel and ``b_fold = (b − μ)·γ/√(σ² + ε) + β``;
    the folded model equals the original in eval mode. Quantize the folded weights (HAWQ-V3
    does), so sensitivities and plans should be computed on the folded model. Pairs that are
    not adjacent children of a Sequential are left alone. The original is not modified.

    Examples:
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
        >>> folded = fold_batchnorm(m)
        >>> type(folded[1]).__name__
        'Identity'
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if not (isinstance(conv, _CONVS) and isinstance(bn, _BNS) and bn.track_running_stats):
                continue
            with torch.no_grad():
                std = torch.sqrt(bn.running_var + bn.eps)
                gamma = bn.weight if bn.affine else torch.ones_like(std)
                beta = bn.bias if bn.affine else torch.zeros_like(std)
                factor = gamma / std
                conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.ndim - 1))))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
                new_bias = (bias - bn.running_mean) * factor + beta
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
                else:
                    conv.bias.copy_(new_bias)
            module._modules[second] = nn.Identity()
    return model
