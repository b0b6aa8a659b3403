"""A running ``towerline serve`` from outside: what it listens on, how it stops, what overload hears.

Each serve test starts the command in its own process (the ingress is a process-wide Ray setting,
and signals must reach the server, not pytest) and records the process tree while it runs: Ray's
GCS, raylet, workers and HAProxy all descend from it, so "nothing left running" and "nothing
listening beyond the host" are questions about that tree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import free_port
from towerline.serving import ingress, lifecycle
from towerline.serving.lifecycle import is_loopback, rebind
from towerline.serving.settings import settings_from
from towerline.serving.shedding import http_options, ingress_options

psutil = pytest.importorskip("psutil")

PROBLEM = "application/problem+json"


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("host, expected", [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                            ("::ffff:127.0.0.1", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("192.0.2.7", False), ("example.org", False)])
def test_loopback_addresses(host, expected):
    assert is_loopback(host) is expected


def test_wildcard_grpc_addresses_move_to_the_host_and_others_stay():
    assert rebind("[::]:0", "127.0.0.1") == "127.0.0.1:0"
    assert rebind("0.0.0.0:5000", "127.0.0.1") == "127.0.0.1:5000"
    assert rebind("[::]:0", "::1") == "[::1]:0"
    assert rebind("10.0.0.2:7000", "127.0.0.1") == "10.0.0.2:7000"


def test_ray_runs_in_its_loopback_mode_for_a_loopback_host_and_untouched_for_a_wildcard():
    env = lifecycle.ray_env("127.0.0.1")
    assert env[lifecycle.LOCAL_RAY_ENV] == "0" and env[lifecycle.BIND_HOST_ENV] == "127.0.0.1"
    assert lifecycle.ray_env("0.0.0.0") == {}


def test_the_ingress_deployment_gets_bounded_queues_health_checks_and_a_short_drain_from_settings():
    s = settings_from(max_ongoing_requests=4, max_queued_requests=2, retry_after_s=3, request_timeout_s=7.5)
    opts = ingress_options(s)
    assert opts["max_ongoing_requests"] == 4 and opts["max_queued_requests"] == 2
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 3}
    assert opts["num_replicas"] >= 2  # a killed replica is not an outage
    assert opts["health_check_period_s"] <= 2 and opts["health_check_timeout_s"] <= 2
    assert opts["graceful_shutdown_timeout_s"] < 20
    assert http_options(s)["request_timeout_s"] == 7.5


def test_the_haproxy_wrapper_privatises_the_admin_socket_and_answers_problem_json(monkeypatch, tmp_path):
    import shutil

    monkeypatch.setattr(ingress, "_WRAPPERS", {})
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", shutil.which("echo"))
    wrapper = ingress.haproxy_bound_to("127.0.0.1")
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    wanted = ("stats socket", "errorfile 50", "frontend http_frontend")
    lines = [line for line in HAPROXY_CONFIG_TEMPLATE.splitlines() if line.strip().startswith(wanted)]
    rendered = "\n".join(lines).replace("{{ config.socket_path }}", str(tmp_path / "admin.sock")).replace(
        "{{ config.error_file_path }}", str(tmp_path / "500.http"))
    config = tmp_path / "haproxy.cfg"
    config.write_text(rendered + "\n")
    subprocess.run([str(wrapper), "-f", str(config)], check=True, capture_output=True)
    out = Path(f"{config}.towerline").read_text()
    assert "mode 600" in out and "mode 666" not in out
    pages = {}
    for line in out.splitlines():
        if line.strip().startswith("errorfile"):
            _, code, path = line.split()
            pages[code] = Path(path).read_bytes().decode()  # CRLF kept
    assert set(pages) == {"502", "503", "504"}
    head, body = pages["503"].split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 503") and f"Content-Type: {PROBLEM}" in head and "Retry-After: 1" in head
    assert json.loads(body)["status"] == 503 and f"Content-Length: {len(body.encode())}" in head
    rules = [line.strip() for line in out.splitlines() if line.strip().startswith("http-response return")]
    assert any("status 503" in r and "retry-after" in r for r in rules)  # Serve's text 503 -> problem+json
    assert any("status 504" in r and "status 408" in r for r in rules)  # Serve's timeout -> 504
    assert "http-request del-header x-request-timeout-seconds" in out  # no client lifts the request timeout
    assert "maxconn" not in out  # no limits asked for


def test_haproxy_holds_each_replica_to_its_queue_and_sheds_from_its_own(monkeypatch, tmp_path):
    import shutil

    from towerline.serving.shedding import haproxy_limits

    monkeypatch.setattr(ingress, "_WRAPPERS", {})
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", shutil.which("echo"))
    limits = haproxy_limits(settings_from(max_ongoing_requests=6, max_queued_requests=3, haproxy_queue_ms=15))
    assert limits == {"per_replica": 6, "queue_ms": 15}
    assert haproxy_limits(settings_from(max_queued_requests=-1))["per_replica"] is None
    wrapper = ingress.haproxy_bound_to("127.0.0.1", 1, **limits)
    config = tmp_path / "haproxy.cfg"
    config.write_text("backend towerline\n    default-server inter 1s fall 2 check\n    server r1 127.0.0.1:1 check\n")
    subprocess.run([str(wrapper), "-f", str(config)], check=True, capture_output=True)
    lines = Path(f"{config}.towerline").read_text().splitlines()
    assert lines[1].strip() == "default-server inter 1s fall 2 check maxconn 6" and lines[2].strip() == "timeout queue 15ms"


# ----------------------------------------------------------------------------- a running server


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    port: int
    out: Path
    tree: set[int] = field(default_factory=set)

    def record_tree(self) -> list[psutil.Process]:
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        self.tree |= {p.pid for p in procs}
        return procs

    def log(self) -> str:
        return (self.out / "stdout").read_text()[-3000:] + (self.out / "stderr").read_text()[-6000:]

    def alive(self) -> list[int]:
        left = []
        for pid in self.tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        return left


def _start(tiny_run, tmp_path: Path, *flags: str) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}  # no ingress choice leaks in from other tests
    cmd = [sys.executable, "-m", "towerline.cli", "serve", "--model", str(tiny_run.bundle_dir), "--port", str(port),
           "--history-db", str(tmp_path / "history.sqlite"), "--feedback-db", str(tmp_path / "feedback.sqlite"), *flags]
    stdout, stderr = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", port, tmp_path)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        server.record_tree()
        try:
            if httpx.get(f"{server.base}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _kill(server)
    pytest.fail(f"towerline serve did not become healthy:\n{server.log()}")


def _kill(server: Server) -> None:
    for pid in [server.proc.pid, *server.alive()]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)


def _listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``procs``."""
    found = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet") if hasattr(p, "net_connections") else p.connections(kind="inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _load(base: str, stop: threading.Event, results: list, clients: int = 6) -> list[threading.Thread]:
    """``clients`` threads POSTing /recommend back to back until ``stop``; each result is
    (start time, status or exception name)."""
    import httpx

    def run(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status = c.post(f"{base}/recommend", json={"user_id": f"u{i:06d}", "k": 5}).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                    time.sleep(0.05)
                results.append((t0, status))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.serve
@pytest.mark.parametrize("ingress_kind, sig", [("haproxy", signal.SIGTERM), ("proxy", signal.SIGINT)])
def test_serve_listens_on_loopback_only_and_a_signal_drains_then_stops_everything(tiny_run, tmp_path, ingress_kind, sig):
    server = _start(tiny_run, tmp_path, "--ingress", ingress_kind)
    try:
        stop, results = threading.Event(), []
        threads = _load(server.base, stop, results)
        time.sleep(3)  # replicas and HAProxy are up and serving; every listener exists by now
        expected = {("127.0.0.1", server.port)}
        if ingress_kind == "haproxy":
            # the banner names the front door and HAProxy's stats and metrics ports: free ones (not Ray's
            # fixed 8404 / 9101), on the host only, like every other listener below
            banner = (tmp_path / "stdout").read_text()
            assert f"127.0.0.1:{server.port} through HAProxy" in banner, banner[-2000:]
            found = re.search(r"HAProxy stats http://127\.0\.0\.1:(\d+)/stats, metrics http://127\.0\.0\.1:(\d+)/metrics", banner)
            assert found, banner[-2000:]
            stats, metrics = int(found[1]), int(found[2])
            assert stats != metrics and not {stats, metrics} & {8404, 9101}
            expected |= {("127.0.0.1", stats), ("127.0.0.1", metrics)}
        listening: set[tuple[str, int, str]] = set()
        for _ in range(40):  # HAProxy restarts as replicas come up: look until its new process listens
            procs = server.record_tree()
            listening |= set(_listening(procs))
            if expected <= {(a, p) for a, p, _ in listening}:
                break
            time.sleep(0.5)
        assert expected <= {(a, p) for a, p, _ in listening}, (sorted(expected), sorted(listening))
        exposed = [s for s in listening if not is_loopback(s[0])]
        assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
        if ingress_kind == "haproxy":  # the admin socket named in the config HAProxy runs: owner only
            configs = [p.cmdline()[p.cmdline().index("-f") + 1] for p in procs if "-f" in p.cmdline()
                       and p.name().startswith("haproxy")]
            assert configs, [p.cmdline()[:3] for p in procs]
            sockets = [line.split()[2] for line in Path(configs[0]).read_text().splitlines()
                       if line.strip().startswith("stats socket")]
            assert sockets, configs
            for path in sockets:
                assert os.stat(path).st_mode & 0o777 == 0o600, (path, oct(os.stat(path).st_mode))

        signalled = time.monotonic()
        server.proc.send_signal(sig)
        code = server.proc.wait(30)
        took = time.monotonic() - signalled
        stop.set()
        for t in threads:
            t.join(35)
        assert code == 0, server.log()
        assert took < 20, f"stopped in {took:.1f} s"
        before = [status for t0, status in results if t0 < signalled]
        # sent before the signal: answered (200, or 503 + Retry-After when it reached a replica already
        # draining), never cut off (a reset connection or a 502 would be a request lost in the stop)
        assert before and 200 in before and set(before) <= {200, 503}, sorted(set(map(str, before)))
        after = {status for t0, status in results if t0 >= signalled}
        assert not {s for s in after if isinstance(s, int) and s >= 500 and s != 503}, after
        time.sleep(1)
        assert not server.alive(), [psutil.Process(p).cmdline()[:2] for p in server.alive()]
        assert "stopped" in (tmp_path / "stdout").read_text()
    finally:
        if server.proc.poll() is None or server.alive():
            _kill(server)


def _slow_client(port: int, headers: str = "", wait_s: float = 15.0) -> tuple[str, float]:
    """(status line and body, seconds) of a POST /recommend whose body never finishes arriving: the
    request outlives any request timeout without depending on how fast this machine is."""
    body = b'{"user_id": "u000001", "k": 5}'
    head = (f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body[:5])
        sock.settimeout(wait_s)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
    return answer.decode(errors="replace"), time.monotonic() - t0


@pytest.mark.serve
def test_overload_gets_503_and_a_slow_request_504_both_problem_json(tiny_run, tmp_path):
    server = _start(tiny_run, tmp_path, "--set", "max_ongoing_requests=1", "--set", "max_queued_requests=1",
                    "--set", "ingress_replicas=1", "--set", "request_timeout_s=1")
    import httpx

    try:
        results: list[httpx.Response] = []

        def one() -> None:
            with httpx.Client(timeout=30) as c:
                for _ in range(5):
                    results.append(c.post(f"{server.base}/recommend", json={"user_id": "u000001", "k": 5}))

        threads = [threading.Thread(target=one) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted({r.status_code for r in results})
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        for r in results:
            if r.status_code == 503:
                assert r.headers["content-type"].startswith(PROBLEM), r.text
                assert r.headers["retry-after"] == "1" and r.json()["status"] == 503
                assert r.elapsed.total_seconds() < 0.5  # rejected at once, not after waiting

        # a request past request_timeout_s (1 s): Serve's 408, answered as 504 problem+json by the HAProxy
        # wrapper, also when the client asks Serve to switch its timeout off (the wrapper drops that header)
        for headers in ("", "x-request-timeout-seconds: 0\r\n"):
            answer, took = _slow_client(server.port, headers)
            assert answer.startswith("HTTP/1.1 504"), answer[:300]
            assert f"content-type: {PROBLEM}" in answer.lower() and json.loads(answer.split("\r\n\r\n", 1)[1])["status"] == 504
            assert 0.9 < took < 5, took  # at the timeout, not at the client's patience
        assert httpx.post(f"{server.base}/recommend", json={"user_id": "u000001", "k": 5}, timeout=30).status_code == 200
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        finally:
            _kill(server)


def test_serve_yaml_gives_serve_run_the_same_ingress_options_as_its_settings():
    """``serve run`` applies the ``deployments:`` block over build_app's options: they must agree."""
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "serve.yaml").read_text())
    (app,) = raw["applications"]
    (block,) = [d for d in app["deployments"] if d["name"] == "Ingress"]
    expected = ingress_options(settings_from(app["args"]["settings"]))
    assert {k: v for k, v in block.items() if k != "name"} == {**expected, "num_replicas": expected.pop("num_replicas")}
    assert raw["http_options"]["request_timeout_s"] == app["args"]["settings"]["request_timeout_s"]
