"""The direction of imports is part of the design: features <- training <- serving.

``features/`` imports nothing from training or serving; ``serving/`` imports only network
definitions and data contracts, never training loops or raw-file readers. Parsed with ``ast`` so a
violation fails here naming the file, line and import, instead of surfacing as a tangle later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import REPO

# features/ may use nothing above it.
FEATURES_FORBIDDEN = ("towerline.training", "towerline.serving", "towerline.bundle")
# serving/ may use network definitions and data contracts, never training loops or raw-file readers.
SERVING_ALLOWED = (
    "towerline.serving",
    "towerline.training.model",
    "towerline.training.ranker_model",
    "towerline.bundle",
    "towerline.config",
    "towerline.errors",
    "towerline.features.contracts",
    "towerline.features.vocab",
    "towerline.features.sequences",
    "towerline.features.profiles",
)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(folder: str, name: str) -> bool:
    if not (name == "towerline" or name.startswith("towerline.")):
        return False
    if folder == "features":
        return _under(name, FEATURES_FORBIDDEN)
    # "from towerline.training import model" appears as towerline.training and towerline.training.model
    parents_of_allowed = {p.rsplit(".", 1)[0] for p in SERVING_ALLOWED} | {"towerline"}
    return not (_under(name, SERVING_ALLOWED) or name in parents_of_allowed)


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


@pytest.mark.parametrize("folder", ["features", "serving"])
def test_folder_imports_only_what_its_layer_allows(folder):
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, name in imports_of(path)
        if violations(folder, name)
    ]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_the_layer_check_catches_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from towerline.training.system import TwoTowerSystem\n")
    assert (1, "towerline.training.system") in imports_of(f)
    assert violations("serving", "towerline.training.system")
    assert violations("serving", "towerline.features.readers")
    assert violations("features", "towerline.bundle")
    assert not violations("serving", "towerline.training.model")
    assert not violations("serving", "numpy")
