"""``towerline index | serve``: build a FAISS index for a model, run the Ray Serve application."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from towerline.serving.ingress import DEFAULT_INGRESS, INGRESS_KINDS

log = logging.getLogger(__name__)

INDEX_EXAMPLE = """example:
  towerline index --model runs/latest/bundle                        # exact, written to the bundle's index/
  towerline index --model models:/towerline-retriever@champion --kind hnsw --out indexes/champion
  towerline index --model runs/beauty/bundle --kind ivf --nprobe 32
  towerline index --model models:/towerline-retriever@champion --target-recall 0.98   # HNSW or IVF-PQ, measured

HNSW and IVF print their recall@10 against exact search (queries: user vectors of sampled users)
and both indexes' queries per second. --target-recall searches HNSW (M, efSearch) and IVF with
fast-scan PQ and exact re-ranking (nprobe, re-ranked list length) for the fastest index on one
thread whose recall@10 meets the target: chosen on half the sampled users, measured on the other
half; the manifest records the figures and every setting tried. A target no setting reaches is an
error (exit 2) naming the best recall reached: nothing is written."""

SERVE_EXAMPLE = """example:
  towerline serve --model runs/latest/bundle
  towerline serve --model models:/towerline-retriever@champion --port 8080
  towerline serve --model runs/latest/bundle --check      # start, ask once, print, stop
  towerline serve --model runs/latest/bundle --ingress proxy     # Serve's Python proxy instead of HAProxy
  towerline serve --model runs/latest/bundle --set max_queued_requests=16 --set request_timeout_s=5

  curl -s localhost:8000/recommend -H 'content-type: application/json' -d '{"user_id": "u000001", "k": 5}'
  Interactive API docs: http://127.0.0.1:8000/docs
The same application from a config file:  serve run configs/serve.yaml"""


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("index", help="build a FAISS index (flat, HNSW, IVF) over a model's item embeddings",
                       description="Build an inner-product FAISS index over a bundle's item embeddings and write it "
                       "atomically with manifest.json (dim, metric, count, kind, model name/version, sha256).",
                       epilog=INDEX_EXAMPLE, formatter_class=fmt)
    p.add_argument("--model", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias>")
    p.add_argument("--kind", choices=["flat", "hnsw", "ivf"], default=None,
                   help="flat = exact (default: the model config's index.kind, flat unless set)")
    p.add_argument("--out", type=Path, default=None,
                   help="index folder (default: <bundle>/index for a bundle directory, else indexes/<name>-v<version>)")
    p.add_argument("--hnsw-m", type=int, default=None, help="HNSW graph degree (default: index.hnsw_m = 32)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: 128)")
    p.add_argument("--hnsw-storage", choices=["flat", "sq8"], default=None,
                   help="HNSW vectors: flat floats, or 8-bit codes re-scored exactly (faster for millions of items; "
                   "default: flat)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about 4*sqrt(items))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default: 16)")
    p.add_argument("--queries", type=int, default=1000, help="sampled users for the recall measurement (default: 1000)")
    p.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="pick the ANN parameters for recall@10 >= R (0 < R <= 1) by measuring; flags given fix their field")
    p.add_argument("--threads", type=int, default=1, help="FAISS threads for the measured searches (default: 1)")
    p.add_argument("--build-threads", type=int, default=None, help="FAISS threads for building (default: --threads)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("serve", help="serve recommendations over HTTP with Ray Serve",
                       description="Start Ray locally and run the Towerline application (ingress, retriever, "
                       "ranker) on --host:--port until Ctrl-C.", epilog=SERVE_EXAMPLE, formatter_class=fmt)
    p.add_argument("--model", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias>")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default: 127.0.0.1). Any other host needs an API token, which writes and "
                   "/admin/* then require as 'Authorization: Bearer <token>': TOWERLINE_API_TOKEN in the environment "
                   "(or api_token_file in configs/serve.yaml for serve run); without one, writes are open to this machine only")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--index", dest="index_dir", default=None, help="index folder (default: the bundle's index/, else exact)")
    p.add_argument("--history-db", default="towerline_history.sqlite", help="SQLite file of the online event history")
    p.add_argument("--history-redis-url", default=None, metavar="URL",
                   help="keep the online event history in Redis (redis://host:6379/0) so several machines "
                   "share it; needs pip install 'towerline[redis]' (default: the SQLite file --history-db)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use (default: 2)")
    p.add_argument("--ingress", choices=INGRESS_KINDS, default=DEFAULT_INGRESS,
                   help="Ray Serve's front door: HAProxy with direct ingress to the replica (default: Ray's "
                   "high-throughput mode, no proxy hop, the body read in the replica; its metrics and stats pages "
                   "listen on --host, on free ports unless RAY_SERVE_HAPROXY_METRICS_PORT / "
                   "RAY_SERVE_HAPROXY_STATS_PORT are set), or Serve's Python proxy")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the retriever and of the ranker (default: 1)")
    p.add_argument("--ingress-replicas", type=int, default=None,
                   help="HTTP ingress replicas (default: 2, or 1 on a one-core machine): a killed replica is not an "
                   "outage. Admin writes (/admin/reload, /admin/items) reach every replica")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any serve setting (towerline.serving.settings.ServeSettings), e.g. max_queued_requests=8, "
                   "request_timeout_s=5 (repeatable)")
    p.add_argument("--max-per-category", type=int, default=None, help="diversity cap per category (default: none)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.add_argument("--config", type=Path, default=None, help="Towerline YAML whose experiments: list defines the A/B arms")
    p.add_argument("--experiment", default=None, help="experiment (from --config) whose arms /recommend assigns")
    p.add_argument("--profiles", default=None, help="profiles Parquet from `towerline profile` for /users/{id}/profile")
    p.add_argument("--feedback-db", default="towerline_feedback.sqlite", help="SQLite file of A/B feedback")
    p.add_argument("--check", action="store_true",
                   help="start, send one /recommend request for a user of the model, print the answer, stop")
    p.set_defaults(func=cmd_serve)


def _tracking(uri: str | None) -> None:
    if uri:
        import os

        import mlflow

        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)


def cmd_index(args: argparse.Namespace) -> int:
    from towerline.bundle import check_model

    _tracking(args.tracking_uri)
    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        print(f"error: --target-recall must be in (0, 1], got {args.target_recall}", file=sys.stderr)
        return 2
    check_model(args.model)  # a wrong --model is one line now, not a traceback after loading torch
    overrides = {name: value for name, value in (("hnsw_m", args.hnsw_m), ("hnsw_ef_search", args.ef_search),
                                                 ("hnsw_storage", args.hnsw_storage),
                                                 ("ivf_nlist", args.nlist), ("ivf_nprobe", args.nprobe))
                 if value is not None}
    from towerline.features.vocab import N_RESERVED
    from towerline.serving.model_index import build_model_index

    if args.kind is not None:
        overrides["kind"] = args.kind
    report = build_model_index(args.model, args.out, overrides, args.queries, args.threads,
                               target_recall=args.target_recall, build_threads=args.build_threads)
    print(f"{report['kind']} index over {report['count'] - N_RESERVED} items (dim {report['dim']}) built in {report['build_s']:.2f} s, "
          f"{report['memory_bytes'] / 2**20:.1f} MiB")
    if "tuning" in report:
        chosen = report["tuning"]["chosen"]
        print(f"chosen for recall@10 >= {args.target_recall}: {chosen['kind']} {chosen['build']} {chosen['params']} "
              f"({len(report['tuning']['tried'])} settings tried on {report['tuning']['tune_users']} users)")
    if "qps" in report:
        print(f"recall@10 vs exact: {report['recall_at_10']:.4f} on {report['n_queries']} {'held-out' if 'tuning' in report else 'sampled'} users; "
              f"{report['qps']:.0f} queries/s vs exact {report['exact_qps']:.0f} ({report['speedup']:.1f}x)")
    print(f"written: {report['out']}  (load with: towerline serve --model {args.model} --index {report['out']})")
    return 0


def _sample_user(model: str) -> str:
    from towerline.training.bundle import load_bundle

    b = load_bundle(model)
    if b.histories is not None and len(b.histories):
        return str(b.vocabs.users.decode([b.histories.user_idx[0]])[0])
    return "anonymous"


_FRONT_DOORS = {"haproxy": "HAProxy", "proxy": "the Serve proxy"}


def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout_s: float = 60.0) -> tuple[int, Any]:
    """``(status, parsed JSON body)`` of one request, with the standard library only: ``serve --check``
    and the quickstart must work from a plain ``pip install -e .``, without the test extra's httpx.
    An HTTP error status is returned, not raised; a connection failure raises ``OSError``."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # our own server: never via $http_proxy
    try:
        with direct.open(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:  # 4xx/5xx still carry a JSON body worth printing
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def _wait_healthy(base: str, timeout_s: float = 30.0) -> None:
    """Until ``/healthz`` answers 200: ``serve.run`` returns once the replicas are up, but HAProxy
    starts routing to a new replica only after its next health check."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if _http("GET", f"{base}/healthz", timeout_s=5)[0] == 200:
                return
        except OSError:  # refused, reset or timed out: not up yet
            pass
        if time.monotonic() > deadline:
            return  # the request that follows reports what is wrong
        time.sleep(0.2)


class _DropMisleading(logging.Filter):
    """Ray Serve's "Connecting to existing Serve app ... New http_options ... will not be applied":
    ``serve.run`` after our ``serve.start`` logs it, though the options were applied by that start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not be applied" not in record.getMessage()


def _quiet_ray_logs() -> None:
    """Silence Ray's driver-side noise at its loggers, unless ``towerline -v`` asked for everything.

    Called after ``import ray`` (which sets the ``ray`` logger to INFO) and before ``ray.init``.

    The token-auth warning (``ray._private.authentication``) is about clusters reachable over a
    network; this one is started for one local app and stopped with it.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # "Started a local Ray instance" (ray.init resets the "ray" logger's level, not a child's),
    # "Started Serve", "Application ... is ready"
    for name in ("ray._private.worker", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _DropMisleading) for f in serve_logger.filters):
        serve_logger.addFilter(_DropMisleading())


def serve_locally(
    app_args: Any, host: str, port: int, num_cpus: int | None = None, check_request: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Start Ray and the Serve app on ``host:port``; with ``check_request``, POST it to /recommend,
    stop everything and return the answer, else serve until SIGTERM or SIGINT (Ctrl-C).

    Every way out takes the same path (``towerline.serving.lifecycle``): Serve drains the requests in
    flight and stops, Ray stops, and any process of ours still running a few seconds later is
    killed, so the command exits 0 with nothing left behind.
    """
    import ray
    from ray import serve

    from towerline.serving.app import build_app
    from towerline.serving.ingress import active_ingress, haproxy_addresses
    from towerline.serving.lifecycle import StopSignal, descendants, reap, start_ray
    from towerline.serving.shedding import http_options

    _quiet_ray_logs()
    start_ray(host, num_cpus, log_to_driver=check_request is None)  # every Ray listener on the host
    stop = StopSignal()
    if threading.current_thread() is threading.main_thread():
        stop.install()  # after ray.init, which installs a SIGTERM handler that exits with status 15
    try:
        serve.start(http_options={**http_options(app_args.settings), "host": host, "port": port})
        serve.run(build_app(app_args), name="towerline", route_prefix="/")
        base = f"http://{host}:{port}"
        door = _FRONT_DOORS[active_ingress() or "proxy"]
        print(f"serving {app_args.model} at {base} through {door}  (API docs: {base}/docs; Ctrl-C stops)", flush=True)
        if extra := haproxy_addresses(host):
            print(f"HAProxy stats {extra['stats']}, metrics {extra['metrics']}", flush=True)
        if check_request is not None:
            _wait_healthy(base)
            status, body = _http("POST", f"{base}/recommend", check_request)
            print(f"POST /recommend {json.dumps(check_request)} -> HTTP {status}")
            return {"status": status, "body": body}
        print(f"{stop.wait()}: stopping (requests in flight finish first)", flush=True)
        # Serve's shutdown stops the replicas and the proxy at once, so a request that reached the proxy
        # just before the signal could find no replica left and be cut off: answer for drain_s first
        time.sleep(app_args.settings.drain_s)
        return None
    except KeyboardInterrupt:  # Ctrl-C before the handler was installed
        print("stopping", flush=True)
        return None
    finally:
        started = time.monotonic()
        ours = descendants()  # before Ray stops: afterwards its processes are no longer ours to find
        serve.shutdown()
        ray.shutdown()
        killed = reap(ours)
        print(f"stopped in {time.monotonic() - started:.1f} s" + (f" ({len(killed)} processes killed)" if killed else ""),
              flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from towerline.bundle import check_model
    from towerline.serving.settings import settings_from

    # flags first, then the model, both before Ray: a bad flag or a wrong --model is one line naming
    # it (ConfigError/BundleError), not a pydantic trace or a replica's traceback
    from towerline.config import apply_overrides

    flags = {"host": args.host, "port": args.port, "history_db": args.history_db, "feedback_db": args.feedback_db,
             "history_redis_url": args.history_redis_url, "retriever_replicas": args.replicas,
             "ranker_replicas": args.replicas, "max_per_category": args.max_per_category}
    overrides = apply_overrides({}, args.overrides)
    if args.ingress_replicas is not None:
        overrides["ingress_replicas"] = args.ingress_replicas
    elif "ingress_replicas" not in overrides and (os.cpu_count() or 1) < 2:
        overrides["ingress_replicas"] = 1  # two replicas on one core only share it
    settings = settings_from(flags, **overrides)
    _tracking(args.tracking_uri)
    check_model(args.model)
    if settings.campaigns:  # a campaign that is missing, misspelt or not immediate: one line, before Ray
        from towerline.serving.campaign_triggers import load_immediate_campaigns

        load_immediate_campaigns(settings)
    # before anything imports ray.serve: Ray reads it at import time
    from towerline.serving.shedding import use_ingress_for

    use_ingress_for(settings, args.ingress, args.host)
    from towerline.config import load_config, to_dict
    from towerline.serving.app import AppArgs

    experiments = to_dict(load_config(args.config))["experiments"] if args.config else []
    app_args = AppArgs(model=args.model, index_dir=args.index_dir, tracking_uri=args.tracking_uri, settings=settings,
                       experiments=experiments, experiment=args.experiment, profiles=args.profiles)
    check = {"user_id": _sample_user(args.model), "k": 5} if args.check else None
    answer = serve_locally(app_args, args.host, args.port, args.num_cpus, check)
    if answer is not None:
        print(json.dumps(answer["body"], indent=2))
        return 0 if answer["status"] == 200 else 1
    return 0
