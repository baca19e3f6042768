"""The dependency rules of the architecture, read from the imports of every library module.

curvature (core) <- estimators <- spectra <- quant; ``curvature.optim`` and ``curvature.app`` are
consumers of everything; the core imports no consumer, ``curvature/__init__`` does not import the
application, and no package reaches into another package's private (``_name``) modules or names.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("curvature", "estimators", "spectra", "quant")

#: Which packages each layer must not import.
FORBIDDEN = {
    "curvature": ("estimators", "spectra", "quant", "curvature.app", "curvature.optim"),
    "estimators": ("spectra", "quant", "curvature.app", "curvature.optim"),
    "spectra": ("quant", "curvature.app", "curvature.optim"),
    "quant": ("curvature.app", "curvature.optim"),
    "curvature.optim": ("curvature.app",),
    "curvature.app": (),
}

#: The modules another package may import from each package: its root and the utility modules it
#: documents as public. Everything else is that package's internals, even without an underscore.
PUBLIC_MODULES = {
    "curvature": ("curvature", "curvature.checks", "curvature.probes"),
    "curvature.optim": ("curvature.optim",),
    "curvature.app": ("curvature.app",),
    "estimators": ("estimators",),
    "spectra": ("spectra", "spectra.analysis"),
    "quant": ("quant",),
}

#: Core-level files that are consumers in fact: the ``python -m curvature`` entry point and the
#: deprecated shims that forward to the application package for one release.
CONSUMER_FILES = {"curvature/__main__.py"}  # `python -m curvature` starts the application


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, rel_path: str) -> str | None:
    if rel_path in CONSUMER_FILES:
        return "curvature.app"
    for layer in ("curvature.app", "curvature.optim"):
        if module == layer or module.startswith(layer + "."):
            return layer
    top = module.split(".")[0]
    return top if top in LIBRARY else None


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, module: str, root: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every import, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            found.append((target, names, node.lineno))
            # ``from pkg import submodule`` imports the submodule too.
            found.extend((f"{target}.{n}", [], node.lineno) for n in names if _is_module(root, f"{target}.{n}"))
    return found


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def violations(root: Path) -> list[str]:
    """Every broken rule in the library packages under ``root``, as readable strings."""
    out = []
    for top in LIBRARY:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            module = module_name(path, root)
            layer = layer_of(module, rel)
            if layer is None:
                continue
            for target, names, line in imports_of(path, module, root):
                target_layer = layer_of(target, "")
                if target_layer is None:
                    continue
                where = f"{rel}:{line}"
                for banned in FORBIDDEN[layer]:
                    if target == banned or target.startswith(banned + "."):
                        out.append(f"{where}: {layer} must not import {target}")
                if rel == "curvature/__init__.py" and target.startswith("curvature.app"):
                    out.append(f"{where}: curvature/__init__ must not import the application ({target})")
                if target_layer != layer:
                    private = [p for p in target.split(".") if _is_private(p)]
                    private += [n for n in names if _is_private(n)]
                    if private:
                        out.append(f"{where}: {layer} uses private {', '.join(private)} of {target_layer} ({target})")
                    elif target not in PUBLIC_MODULES[target_layer] and _is_module(root, target):
                        out.append(f"{where}: {layer} reaches into internal module {target} of {target_layer}; "
                                   f"import from {' or '.join(PUBLIC_MODULES[target_layer])}")
    return out


def test_library_respects_the_layers():
    found = violations(ROOT)
    assert not found, "layering violations:\n" + "\n".join(found)


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel in ("curvature/params.py", "curvature/checks.py", "curvature/data.py"):
        files.setdefault(rel, "")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for top in LIBRARY:
        (root / top).mkdir(exist_ok=True)
        (root / top / "__init__.py").touch()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"curvature/hessian.py": "import estimators\n"}, "curvature must not import estimators"),
        ({"curvature/hessian.py": "from spectra import eigsh\n"}, "curvature must not import spectra"),
        ({"curvature/data.py": "from .optim import MFAC\n"}, "curvature must not import curvature.optim"),
        ({"curvature/__init__.py": "from .app import cli\n"}, "must not import the application"),
        ({"estimators/trace.py": "from spectra.lanczos import lanczos\n"}, "estimators must not import spectra"),
        ({"spectra/eigsh.py": "import quant.plan\n"}, "spectra must not import quant"),
        ({"quant/plan.py": "from curvature.app import report\n"}, "quant must not import curvature.app"),
        ({"spectra/slq.py": "from estimators._products import run_blocks\n"}, "uses private _products"),
        ({"spectra/slq.py": "from curvature.data import _slice\n"}, "uses private _slice"),
        ({"spectra/landscape.py": "from curvature.params import select_parameters\n"},
         "reaches into internal module curvature.params"),
        ({"curvature/optim/sophia.py": "from curvature.app.cli import main\n"},
         "curvature.optim must not import curvature.app"),
    ],
)
def test_planted_violations_are_caught(tmp_path, files, expected):
    _plant(tmp_path, files)
    found = violations(tmp_path)
    assert any(expected in v for v in found), found


def test_allowed_imports_pass(tmp_path):
    _plant(tmp_path, {
        "spectra/slq.py": "import estimators\nfrom curvature import Hessian\nfrom ._utils import eps_of\n",
        "curvature/optim/sophia.py": "import estimators\nimport spectra\nfrom ..checks import check_count\n",
        "curvature/app/report.py": "import quant\nimport spectra\nfrom curvature.optim import MFAC\n",
        "curvature/__main__.py": "from .app.cli import main\n",  # `python -m curvature` is a consumer
    })
    assert violations(tmp_path) == []
