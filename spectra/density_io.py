"""Reading and writing spectral densities: ``.npz`` archives of float64 arrays and a JSON header
(no pickle), written atomically. :meth:`spectra.SpectralDensity.save`/``load`` delegate here.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "save_density", "load_density_fields"]

FORMAT = "spectra.SpectralDensity/1"


def save_density(density: Any, path: str | os.PathLike) -> None:
    """Write a density's ``nodes``, ``weights``, ``probe_norms_sq``, ``dim``, ``num_matvecs`` and
    ``metadata`` to ``path``; the file is written to a temporary name and renamed, so a crash
    never leaves a torn file."""
    arrays = {
        "nodes": density.nodes.numpy(),
        "weights": density.weights.numpy(),
        "probe_norms_sq": density.probe_norms_sq.numpy(),
        "header": np.array(
            json.dumps(
                {
                    "format": FORMAT,
                    "dim": density.dim,
                    "num_matvecs": density.num_matvecs,
                    "metadata": density.metadata,
                }
            )
        ),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, path)


def load_density_fields(path: str | os.PathLike) -> tuple:
    """The positional fields ``(nodes, weights, dim, probe_norms_sq, num_matvecs, metadata)`` of a
    density written by :func:`save_density`."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
        if header.get("format") != FORMAT:
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved SpectralDensity "
                f"(format {header.get('format')!r})"
            )
        return (
            torch.from_numpy(data["nodes"].copy()),
            torch.from_numpy(data["weights"].copy()),
            int(header["dim"]),
            torch.from_numpy(data["probe_norms_sq"].copy()),
            int(header["num_matvecs"]),
            header["metadata"],
        )
