"""Ray Serve's two front doors: the default Python proxy and HAProxy with direct ingress.

A running ``towerline serve --ingress haproxy`` (its banner, stats and metrics ports, what it listens
on, how it stops) is tested from outside in ``test_ops.py``: the choice is read by Ray when it is
imported, and this test process has Ray loaded with the default proxy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
from towerline.errors import ConfigError
from towerline.serving import ingress
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


def test_haproxy_gets_two_distinct_free_ports_on_the_serve_host():
    env = ray_serve_env("haproxy", "127.0.0.1")
    ports = {int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]), int(env["RAY_SERVE_HAPROXY_STATS_PORT"])}
    assert len(ports) == 2 and not ports & {9101, 8404}
    for port in ports:  # free on 127.0.0.1 right now: binding them succeeds
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_ports_the_user_set_win_and_the_wrapper_binds_rays_frontends_to_the_host(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "ray.serve._private.constants", raising=False)  # as before Ray's import
    monkeypatch.setattr(ingress, "_WRAPPERS", {})  # no wrapper from an earlier call in this process
    for key in ray_serve_env("haproxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", shutil.which("echo"))  # prints what HAProxy would get
    use_ingress("haproxy", "127.0.0.1")
    assert os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404"
    wrapper = os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert wrapper != shutil.which("echo") and os.access(wrapper, os.X_OK)

    # the bind lines of Ray's own config template, rendered with Ray's default ports
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    rendered = (HAPROXY_CONFIG_TEMPLATE.replace("{{ config.metrics_port }}", "9101")
                .replace("{{ config.stats_port }}", "8404")
                .replace("{{ config.frontend_host }}:{{ config.frontend_port }}", "127.0.0.1:8000"))
    binds = [line for line in rendered.splitlines() if line.strip().startswith("bind ") and "{{" not in line]
    assert len(binds) == 3, binds  # metrics, http, stats: a new frontend in Ray's template shows up here
    config = tmp_path / "haproxy.cfg"
    config.write_text("\n".join(binds) + "\n")
    done = subprocess.run([wrapper, "-db", "-f", str(config), "-dR", "-sf", "123"], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["-db", "-f", f"{config}.towerline", "-dR", "-sf", "123"]
    assert [line.split()[1] for line in Path(f"{config}.towerline").read_text().splitlines()] == [
        "127.0.0.1:9101", "127.0.0.1:8000", "127.0.0.1:8404"]
