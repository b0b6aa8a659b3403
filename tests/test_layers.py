"""The direction of imports is part of the design: features <- training <- marketing <- serving.

Each folder may import the layers below it and ``core/`` (config, errors, the bundle format),
never a layer above: ``features/`` nothing of Towerline's but core, ``training/`` features,
``marketing/`` features and training, ``serving/`` all of them. ``core/`` outside the CLI imports
none of the layers (the CLI's commands are the one place that calls into all of them). Parsed with
``ast``, so a violation fails here naming the file, line and import instead of surfacing as a tangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import REPO

LAYERS = ("features", "training", "marketing", "serving")  # bottom to top
CORE_MODULES = ("towerline.bundle", "towerline.config", "towerline.errors", "towerline.problems", "towerline.sqlite", "towerline.text")
# core modules that may reach into the layers: the CLI, which parses flags and calls them
CLI = ("core/cli.py", "core/commands/")


def layer_of(name: str) -> str | None:
    """``towerline.training.model`` -> ``training``; core modules and non-Towerline names -> None."""
    parts = name.split(".")
    if parts[0] != "towerline" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def violations(folder: str, name: str) -> bool:
    """True when a module of ``folder`` (a layer, or "core") may not import ``name``."""
    target = layer_of(name)
    if target is None:
        return False
    if folder == "core":
        return True
    return LAYERS.index(target) > LAYERS.index(folder)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _modules(folder: str) -> list[Path]:
    paths = sorted((REPO / folder).rglob("*.py"))
    if folder == "core":
        paths = [p for p in paths if not str(p.relative_to(REPO)).startswith(CLI)]
    return paths


@pytest.mark.parametrize("folder", LAYERS + ("core",))
def test_folder_imports_only_the_layers_below_it(folder):
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in _modules(folder)
        for line, name in imports_of(path)
        if violations(folder, name)
    ]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_the_layer_check_catches_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from towerline.serving.recommender import Recommender\n")
    assert (1, "towerline.serving.recommender") in imports_of(f)
    assert violations("marketing", "towerline.serving.recommender")
    assert violations("training", "towerline.marketing.profiles")
    assert violations("features", "towerline.training.model")
    assert violations("core", "towerline.features.vocab")
    assert not violations("serving", "towerline.marketing.routes")
    assert not violations("marketing", "towerline.training.model")
    assert not violations("features", "towerline.config")
    assert not violations("serving", "numpy")
