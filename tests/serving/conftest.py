"""Serving fixtures: the tiny trained bundle loaded once, a fresh history store per test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_state(tiny_run):
    """The tiny run's bundle loaded as a ModelState (exact index built in memory)."""
    import torch

    from towerline.serving.recommender import load_model

    torch.set_num_threads(1)  # the test machine is shared; one thread is also what a replica uses
    return load_model(tiny_run.bundle_dir)


@pytest.fixture
def store(tmp_path):
    from towerline.serving.history import SQLiteHistoryStore

    s = SQLiteHistoryStore(tmp_path / "history.sqlite")
    yield s
    s.close()
