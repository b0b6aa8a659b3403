"""The direction of imports is part of the design: features <- training <- serving.

``features/`` imports nothing from training or serving; ``serving/`` imports only network
definitions and data contracts, never training loops or raw-file readers. Parsed with ``ast`` so a
violation fails here naming the file, line and import, instead of surfacing as a tangle later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "features": ("towerline.training", "towerline.serving", "towerline.bundle"),
    "serving": (
        "towerline.training.system",
        "towerline.training.data",
        "towerline.training.train",
        "towerline.training.export",
        "towerline.training.tracking",
        "towerline.features.readers",
        "towerline.features.synthetic",
        "towerline.features.validate",
        "towerline.features.splits",
    ),
}


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


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_what_its_layer_allows(folder):
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, name in imports_of(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder])
    ]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_the_layer_check_catches_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from towerline.training.system import TwoTowerSystem\n")
    assert (1, "towerline.training.system") in imports_of(f)
