"""HTTP load on the Ray Serve app against a trivial Serve handler, plus in-process recommend latency.

The issue's targets (Beauty model, 8 concurrent clients, 30 s each, one Serve instance on 127.0.0.1):

- ``POST /recommend`` throughput >= 0.7x the trivial handler's;
- ``POST /recommend`` p99 <= the trivial handler's p99 + 30 ms;
- in-process ``Recommender.recommend`` (user tower + exact FAISS + rules, no HTTP) p50 <= 2 ms.

Both HTTP targets run in one Serve instance: the Towerline app at ``/`` and a trivial deployment
(returns a constant JSON, no model) at ``/trivial``, so proxy, HTTP parsing and the machine are the
same and the difference is what the application adds. A second trivial handler at
``/trivial-body`` also parses the request's JSON body: Ray Serve's proxy hands the body to a
replica only when the replica asks for it (an actor call back to the proxy, about 3 ms of CPU per
request on 2 cores), so a handler that never reads its request skips a cost every real POST
handler pays. Ratios against both are reported; the targets are checked against ``/trivial``. Clients are 8 asyncio tasks over one
``httpx.AsyncClient`` each sending its next request when the previous one answers (closed loop);
each phase runs ``--seconds`` in all, split into ``--rounds`` slices taken in turn (trivial,
trivial-body, recommend, trivial, ...), each after a short warm-up, so a noisy neighbour on a shared
machine slows every phase alike instead of one. Users are sampled from the model's training users, so
most requests take the personalised path (user tower + FAISS + ranker + rules).

``--ingress haproxy`` puts Ray Serve's HAProxy ingress in front of all three handlers
(``towerline.serving.ingress``): no Python proxy hop and no body call-back, so every handler gets
faster and the trivial one most of all. The ratio targets compare the application with Serve's own
overhead; absolute throughput and latency are what a caller of ``/recommend`` gets, so both
ingresses are recorded.

In process, ``Recommender.recommend`` is timed twice when the bundle has a trained ranker: the
issue's pipeline (user tower + exact FAISS + rules, ``rank_stage=never``) and with the ranker.

    python bench/serve_load.py --model runs/beauty/bundle              # the target run
    python bench/serve_load.py --model runs/latest/bundle --seconds 5  # a quick look
    python bench/serve_load.py --model runs/beauty/bundle --set rank_stage=never  # retrieval + rules only
    python bench/serve_load.py --model runs/beauty/bundle --ingress haproxy       # Ray Serve's HAProxy ingress

``--compare-plain`` measures the Towerline app (default ingress: HAProxy) against the peer a team
would write first: a plain FastAPI app in one uvicorn process over the same in-process
``Recommender`` (``bench/plain_app.py``), the two interleaved round by round in one run; target: the
Serve app >= 3x the plain app's throughput with a p99 no higher. ``--client wrk`` drives the load
with wrk (C; ``apt-get install -y wrk``; a generated Lua script POSTs the bodies in turn) so the
client does not eat the server's CPU; its p99 per phase is the median of the slices' p99s.

    python bench/serve_load.py --model runs/beauty/bundle --client wrk --compare-plain

Writes ``bench/results/serve_load.json`` (``serve_load_vs_plain.json`` with ``--compare-plain``) with
the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from towerline.serving.ingress import DEFAULT_INGRESS, INGRESS_KINDS  # no Ray: the ingress is chosen before Ray loads

log = logging.getLogger("bench.serve_load")

TARGET_THROUGHPUT_RATIO = 0.7
TARGET_P99_EXTRA_MS = 30.0
TARGET_INPROCESS_P50_MS = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle directory, runs:/... or models:/name@alias")
    p.add_argument("--seconds", type=float, default=30.0, help="duration of each HTTP phase (default 30)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each slice (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="slices per phase, taken in turn with the other phases (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="serve setting for the app and the in-process run, e.g. rank_stage=never (repeatable)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ingress", choices=INGRESS_KINDS, default=DEFAULT_INGRESS,
                   help=f"Ray Serve's front door for all handlers (towerline serve --ingress; default {DEFAULT_INGRESS})")
    p.add_argument("--client", choices=["httpx", "wrk"], default="httpx",
                   help="load generator: asyncio httpx clients in this process, or wrk (C, apt-get install wrk), "
                   "which leaves the cores to the server (default httpx)")
    p.add_argument("--compare-plain", action="store_true",
                   help="measure /recommend against a plain FastAPI + uvicorn process over the same Recommender "
                   "(bench/plain_app.py) instead of the trivial handlers, interleaved round by round")
    p.add_argument("--num-cpus", type=int, default=min(2, os.cpu_count() or 1), help="CPUs for Ray (default 2)")
    p.add_argument("--inprocess-calls", type=int, default=2000, help="in-process recommend calls (default 2000)")
    p.add_argument("--users", type=int, default=1000, help="distinct users to sample (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "serve_load.json")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    if not len(ms):
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


async def closed_loop(url: str, bodies: list[dict[str, Any]], clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """``clients`` tasks, each POSTing back to back until the deadline; bounded by time, not count.

    Returns the slice's raw latencies (seconds), error count and measured wall time; ``merge``
    pools the slices of one phase.
    """
    import httpx

    latencies: list[float] = []
    errors = 0
    measuring = False

    async def client(i: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=30.0) as c:
            n = i
            while time.perf_counter() < deadline:
                body = bodies[n % len(bodies)]
                n += clients
                t0 = time.perf_counter()
                try:
                    r = await c.post(url, json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if measuring:
                    latencies.append(time.perf_counter() - t0)
                    errors += 0 if ok else 1

    deadline = time.perf_counter() + warmup
    await asyncio.gather(*(client(i) for i in range(clients)))
    measuring = True
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - start}


def merge(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's figures over its slices: requests / total measured seconds, pooled percentiles."""
    latencies = [x for sl in slices for x in sl["latencies"]]
    seconds = sum(sl["seconds"] for sl in slices)
    return {"requests": len(latencies), "errors": sum(sl["errors"] for sl in slices), "seconds": round(seconds, 3),
            "throughput_rps": len(latencies) / seconds, **percentiles(latencies),
            "slice_rps": [round(len(sl["latencies"]) / sl["seconds"], 1) for sl in slices]}


WRK_LUA = """-- written by bench/serve_load.py: POST the bodies in turn, JSON
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
"""
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk_slice(url: str, bodies: list[dict[str, Any]], clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One slice with wrk (one thread, ``clients`` connections): requests/s, p50/p99 and non-2xx
    from its ``--latency`` report. wrk cannot pool raw latencies across slices; ``merge_wrk`` takes
    the median of the slices' percentiles."""
    import re
    import shutil
    import subprocess

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("--client wrk: wrk is not installed (apt-get install -y wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA % ", ".join(f"[==[{json.dumps(b)}]==]" for b in bodies))
        script = f.name
    try:
        def run(duration: float) -> str:
            cmd = [wrk, "-t1", f"-c{clients}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s",
                   "-s", script, url]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout

        if warmup > 0:
            run(warmup)
        out = run(seconds)
    finally:
        os.unlink(script)
    lat = {q: float(v) * _WRK_UNITS[u] for q, v, u in re.findall(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    secs = float(total[2]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total[3]]
    return {"requests": int(total[1]), "seconds": secs, "p50_ms": lat.get("50"), "p99_ms": lat.get("99"),
            "errors": (int(non2xx[1]) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0)}


def merge_wrk(slices: list[dict[str, Any]]) -> dict[str, Any]:
    requests, seconds = sum(sl["requests"] for sl in slices), sum(sl["seconds"] for sl in slices)
    return {"requests": requests, "errors": sum(sl["errors"] for sl in slices), "seconds": round(seconds, 3),
            "throughput_rps": requests / seconds,
            "p50_ms": float(np.median([sl["p50_ms"] for sl in slices])),
            "p99_ms": float(np.median([sl["p99_ms"] for sl in slices])), "mean_ms": None,
            "slice_rps": [round(sl["requests"] / sl["seconds"], 1) for sl in slices],
            "slice_p99_ms": [sl["p99_ms"] for sl in slices]}


def start_plain_peer(model: str, port: int) -> Any:
    """``bench/plain_app.py`` as a subprocess on 127.0.0.1:``port``, once it answers /healthz."""
    import subprocess
    import urllib.request

    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("plain_app.py")), "--model", model,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"plain peer exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("plain peer did not start in 120 s")


def in_process(model: str, users: list[str], calls: int, k: int, settings: Any) -> dict[str, Any]:
    """p50/p99 of ``Recommender.recommend`` with one torch/FAISS thread, after 50 warm-up calls."""
    import faiss
    import torch

    from towerline.serving.history import SQLiteHistoryStore
    from towerline.serving.recommender import Recommender, load_model

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteHistoryStore(Path(tmp) / "history.sqlite")
        rec = Recommender(load_model(model, settings), settings, store)
        for u in users[:50]:
            rec.recommend(u, k)
        latencies = []
        for i in range(calls):
            t0 = time.perf_counter()
            rec.recommend(users[i % len(users)], k)
            latencies.append(time.perf_counter() - t0)
        store.close()
        return {"calls": calls, "items": rec.state.n_items, "index": rec.state.index_kind,
                "ranker": rec.state.ranker is not None, **percentiles(latencies)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a log line per request would load the client, not the server
    args = parse_args(argv)
    from towerline.config import apply_overrides
    from towerline.errors import TowerlineError
    from towerline.serving.settings import settings_from
    from towerline.serving.shedding import use_ingress_for

    try:
        overrides = apply_overrides({}, args.overrides)
        settings = settings_from(overrides)
    except TowerlineError as e:
        raise SystemExit(f"serve_load: {e}") from None
    use_ingress_for(settings, args.ingress)  # before ray.serve is imported; the limits `towerline serve` sets
    import ray
    from ray import serve

    from towerline.serving.lifecycle import start_ray
    from towerline.training.bundle import load_bundle
    from towerline.serving.app import AppArgs, build_app

    bundle = load_bundle(args.model)
    if bundle.histories is None or not len(bundle.histories):
        raise SystemExit(f"{args.model} has no histories.npz: retrain it with the current towerline to benchmark users")
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(len(bundle.histories), size=min(args.users, len(bundle.histories)), replace=False)
    users = [str(u) for u in bundle.vocabs.users.decode(bundle.histories.user_idx[rows])]
    bodies = [{"user_id": u, "k": args.k} for u in users]

    log.info("in-process recommend: %d calls", args.inprocess_calls)
    inproc = in_process(args.model, users, args.inprocess_calls, args.k, settings)
    # the in-process target is the pipeline without the ranker stage (user tower + FAISS + rules)
    inproc_retrieval = inproc if not inproc["ranker"] else in_process(
        args.model, users, args.inprocess_calls, args.k, settings.model_copy(update={"rank_stage": "never"}))

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
    class Trivial:
        async def __call__(self, request: Any) -> dict[str, Any]:
            return {"items": [], "model_version": None, "arm": "default", "fallback": False}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
    class TrivialBody:
        async def __call__(self, request: Any) -> dict[str, Any]:
            await request.json()  # what every real POST handler pays: the body fetched from the proxy
            return {"items": [], "model_version": None, "arm": "default", "fallback": False}

    port = free_port()
    results: dict[str, Any] = {}
    peer = start_plain_peer(args.model, free_port()) if args.compare_plain else None
    with tempfile.TemporaryDirectory() as tmp:
        start_ray("127.0.0.1", args.num_cpus, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            if not args.compare_plain:
                serve.run(Trivial.bind(), name="trivial", route_prefix="/trivial")
                serve.run(TrivialBody.bind(), name="trivial-body", route_prefix="/trivial-body")
            app_args = AppArgs(model=args.model, settings={**overrides, "history_db": str(Path(tmp) / "history.sqlite"),
                                                                "feedback_db": str(Path(tmp) / "feedback.sqlite")})
            serve.run(build_app(app_args), name="towerline", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            phases = (("trivial", f"{base}/trivial"), ("trivial_body", f"{base}/trivial-body"),
                      ("recommend", f"{base}/recommend"))
            if peer is not None:
                phases = (("plain", f"http://127.0.0.1:{peer.args[-1]}/recommend"), ("recommend", f"{base}/recommend"))
            cmd_serve_wait(base)  # HAProxy routes only after its first health check
            slices: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in phases}
            for r in range(args.rounds):
                for name, url in phases:
                    log.info("round %d/%d, %s: %d clients for %.1f s", r + 1, args.rounds, name, args.clients,
                             args.seconds / args.rounds)
                    if args.client == "wrk":
                        sl = wrk_slice(url, bodies, args.clients, args.seconds / args.rounds, args.warmup)
                        log.info("%s: %.1f req/s, p99 %.1f ms", name, sl["requests"] / sl["seconds"], sl["p99_ms"])
                    else:
                        sl = asyncio.run(closed_loop(url, bodies, args.clients, args.seconds / args.rounds, args.warmup))
                        log.info("%s: %.1f req/s", name, len(sl["latencies"]) / sl["seconds"])
                    slices[name].append(sl)
            results = {name: (merge_wrk if args.client == "wrk" else merge)(sls) for name, sls in slices.items()}
        finally:
            serve.shutdown()
            ray.shutdown()
            if peer is not None:
                peer.terminate()
                peer.wait(30)

    if args.compare_plain:
        return report_compare(args, argv, bundle, overrides, results, inproc)
    trivial, trivial_body, recommend = results["trivial"], results["trivial_body"], results["recommend"]
    report = {
        "model": args.model,
        "model_name": bundle.model_name,
        "model_version": bundle.model_version,
        "items": int(bundle.item_embeddings.shape[0]),
        "ingress": args.ingress,
        "clients": args.clients,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "settings": overrides,
        "ranker": inproc["ranker"],
        "trivial": trivial,
        "trivial_body": trivial_body,
        "recommend": recommend,
        "in_process": inproc,
        "in_process_without_ranker": inproc_retrieval,
        "throughput_ratio": recommend["throughput_rps"] / trivial["throughput_rps"],
        "p99_extra_ms": recommend["p99_ms"] - trivial["p99_ms"],
        "throughput_ratio_vs_trivial_body": recommend["throughput_rps"] / trivial_body["throughput_rps"],
        "p99_extra_ms_vs_trivial_body": recommend["p99_ms"] - trivial_body["p99_ms"],
        "target": {"throughput_ratio": TARGET_THROUGHPUT_RATIO, "p99_extra_ms": TARGET_P99_EXTRA_MS,
                   "in_process_p50_ms": TARGET_INPROCESS_P50_MS},
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews latency
        "machine": platform.platform(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    report["met"] = {
        "throughput_ratio": report["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO,
        "p99_extra_ms": report["p99_extra_ms"] <= TARGET_P99_EXTRA_MS,
        "in_process_p50_ms": inproc_retrieval["p50_ms"] <= TARGET_INPROCESS_P50_MS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"trivial      : {trivial['throughput_rps']:8.1f} req/s  p50 {trivial['p50_ms']:6.1f} ms  p99 {trivial['p99_ms']:6.1f} ms")
    print(f"trivial-body : {trivial_body['throughput_rps']:8.1f} req/s  p50 {trivial_body['p50_ms']:6.1f} ms  "
          f"p99 {trivial_body['p99_ms']:6.1f} ms")
    print(f"recommend    : {recommend['throughput_rps']:8.1f} req/s  p50 {recommend['p50_ms']:6.1f} ms  p99 {recommend['p99_ms']:6.1f} ms"
          f"  errors {recommend['errors']}")
    print(f"ratio {report['throughput_ratio']:.2f} (target >= {TARGET_THROUGHPUT_RATIO}), p99 extra "
          f"{report['p99_extra_ms']:.1f} ms (target <= {TARGET_P99_EXTRA_MS})")
    print(f"in-process p50 {inproc_retrieval['p50_ms']:.2f} ms without the ranker (target <= {TARGET_INPROCESS_P50_MS}) "
          f"over {inproc['items']} items" + (f"; {inproc['p50_ms']:.2f} ms with it" if inproc["ranker"] else ""))
    print(f"against the handler that reads its body: ratio {report['throughput_ratio_vs_trivial_body']:.2f}, "
          f"p99 extra {report['p99_extra_ms_vs_trivial_body']:.1f} ms")
    print(f"written: {args.out}")
    return 0


def cmd_serve_wait(base: str, timeout_s: float = 60.0) -> None:
    """Until ``/healthz`` answers 200 (HAProxy routes to a replica only after its first health check)."""
    from towerline.commands.serve import _wait_healthy

    _wait_healthy(base, timeout_s)


TARGET_VS_PLAIN = 3.0  # the default ingress serves >= 3x the plain single process, p99 no higher


def report_compare(args: argparse.Namespace, argv: list[str] | None, bundle: Any, overrides: dict[str, Any],
                   results: dict[str, Any], inproc: dict[str, Any]) -> int:
    """``--compare-plain``: the Serve app (``--ingress``) against the plain FastAPI + uvicorn process."""
    plain, recommend = results["plain"], results["recommend"]
    report = {
        "model": args.model, "model_name": bundle.model_name, "model_version": bundle.model_version,
        "items": int(bundle.item_embeddings.shape[0]), "ingress": args.ingress, "client": args.client,
        "clients": args.clients, "seconds_per_phase": args.seconds, "rounds": args.rounds, "settings": overrides,
        "plain_fastapi_uvicorn": plain, "towerline": recommend, "in_process": inproc,
        "throughput_ratio_vs_plain": recommend["throughput_rps"] / plain["throughput_rps"],
        "p99_ratio_vs_plain": recommend["p99_ms"] / plain["p99_ms"],
        "target": {"throughput_ratio_vs_plain": TARGET_VS_PLAIN, "p99_ratio_vs_plain": 1.0},
        "cpu_count": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.platform(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    report["met"] = {"throughput_ratio_vs_plain": report["throughput_ratio_vs_plain"] >= TARGET_VS_PLAIN,
                     "p99_ratio_vs_plain": report["p99_ratio_vs_plain"] <= 1.0}
    out = args.out if args.out.name != "serve_load.json" else args.out.with_name("serve_load_vs_plain.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in (("plain FastAPI", plain), (f"towerline ({args.ingress})", recommend)):
        print(f"{name:22s}: {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
              f"errors {r['errors']}")
    print(f"ratio {report['throughput_ratio_vs_plain']:.2f}x (target >= {TARGET_VS_PLAIN}), p99 ratio "
          f"{report['p99_ratio_vs_plain']:.2f} (target <= 1)\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
