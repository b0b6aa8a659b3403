"""How much work an ingress replica takes on, and what everyone else hears: the Serve options of the
ingress deployment and the HTTP options, derived from ``ServeSettings`` in one place.

Why bounded: a closed queue in front of a CPU-bound replica only adds waiting. Each ingress replica
works on ``max_ongoing_requests`` requests at once (enough to fill a ``serve.batch`` of the model
stages), lets ``max_queued_requests`` more wait, and answers the rest at once with 503 and
``Retry-After`` (Serve's own check, before any application code runs, so a rejection costs
microseconds, not a request's worth of CPU). Under 64 clients on 2 cores the accepted requests then
wait behind at most ``ingress_replicas * (max_ongoing + max_queued)`` others instead of 63
(``bench/chaos.py`` measures both).

Serve writes that 503 (and its 408 for ``request_timeout_s``) as plain text. Through HAProxy, the
default ingress, ``towerline.serving.ingress`` rewrites them to RFC 9457 problem+json (the timeout as
504, which is what it is: the gateway gave up on the replica). Serve's Python proxy
(``--ingress proxy``) has no such hook: there the bodies stay Serve's text, with the same status
codes and Retry-After, except the timeout, which it reports as 408.

Replica loss: two ingress replicas by default, health-checked every ``health_check_period_s`` by
Serve's controller (which replaces a dead one) and every second by HAProxy, which also retries a
request whose connection failed on the other replica (``ray_serve_env``).
"""

from __future__ import annotations

from typing import Any

from towerline.serving.settings import ServeSettings


def ingress_options(s: ServeSettings) -> dict[str, Any]:
    """``Ingress.options(...)``: replicas, bounded queues, health checks, graceful stop."""
    return {
        "num_replicas": s.ingress_replicas,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        # a stopping replica checks every half second whether its requests are done, up to the timeout
        "graceful_shutdown_wait_loop_s": min(0.5, s.graceful_shutdown_timeout_s) or 0.1,
        "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
    }


def haproxy_limits(s: ServeSettings) -> dict[str, Any]:
    """``use_ingress(..., **haproxy_limits(s))``: HAProxy itself sends each replica at most
    ``max_ongoing_requests`` at once and sheds what waited ``haproxy_queue_ms`` in its queue.

    Why in HAProxy: Serve's own check runs on the replica's event loop, which is busy running model
    batches, so under 64 clients its 503 waited for a batch (55 ms median, ``bench/chaos.py``);
    HAProxy answers from its queue, in C, without touching the replica. Serve's
    ``max_queued_requests`` (8) stays as the slack for the requests HAProxy counts as done a moment
    before the replica releases their slot (with 2, Serve answered 1-3% 503s to 8 clients while the
    loop was busy with a reload or a replica start), and as the bound behind Serve's proxy.
    """
    if s.max_queued_requests < 0:  # unbounded queues: nothing to shed
        return {"per_replica": None, "queue_ms": 0}
    return {"per_replica": s.max_ongoing_requests, "queue_ms": s.haproxy_queue_ms}


def http_options(s: ServeSettings) -> dict[str, Any]:
    """``serve.start(http_options=...)``: where to listen, and when a request has taken too long."""
    return {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s}


def use_ingress_for(settings: ServeSettings, ingress: Any, host: str = "127.0.0.1") -> None:
    """Pick the front door for the Ray cluster about to start, with this server's limits.

    The one call the CLI and the benchmarks make, so a benchmark measures the shedding the product
    ships (``haproxy_limits``) and not HAProxy without it. Must run before ``ray.serve`` is imported.
    """
    from towerline.serving.ingress import use_ingress

    use_ingress(ingress, host, settings.retry_after_s, **haproxy_limits(settings))
