"""Serving fixtures: the tiny trained bundle loaded once, a fresh history store (SQLite, Redis) per test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_state(tiny_run):
    """The tiny run's bundle loaded as a ModelState (exact index built in memory)."""
    import torch

    from towerline.serving.recommender import load_model

    torch.set_num_threads(1)  # the test machine is shared; one thread is also what a replica uses
    return load_model(tiny_run.bundle_dir)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    """Each history-store test runs against both stores: one contract, two backends."""
    if request.param == "sqlite":
        from towerline.serving.history import SQLiteHistoryStore

        s = SQLiteHistoryStore(tmp_path / "history.sqlite")
    else:
        from towerline.serving.redis_history import RedisHistoryStore

        # a fresh key prefix per test instead of FLUSHDB: tests stay independent on one server
        s = RedisHistoryStore(request.getfixturevalue("redis_url"), prefix=f"t:{request.node.name}:")
    yield s
    s.close()


@pytest.fixture(scope="session")
def serve_base():
    """One local Ray and one Serve HTTP proxy on 127.0.0.1:<free port> for every Serve test module.

    Each module deploys its own applications (``serve.run`` with its own name and route prefix) and
    deletes them when it is done; starting Ray and Serve costs tens of seconds of the 2 cores, so
    the run does it once. Stopped at the end of the run.
    """
    ray = pytest.importorskip("ray")
    from ray import serve

    from support import free_port

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
