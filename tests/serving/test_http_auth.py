"""Bearer tokens on writes and admin, loopback-only without one, and what /admin/reload may load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from http_support import TOKEN, assert_problem, in_process_app

WRITES = [
    ("/events", [{"user_id": "u000001", "item_id": "i00001", "event_id": "auth-1"}]),
    ("/feedback", [{"experiment": "x", "arm": "a", "user_id": "u000001", "kind": "click", "event_id": "auth-f"}]),
    ("/audiences", {"item_id": "i00001", "size": 3}),
    ("/admin/reload", {}),
]
READS = [("post", "/recommend", {"user_id": "u000001", "k": 3}), ("get", "/items/i00001/similar", None),
         ("get", "/version", None), ("get", "/segments", None)]


@pytest.fixture(scope="module")
def secured(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "token").write_text(TOKEN + "\n")
    replica, app = in_process_app(tiny_run, tmp, api_token_file=str(tmp / "token"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    replica.close()


@pytest.mark.parametrize("path,payload", WRITES)
def test_writes_without_a_token_are_401_with_a_bearer_challenge(secured, path, payload):
    resp = secured.post(path, json=payload)
    assert_problem(resp, 401, "Bearer")
    assert resp.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path,payload", WRITES)
def test_writes_with_a_wrong_token_are_403(secured, path, payload):
    for header in (f"Bearer {TOKEN}x", "Bearer nope", f"Basic {TOKEN}"):
        resp = secured.post(path, json=payload, headers={"authorization": header})
        assert resp.status_code in (401, 403) and resp.headers["www-authenticate"].startswith("Bearer")
    assert_problem(secured.post(path, json=payload, headers={"authorization": "Bearer nope"}), 403)


def test_the_right_token_is_let_through(secured):
    auth = {"authorization": f"Bearer {TOKEN}"}
    resp = secured.post("/events", json=WRITES[0][1], headers=auth)
    assert resp.status_code == 200 and resp.json()["accepted"] + resp.json()["duplicate"] == 1
    assert secured.post("/admin/reload", json={}, headers=auth).status_code == 200


@pytest.mark.parametrize("method,path,payload", READS)
def test_reads_stay_open_by_default(secured, method, path, payload):
    resp = secured.request(method, path, json=payload)
    assert resp.status_code == 200, resp.text


def test_reads_need_the_token_when_configured(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TOWERLINE_API_TOKEN", TOKEN)
    replica, app = in_process_app(tiny_run, tmp_path, require_token_for_reads=True)
    with TestClient(app, raise_server_exceptions=False) as c:
        for method, path, payload in READS:
            assert_problem(c.request(method, path, json=payload), 401)
            assert c.request(method, path, json=payload, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/docs").status_code == 200
    replica.close()


def test_no_token_is_refused_off_loopback_in_one_line(monkeypatch, tmp_path):
    from towerline.errors import ConfigError
    from towerline.serving.settings import settings_from

    monkeypatch.delenv("TOWERLINE_API_TOKEN", raising=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        settings_from(host=host)
    with pytest.raises(ConfigError) as e:
        settings_from(host="0.0.0.0")
    assert "TOWERLINE_API_TOKEN" in str(e.value) and "api_token_file" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("TOWERLINE_API_TOKEN", TOKEN)
    assert settings_from(host="0.0.0.0").host == "0.0.0.0"
    monkeypatch.setenv("TOWERLINE_API_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        settings_from(host="0.0.0.0")
    monkeypatch.delenv("TOWERLINE_API_TOKEN")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        settings_from(host="0.0.0.0", api_token_file=str(tmp_path / "empty"))


def test_serve_help_names_the_token_variable(capsys):
    from towerline.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "TOWERLINE_API_TOKEN" in capsys.readouterr().out


# ----------------------------------------------------------------------------- reload


@pytest.fixture(scope="module")
def admin(tiny_run, tmp_path_factory):
    """An app whose models_root is a folder holding a copy of the tiny bundle (and junk)."""
    tmp = tmp_path_factory.mktemp("admin")
    root = tmp / "models"
    shutil.copytree(tiny_run.bundle_dir, root / "copy")
    (root / "not-a-bundle").mkdir()
    (root / "a-file").write_text("x")
    replica, app = in_process_app(tiny_run, tmp, models_root=str(root))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield replica, c, root
    replica.close()


def test_reload_loads_from_the_registry_and_under_models_root(admin, tiny_run):
    _, c, root = admin
    resp = c.post("/admin/reload", json={"model": str(root / "copy")})
    assert resp.status_code == 200, resp.text
    resp = c.post("/admin/reload", json={"model": f"models:/{tiny_run.model_name}/{tiny_run.model_version}"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["current"]["model_version"] == str(tiny_run.model_version)


def test_every_bad_path_gets_the_same_answer(admin, tmp_path):
    _, c, root = admin
    outside = tmp_path / "bundle"
    outside.mkdir()
    answers = set()
    for path in (root / "missing", root / "a-file", root / "not-a-bundle", outside, "/etc", "../../etc", root / ".." / ".."):
        body = assert_problem(c.post("/admin/reload", json={"model": str(path)}), 422)
        answers.add(body["detail"])
        body = assert_problem(c.post("/admin/reload", json={"index_dir": str(path)}), 422)
        answers.add(body["detail"])
    assert len(answers) == 1
    assert str(root) not in answers.pop()


def test_a_model_that_fails_to_load_is_409_without_paths_pids_or_tracking_uri(admin, tiny_run):
    _, c, root = admin
    for model in ("models:/no-such-model@champion", "runs:/0123456789abcdef/bundle"):
        body = assert_problem(c.post("/admin/reload", json={"model": model}), 409, "still serving")
        text = str(body)
        assert "sqlite" not in text and tiny_run.tracking_uri not in text and str(os.getpid()) not in text
        assert str(root) not in text and body["error_id"]


def test_registry_copies_are_deleted_when_dropped_and_at_close(tiny_run, tmp_path, monkeypatch):
    import tempfile

    private = tmp_path / "tmp"  # other test runs on the machine make copies in /tmp too
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))

    def copies() -> set[Path]:
        return set(private.glob("towerline-bundle-*"))

    before = copies()
    replica, app = in_process_app(tiny_run, tmp_path)
    uri = f"models:/{tiny_run.model_name}/{tiny_run.model_version}"
    with TestClient(app, raise_server_exceptions=False) as c:
        for _ in range(3):
            assert c.post("/admin/reload", json={"model": uri}).status_code == 200
        assert len(copies() - before) == 1  # only the version serving now
        assert c.post("/admin/reload", json={"model": str(tiny_run.bundle_dir)}).status_code == 200
        assert copies() - before == set()
        assert c.post("/admin/reload", json={"model": uri}).status_code == 200
    replica.close()
    assert copies() - before == set()
