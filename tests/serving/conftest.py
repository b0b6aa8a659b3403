"""Serving fixtures: the tiny trained bundle loaded once, a fresh history store (SQLite, Redis) per test."""

from __future__ import annotations

from pathlib import Path

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


_SERVE: dict[str, str] = {}  # {"base": URL} while the run's Ray and Serve are up
SERVING_TESTS = Path(__file__).resolve().parent


def _stop_serve() -> None:
    if _SERVE.pop("base", None) is not None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_base() -> str:
    """One local Ray and one Serve HTTP proxy on 127.0.0.1:<free port> for the Serve test modules.

    Each module deploys its own applications (``serve.run`` with its own name and route prefix) and
    deletes them when it is done; starting Ray and Serve costs tens of seconds of the 2 cores, so
    consecutive modules share one. It stops when the run leaves this folder (the tests after it,
    such as the CLI checks that no command started Ray, see no Ray), and starts again if a later
    module asks for it.
    """
    if "base" not in _SERVE:
        ray = pytest.importorskip("ray")
        from ray import serve

        from support import free_port

        port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        except BaseException:
            ray.shutdown()
            raise
        _SERVE["base"] = f"http://127.0.0.1:{port}"
    return _SERVE["base"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of this folder (its module fixtures already torn down), stop Ray and Serve."""
    result = yield
    if nextitem is None or SERVING_TESTS not in Path(nextitem.path).resolve().parents:
        _stop_serve()
    return result
