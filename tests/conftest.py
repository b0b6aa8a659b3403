"""Shared fixtures: seeded synthetic data, a real MLflow store per test, a tiny trained bundle.

Everything here is real (Lightning training, a SQLite MLflow store, FAISS); the only concession to
speed is size: a few hundred users, a few dozen items, two epochs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import REPO, tiny_overrides

os.environ.setdefault("OMP_NUM_THREADS", "2")

@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store under tmp_path (as mlflow's own test suite does)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts (./mlruns) land in tmp_path too
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny training run shared by the tests that only read its bundle and MLflow records."""
    import mlflow

    from towerline.config import load_config
    from towerline.training.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(uri))
        result = train(cfg, root / "run", progress=False)
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
    return result
