"""Typed use of the public API, checked by mypy in tests/test_typing.py (never executed).

What a user's type checker sees through ``py.typed``: if a public signature's hints are wrong or
missing, a line below stops type-checking."""

from __future__ import annotations

import torch
from torch import nn

import estimators
import quant
import spectra
from curvature import GGN, EmpiricalFisher, Fisher, Hessian, LinearOperator, MFACInverse, as_operator, inverse
from curvature.optim import AdaHessian, Sophia


def operators(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    loss_fn = nn.CrossEntropyLoss()
    H: LinearOperator = Hessian(model, loss_fn, data)
    G: LinearOperator = GGN(model, loss_fn, data)
    F: LinearOperator = Fisher(model, loss_fn, data)
    E: LinearOperator = EmpiricalFisher(model, loss_fn, data)
    v = torch.ones(H.shape[0])
    out: torch.Tensor = H @ v + G @ v + F @ v + E @ v
    return out


def estimates(A: torch.Tensor, gen: torch.Generator) -> float:
    op = as_operator(A)
    t: estimators.TraceEstimate = estimators.trace(op, num_matvecs=10, generator=gen)
    dg: estimators.DiagonalEstimate = estimators.diagonal(op, num_matvecs=10, generator=gen)
    low, high = t.confidence_interval()
    return t.value + t.stderr + float(dg.value.sum()) + low + high


def spectrum(A: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    top: spectra.EigenResult = spectra.eigsh(A, k=2, generator=gen)
    density: spectra.SpectralDensity = spectra.slq(A, num_probes=2, num_steps=5, generator=gen)
    grid, phi = density.evaluate()
    return top.eigenvalues + grid.sum() + phi.sum()


def inverses(A: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    Ainv = inverse(A, damping=1e-3)
    Finv = MFACInverse(grads, damping=1e-4)
    x = torch.ones(A.shape[0])
    return Ainv @ x + Finv @ x


def optimizers(model: nn.Module) -> None:
    params = list(model.parameters())
    sophia: torch.optim.Optimizer = Sophia(params, lr=1e-3)
    adahessian: torch.optim.Optimizer = AdaHessian(params, lr=1e-3)
    sophia.zero_grad()
    adahessian.zero_grad()


def bit_plan(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> float:
    sens = quant.sensitivity(model, nn.CrossEntropyLoss(), data, num_matvecs=10, generator=gen)
    plan: quant.BitPlan = quant.make_plan(model, sens, 4)
    return plan.size_bytes
