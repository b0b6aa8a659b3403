"""The FastAPI app of the Serve ingress built in-process (no Ray): fast tests of the HTTP contract."""

from __future__ import annotations

from typing import Any

PROBLEM = "application/problem+json"
TOKEN = "t0k3n-for-the-tests-0123456789"


def in_process_app(tiny_run: Any, tmp: Any, **settings: Any) -> Any:
    """The ingress's FastAPI app over the tiny bundle, its stores under ``tmp``, stages in-process."""
    from towerline.serving.app import AppArgs, IngressReplica
    from towerline.serving.recommender import LocalStages

    args = AppArgs(
        model=str(tiny_run.bundle_dir),
        tracking_uri=tiny_run.tracking_uri,
        settings={"history_db": str(tmp / "history.sqlite"), "feedback_db": str(tmp / "feedback.sqlite"), **settings},
    ).resolved()
    replica = IngressReplica(args, stages=LocalStages(args.settings))
    return replica, replica.asgi_app()


def assert_problem(resp: Any, status: int, mentions: str = "") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers["content-type"]
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert mentions in resp.text, resp.text
    return body
