"""Smoke tests of the examples this package owns: --help, and a short run that writes its figure."""

from __future__ import annotations

import importlib.util

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402

from .conftest import ROOT  # noqa: E402

EXAMPLES = ROOT / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["mfac_optimizer", "spectrum_of_trained_model"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        _load(name).main(["--help"])
    assert info.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.parametrize("name, args", [
    ("mfac_optimizer", ["--steps", "20"]),
    ("spectrum_of_trained_model", ["--quick", "--probes", "2", "--steps", "20", "--top-k", "3"]),
])
def test_short_run_writes_a_figure(name, args, tmp_path, capsys):
    if name == "spectrum_of_trained_model":
        pytest.importorskip("sklearn")
    out = tmp_path / "figure.png"
    _load(name).main([*args, "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    image = mpimg.imread(out)
    assert image.shape[1] > 500 and image[..., :3].std() > 0.05
