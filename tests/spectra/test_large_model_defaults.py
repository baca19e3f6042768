"""Defaults that must not run out of memory at GPT-2-small scale (d = 124M): the SLQ basis and
the eigensolver's basis shrink to a budget instead of growing with num_steps x d."""

import importlib
import logging

import torch

import curvature
import spectra

# The module (spectra.eigsh is also the name of the function).
eigsh_module = importlib.import_module("spectra.eigsh")


def test_slq_auto_drops_reorthogonalization_above_the_limit(monkeypatch, caplog):
    A = torch.diag(torch.linspace(0, 1, 60, dtype=torch.float64))
    full = spectra.slq(A, num_probes=2, num_steps=10, generator=torch.Generator().manual_seed(0))
    same = spectra.slq(A, num_probes=2, num_steps=10, reorthogonalize="full",
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(full.nodes, same.nodes)
    monkeypatch.setattr(curvature, "BASIS_BUDGET", 10 * 60 * 8 - 1)
    with caplog.at_level(logging.WARNING, logger="spectra.slq"):
        auto = spectra.slq(A, num_probes=2, num_steps=10, generator=torch.Generator().manual_seed(0))
    none = spectra.slq(A, num_probes=2, num_steps=10, reorthogonalize="none",
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(auto.nodes, none.nodes) and "without reorthogonalization" in caplog.text


def test_eigsh_default_basis_fits_the_budget(monkeypatch):
    # GPT-2 small in float32: 7 vectors (+1) of 498 MB fit 4 GiB, not the usual 25.
    assert eigsh_module.default_num_lanczos_vectors(5, 124_439_808, 4) == 7
    assert eigsh_module.default_num_lanczos_vectors(5, 1000) == 25
    monkeypatch.setattr(curvature, "BASIS_BUDGET", 9 * 200 * 8)
    A = torch.diag(torch.arange(1.0, 201.0, dtype=torch.float64))
    res = spectra.eigsh(A, k=3, generator=torch.Generator().manual_seed(0))
    assert res.all_converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([200.0, 199.0, 198.0], dtype=torch.float64),
                               rtol=0, atol=1e-4)
