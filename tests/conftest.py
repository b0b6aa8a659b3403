"""Shared fixtures: seeded synthetic data, a real MLflow store per test, a tiny trained bundle.

Everything here is real (Lightning training, a SQLite MLflow store, FAISS); the only concession to
speed is size: a few hundred users, a few dozen items, two epochs.
"""

from __future__ import annotations

import os

import pytest

# Idle OpenMP threads sleep instead of spinning: the suite runs Ray Serve replicas, trainings and
# clients side by side on 2 cores, where spinning threads burn the CPU the others wait for
# (inherited by the Ray workers the tests start). Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from support import RANKER_OVERRIDES, start_redis, train_tiny

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
    return train_tiny(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def ranked_run(tmp_path_factory):
    """A tiny retriever trained by ``towerline train`` with the ranker enabled (one real MLflow store),
    shared by the ranker tests and the serving parity tests."""
    return train_tiny(tmp_path_factory.mktemp("ranked_run"), RANKER_OVERRIDES)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server on 127.0.0.1 for the whole run, stopped at the end."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)
