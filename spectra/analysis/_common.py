"""Helpers shared by the analysis modules: argument checks, symmetry checks, generators."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvature import GGN, DenseOperator, EmpiricalFisher, Fisher, Hessian, LinearOperator, as_operator
from curvature.probes import make_generator

#: Curvature operators of a model: symmetric by construction.
_MODEL_OPERATORS = (Hessian, GGN, Fisher, EmpiricalFisher)

__all__: list[str] = []


def symmetric_operator(op: Any, *, name: str = "op", generator: torch.Generator | None = None) -> LinearOperator:
    """``as_operator(op)``, refusing operators that are not symmetric.

    Curvature operators of a model (Hessian, GGN, ...) are symmetric by construction and are not
    probed. A dense matrix is compared with its transpose; any other operator with two random
    probes, ``|uᵀ(Av) − vᵀ(Au)| ≤ tol · ‖Au‖‖v‖`` (two extra products).
    """
    A = as_operator(op, name=name)
    if not getattr(A, "is_symmetric", True):
        raise ValueError(f"{name} must be a symmetric operator (it declares is_symmetric=False)")
    if isinstance(A, _MODEL_OPERATORS):
        return A
    eps = torch.finfo(A.dtype).eps if A.dtype.is_floating_point else 1e-7
    tol = max(1e3 * eps, 1e-10)
    if isinstance(A, DenseOperator):
        M = A.matrix
        scale = float(M.abs().max()) or 1.0
        asym = float((M - M.T).abs().max())
        if asym > tol * scale:
            raise ValueError(
                f"{name} must be symmetric; max |A - Aᵀ| = {asym:.3g} relative to max |A| = {scale:.3g}"
            )
        return A
    g = make_generator(generator)
    d = A.shape[0]
    V = (torch.randint(0, 2, (d, 2), generator=g, dtype=torch.int8).to(A.dtype) * 2 - 1).to(A.device)
    AV = A @ V
    lhs = float(V[:, 0].double() @ AV[:, 1].double())
    rhs = float(V[:, 1].double() @ AV[:, 0].double())
    scale = float(AV.double().norm(dim=0).max()) * float(np.sqrt(d)) or 1.0
    if abs(lhs - rhs) > tol * scale:
        raise ValueError(
            f"{name} must be symmetric; uᵀ(Av) = {lhs:.6g} but vᵀ(Au) = {rhs:.6g} for random u, v"
        )
    return A


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def tolist(x: Any) -> Any:
    """JSON-friendly copy: tensors and arrays to (nested) lists, NaN kept as float."""
    if isinstance(x, Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, dict):
        return {k: tolist(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [tolist(v) for v in x]
    return x
