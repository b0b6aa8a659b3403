"""Ray Serve's two front doors: the default Python proxy and HAProxy with direct ingress.

The HAProxy test runs ``towerline serve --ingress haproxy --check`` in its own process: the choice is
read by Ray when it is imported, and this test process has Ray loaded with the default proxy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from support import free_port
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


def _listening() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state on this machine, from /proc/net/tcp{,6}."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = b"".join(bytes.fromhex(addr_hex[i:i + 8])[::-1] for i in range(0, len(addr_hex), 8))
            found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


@pytest.mark.serve
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux's /proc/net/tcp")
def test_serve_through_haproxy_answers_a_recommendation_and_listens_on_the_host_only(tiny_run, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_HAPROXY_")}  # ports picked by serve
    cmd = [sys.executable, "-m", "towerline.cli", "serve", "--model", str(tiny_run.bundle_dir), "--ingress", "haproxy",
           "--port", str(port), "--history-db", str(tmp_path / "history.sqlite"),
           "--feedback-db", str(tmp_path / "feedback.sqlite"), "--check"]
    seen: set[tuple[str, int]] = set()
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _listening()  # HAProxy listens only while the command runs
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert proc.wait() == 0, stdout[-2000:] + stderr[-4000:]
    assert f"127.0.0.1:{port} through HAProxy" in stdout
    body = json.loads(stdout[stdout.index("{\n"):])
    assert len(body["items"]) == 5 and body["fallback"] is False
    assert all(isinstance(i["item_id"], str) for i in body["items"])

    found = re.search(r"HAProxy stats http://127\.0\.0\.1:(\d+)/stats, metrics http://127\.0\.0\.1:(\d+)/metrics", stdout)
    assert found, stdout[-2000:]
    stats, metrics = int(found[1]), int(found[2])
    assert stats != metrics and not {stats, metrics} & {8404, 9101}  # free ports, not Ray's fixed defaults
    for p in (stats, metrics, port):
        assert ("127.0.0.1", p) in seen, (p, sorted(a for a in seen if a[1] == p))  # it did listen, on the host
        assert not {("0.0.0.0", p), ("::", p)} & seen, p  # and never on every interface
