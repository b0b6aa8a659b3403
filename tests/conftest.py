"""Shared fixtures: seeded synthetic data, a real MLflow store per test, a tiny trained bundle.

Everything here is real (Lightning training, a SQLite MLflow store, FAISS); the only concession to
speed is size: a few hundred users, a few dozen items, two epochs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "s3rec"
REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(tracking_uri: str | None = None) -> list[str]:
    """A config small enough to train in seconds on one CPU core, still with real signal."""
    out = [
        "data.synthetic_users=300",
        "data.synthetic_items=60",
        "model.dim=16",
        "model.max_len=12",
        "model.n_layers=1",
        "model.dropout=0.1",
        "trainer.max_epochs=2",
        "trainer.batch_size=64",
        "trainer.lr=0.005",
        "trainer.eval_batch_size=128",
        "tracking.experiment=tests",
        "tracking.model_name=tiny-retriever",
    ]
    if tracking_uri:
        out.append(f"tracking.tracking_uri={tracking_uri}")
    return out


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
