"""How a Ray that Towerline starts looks from outside: the addresses it listens on, and how it stops.

Listening. ``ray.init()`` on Linux binds its gRPC servers (GCS, raylet, every worker's core worker,
the dashboard agent, Serve's per-replica gRPC server for handle calls) to every interface, whatever
``http_options.host`` says; only the HTTP endpoint honours the host. Two Ray settings change that,
and both are Ray's own single-machine mode (the one it uses on macOS and Windows):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray take 127.0.0.1 as the node address instead of
  resolving ``localhost`` to the machine's routable IP; Ray's C++ servers listen on loopback only when
  the node address is 127.0.0.1, and the dashboard agent, runtime-env agent and metrics exporter bind
  the node address;
- ``include_dashboard=False``: no dashboard server at all (Towerline never used it).

One listener is left: Serve's replica gRPC server binds ``[::]:0`` in code, with no setting. The
``worker_process_setup_hook`` below runs in every Ray worker before it executes anything and
rebinds wildcard gRPC addresses to the serving host (``TOWERLINE_RAY_BIND_HOST``). With a wildcard
host (``0.0.0.0``) nothing is changed; with a specific non-loopback address Ray's C++ servers
still listen on every interface (Ray offers no setting for that) — serve on 127.0.0.1 behind a
reverse proxy, or firewall Ray's ports. ``tests/serving/test_ops.py`` lists the listening sockets of
a running ``towerline serve`` and fails on any that is not loopback.

Stopping. ``ray.init`` installs a SIGTERM handler that exits with status 15 at once, and SIGINT
arrives as ``KeyboardInterrupt`` wherever the main thread happens to be. ``StopSignal`` replaces
both with one flag the serving loop waits on, so a signal leads to the same ordered stop:
``serve.shutdown()`` (replicas finish their requests in flight, up to
``graceful_shutdown_timeout_s``), ``ray.shutdown()``, then ``reap`` for any process of our tree Ray
left behind (HAProxy is started by an actor and can outlive it), and exit status 0.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

BIND_HOST_ENV = "TOWERLINE_RAY_BIND_HOST"
LOCAL_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's loopback-only single-machine mode
SETUP_HOOK = "towerline.serving.lifecycle.bind_worker_servers"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
_WILDCARD_GRPC = ("[::]:", "0.0.0.0:")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, IPv4-mapped loopback (``::ffff:127.0.0.1``) and ``localhost``."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def ray_env(host: str) -> dict[str, str]:
    """The environment a Ray started to serve on ``host`` needs (workers inherit it)."""
    if host in WILDCARD_HOSTS:
        return {}
    env = {BIND_HOST_ENV: host}
    if is_loopback(host):
        env[LOCAL_RAY_ENV] = "0"
    return env


def start_ray(host: str, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """``ray.init`` for a single-machine Ray whose every listener is on ``host`` (when loopback).

    Values already in the environment win (an operator's own Ray settings).
    """
    for key, value in ray_env(host).items():
        os.environ.setdefault(key, value)
    import ray

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ.get(LOCAL_RAY_ENV) == "0":
        constants.ENABLE_RAY_CLUSTER = False  # read at import; Ray may have been imported before the env was set
    options: dict[str, Any] = {"num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": log_to_driver}
    if host not in WILDCARD_HOSTS:
        options["_node_ip_address"] = "127.0.0.1" if is_loopback(host) else host
        options["runtime_env"] = {"worker_process_setup_hook": SETUP_HOOK}
    ray.init(**options)


def bind_worker_servers() -> None:
    """Ray's ``worker_process_setup_hook``: gRPC servers a worker binds to a wildcard address
    (Serve's replica server, ``[::]:0``) bind the serving host instead.

    Patched where Serve's replica module looks the helper up (it imports it by name), and at its
    source for modules imported later.
    """
    host = os.environ.get(BIND_HOST_ENV)
    if not host or host in WILDCARD_HOSTS:
        return
    from ray._common import tls_utils

    original = tls_utils.add_port_to_grpc_server
    if getattr(original, "towerline_host", None) == host:
        return

    def add_port_to_grpc_server(server: Any, address: str) -> int:
        return original(server, rebind(address, host))

    add_port_to_grpc_server.towerline_host = host  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_port_to_grpc_server
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:
        replica.add_port_to_grpc_server = add_port_to_grpc_server


def rebind(address: str, host: str) -> str:
    """``[::]:0`` or ``0.0.0.0:0`` on ``host``; any other address unchanged."""
    for wildcard in _WILDCARD_GRPC:
        if address.startswith(wildcard):
            shown = f"[{host}]" if ":" in host else host
            return f"{shown}:{address[len(wildcard):]}"
    return address


class StopSignal:
    """SIGTERM and SIGINT set one flag instead of exiting where they land.

    Install it after ``ray.init`` (which installs its own SIGTERM handler). A second signal while
    stopping is logged and ignored: the stop already under way is what ends the process cleanly.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: str | None = None

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            log.warning("%s while stopping: already stopping", name)
            return
        self.received = name
        log.info("%s: draining requests in flight, then stopping Serve and Ray", name)
        self.event.set()

    def wait(self) -> str:
        """Block until a signal arrives; returns its name."""
        while not self.event.wait(1.0):  # a timeout keeps the wait interruptible on every platform
            pass
        return self.received or "signal"

    def requested(self) -> bool:
        return self.event.is_set()


def descendants() -> list[int]:
    """PIDs of every process below this one (Ray's GCS, raylet, workers, HAProxy)."""
    import psutil  # Ray ships it (ray/thirdparty_files), so it is importable wherever Ray is

    return [p.pid for p in psutil.Process().children(recursive=True)]


def reap(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """Wait up to ``timeout_s`` for ``pids`` to exit, then SIGKILL what is left; returns those killed.

    ``ray.shutdown()`` stops what it started, but a process started by an actor (HAProxy) or a worker
    slow to exit can outlive it by seconds; a server that says it stopped must leave nothing behind.
    """
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    killed = []
    for p in alive:
        try:
            log.warning("pid %d (%s) still running after shutdown: killing it", p.pid, p.name())
            p.kill()
            killed.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=2.0)
    return killed
