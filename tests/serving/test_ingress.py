"""Ray Serve's two front doors: the default Python proxy and HAProxy with direct ingress.

The HAProxy test runs ``towerline serve --ingress haproxy --check`` in its own process: the choice is
read by Ray when it is imported, and this test process has Ray loaded with the default proxy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from support import free_port
from towerline.errors import ConfigError
from towerline.serving.ingress import ray_serve_env, use_ingress


def test_the_default_proxy_needs_no_environment():
    assert ray_serve_env("proxy") == {}


def test_haproxy_turns_on_rays_high_throughput_mode():
    env = ray_serve_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30  # shutdown is not 30 s longer


def test_an_unknown_ingress_is_a_config_error():
    with pytest.raises(ConfigError, match="nginx"):
        ray_serve_env("nginx")


def test_choosing_after_ray_serve_was_imported_with_the_other_ingress_is_refused(monkeypatch):
    for key in ray_serve_env("haproxy"):
        monkeypatch.delenv(key, raising=False)
    loaded = types.SimpleNamespace(RAY_SERVE_ENABLE_HA_PROXY=False)  # what Ray read at its import
    monkeypatch.setitem(sys.modules, "ray.serve._private.constants", loaded)
    with pytest.raises(ConfigError, match="before ray.serve is imported"):
        use_ingress("haproxy")
    use_ingress("proxy")  # the ingress Ray already has is fine


@pytest.mark.serve
def test_serve_through_haproxy_answers_a_recommendation(tiny_run, tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
           "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "towerline.cli", "serve", "--model", str(tiny_run.bundle_dir), "--ingress", "haproxy",
           "--port", str(port), "--history-db", str(tmp_path / "history.sqlite"),
           "--feedback-db", str(tmp_path / "feedback.sqlite"), "--check"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"127.0.0.1:{port} through HAProxy" in done.stdout
    body = json.loads(done.stdout[done.stdout.index("{\n"):])
    assert len(body["items"]) == 5 and body["fallback"] is False
    assert all(isinstance(i["item_id"], str) for i in body["items"])
