"""Chaos under load against a real ``towerline serve`` on 127.0.0.1: a replica killed, overload, rollback.

Each scenario starts the server as a subprocess (the default ingress unless ``--ingress``), drives
it with closed-loop asyncio clients for a bounded time, and records per request its start, end,
status and ``model_version``:

- **replica SIGKILL** (8 clients): one ingress replica is killed with SIGKILL a third of the way in;
  figures: failed requests (anything but 200), the longest gap between two completed requests, and
  how long Serve took to have two replicas again. Targets: <= 1% failed, no gap over 2 s.
- **overload** (8 then 64 clients): the 8-client p99 first, then 64 clients. Clients honour
  ``Retry-After`` (capped at 1 s), as a well-behaved caller does; figures: share of 503s, p99 of the
  accepted requests against the 8-client p99 (target <= 3x), p99 and max time to a 503 (target < 50 ms).
- **rollback** (8 clients): ``champion`` is moved back to the older registered version with
  ``towerline promote`` and ``POST /admin/reload`` (no body: re-resolves the start URI) is sent until
  every reply names it; figures: failed requests (target 0), versions seen, requests without a version.
- **fuzz**: totals by status code, when the fuzz helper exists (a TODO in the JSON until then).

The bundle: ``--model`` for the first two; the rollback needs a registry with two versions, so the
script trains the tiny test config twice into ``--workdir`` (about a minute each here) unless
``--skip-rollback``. Everything binds 127.0.0.1 and every loop is bounded in time.

    python bench/chaos.py --model runs/latest/bundle              # all scenarios
    python bench/chaos.py --model runs/latest/bundle --seconds 10 --skip-rollback

Writes ``bench/results/chaos.json`` with the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.chaos")
REPO = Path(__file__).resolve().parents[1]
TARGETS = {"replica_kill_failed_share": 0.01, "replica_kill_longest_gap_s": 2.0, "overload_p99_ratio": 3.0,
           "overload_time_to_503_ms": 50.0, "rollback_failed": 0}


@dataclass
class Result:
    start: float
    end: float
    status: int | str  # HTTP status, or the exception's name
    version: str | None = None
    detail: str | None = None  # what a failure said (problem+json title/detail, or the first bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle directory (replica kill and overload)")
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default=None, help="default: towerline serve's default")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each loaded phase (default 20)")
    p.add_argument("--workdir", type=Path, default=None, help="where the rollback registry is trained (default: a temp dir)")
    p.add_argument("--skip-rollback", action="store_true", help="skip the rollback scenario (it trains two tiny models)")
    p.add_argument("--only", choices=["replica_kill", "overload", "rollback"], action="append", default=None,
                   help="run only these scenarios (repeatable; default: all)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the server


class Server:
    """``towerline serve`` in its own session on a free 127.0.0.1 port, stopped with SIGTERM."""

    def __init__(self, model: str, workdir: Path, ingress: str | None, extra: list[str] = (), env: dict | None = None):
        from towerline.serving.ingress import free_ports

        self.port = free_ports("127.0.0.1")[0]
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "towerline.cli", "serve", "--model", model, "--port", str(self.port),
               "--history-db", str(workdir / "history.sqlite"), "--feedback-db", str(workdir / "feedback.sqlite"),
               *(["--ingress", ingress] if ingress else []), *extra]
        self.log_path = workdir / f"serve-{self.port}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"towerline serve exited {self.proc.returncode}: see {self.log_path}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"towerline serve not healthy after {timeout_s:.0f} s: see {self.log_path}")

    def ingress_replicas(self) -> list[int]:
        import psutil

        tree = psutil.Process(self.proc.pid).children(recursive=True)
        return [p.pid for p in tree if "ServeReplica:towerline:Ingress" in " ".join(_cmdline(p))]

    def stop(self) -> float:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log_file.close()
        return time.monotonic() - t0


def _cmdline(p: Any) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # gone meanwhile
        return []


# ----------------------------------------------------------------------------- load


async def load(base: str, users: list[str], clients: int, seconds: float, honour_retry_after: bool = True,
               events: list[tuple[float, Any]] | None = None) -> list[Result]:
    """``clients`` closed-loop clients POSTing /recommend for ``seconds``; ``events`` are
    ``(at_s, coroutine function)`` run concurrently at their offsets (the chaos)."""
    import httpx

    results: list[Result] = []
    t_start = time.monotonic()
    deadline = t_start + seconds

    async def client(i: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=15.0, limits=limits) as c:
            n = i
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    r = await c.post(f"{base}/recommend", json={"user_id": users[n % len(users)], "k": 10})
                    body = r.json() if r.headers.get("content-type", "").endswith("json") else {}
                    res = Result(t0, time.monotonic(), r.status_code, body.get("model_version"),
                                 None if r.status_code == 200 else str(body.get("detail") or r.text)[:120])
                except (httpx.HTTPError, ValueError) as e:
                    res = Result(t0, time.monotonic(), type(e).__name__)
                    await asyncio.sleep(0.05)  # a refused connection would otherwise spin
                results.append(res)
                n += clients
                if res.status == 503 and honour_retry_after:
                    wait = min(1.0, float(r.headers.get("retry-after", "1") or 1))
                    await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    async def at(offset: float, fn: Any) -> None:
        await asyncio.sleep(offset)
        await fn()

    await asyncio.gather(*(client(i) for i in range(clients)), *(at(o, f) for o, f in (events or [])))
    return results


def ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 2) if values else None


def longest_gap(results: list[Result], start: float, end: float) -> float:
    """The longest time without a completed 200, between ``start`` and ``end`` (monotonic seconds)."""
    done = sorted(r.end for r in results if r.status == 200)
    marks = [start, *done, end]
    return round(max(b - a for a, b in zip(marks, marks[1:])), 3)


def failures(results: list[Result]) -> dict[str, int]:
    """Distinct failure messages with their counts: which part of the stack said no."""
    out: dict[str, int] = {}
    for r in results:
        if r.status != 200:
            key = f"{r.status}: {r.detail or ''}"
            out[key] = out.get(key, 0) + 1
    return out


def by_status(results: list[Result]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[str(r.status)] = out.get(str(r.status), 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- scenarios


def replica_kill(args: argparse.Namespace, users: list[str], workdir: Path) -> dict[str, Any]:
    server = Server(args.model, workdir, args.ingress)
    try:
        server.wait_healthy()
        time.sleep(2)
        replicas = server.ingress_replicas()
        killed: dict[str, Any] = {}

        async def kill() -> None:
            pids = server.ingress_replicas()
            killed.update(pid=pids[0] if pids else None, at=time.monotonic(), replicas_before=len(pids))
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                log.info("SIGKILL ingress replica pid %d (of %d)", pids[0], len(pids))

        t0 = time.monotonic()
        results = asyncio.run(load(server.base, users, 8, args.seconds, events=[(args.seconds / 3, kill)]))
        end = time.monotonic()
        failed = [r for r in results if r.status != 200]
        after = [r for r in results if r.start >= killed.get("at", end)]
        return {
            "clients": 8, "seconds": args.seconds, "ingress_replicas_before": len(replicas),
            "killed_pid": killed.get("pid"), "killed_at_s": round(killed.get("at", t0) - t0, 2),
            "requests": len(results), "failed": len(failed), "failed_share": round(len(failed) / max(1, len(results)), 5),
            "by_status": by_status(results), "failures": failures(results),
            "longest_gap_s": longest_gap(results, t0, end),
            "longest_gap_after_kill_s": longest_gap(after, killed.get("at", end), end) if after else None,
            "p99_ms": ms([r.end - r.start for r in results if r.status == 200], 99),
            "ingress_replicas_at_end": len(server.ingress_replicas()),
        }
    finally:
        log.info("replica kill: server stopped in %.1f s", server.stop())


def overload(args: argparse.Namespace, users: list[str], workdir: Path) -> dict[str, Any]:
    server = Server(args.model, workdir, args.ingress)
    try:
        server.wait_healthy()
        time.sleep(2)
        asyncio.run(load(server.base, users, 8, 2.0))  # warm-up
        base8 = asyncio.run(load(server.base, users, 8, args.seconds / 2))
        over = asyncio.run(load(server.base, users, 64, args.seconds))
        ok8 = [r.end - r.start for r in base8 if r.status == 200]
        ok = [r.end - r.start for r in over if r.status == 200]
        shed = [r.end - r.start for r in over if r.status == 503]
        p99_8, p99_64 = ms(ok8, 99), ms(ok, 99)
        return {
            "clients": [8, 64], "seconds": [args.seconds / 2, args.seconds], "honours_retry_after": True,
            "8_clients": {"requests": len(base8), "by_status": by_status(base8), "throughput_rps": round(len(ok8) / (args.seconds / 2), 1),
                          "p50_ms": ms(ok8, 50), "p99_ms": p99_8},
            "64_clients": {"requests": len(over), "by_status": by_status(over), "throughput_rps": round(len(ok) / args.seconds, 1),
                           "share_503": round(len(shed) / max(1, len(over)), 4), "accepted_p50_ms": ms(ok, 50),
                           "accepted_p99_ms": p99_64, "time_to_503_p50_ms": ms(shed, 50), "time_to_503_p99_ms": ms(shed, 99),
                           "time_to_503_max_ms": ms(shed, 100)},
            "p99_ratio_64_vs_8": round(p99_64 / p99_8, 2) if p99_8 and p99_64 else None,
        }
    finally:
        log.info("overload: server stopped in %.1f s", server.stop())


def rollback(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Two tiny versions registered, champion = v2 served, then champion -> v1 and reload under load."""
    sys.path.insert(0, str(REPO / "tests"))
    from support import train_tiny  # the test suite's tiny config: trains in about a minute

    root = workdir / "registry"
    root.mkdir(exist_ok=True)
    log.info("rollback: training two tiny versions in %s", root)
    first = train_tiny(root)
    train_tiny(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    name = "tiny-retriever"
    env = {"MLFLOW_TRACKING_URI": uri}
    promote = [sys.executable, "-m", "towerline.cli", "promote", "--name", name, "--alias", "champion"]
    subprocess.run([*promote, "--version", "2"], check=True, env={**os.environ, **env}, cwd=root, capture_output=True)
    from towerline.training.bundle import load_bundle

    b = load_bundle(str(first.bundle_dir))
    users = [str(u) for u in b.vocabs.users.decode(b.histories.user_idx[:200])]
    server = Server(f"models:/{name}@champion", workdir, args.ingress, ["--tracking-uri", uri], env)
    try:
        server.wait_healthy()
        time.sleep(2)
        reloads: list[dict[str, Any]] = []

        async def roll_back() -> None:
            import httpx

            await asyncio.to_thread(subprocess.run, [*promote, "--version", "1"], check=True,
                                    env={**os.environ, **env}, cwd=root, capture_output=True)
            async with httpx.AsyncClient(timeout=60) as c:
                for _ in range(8):  # each reload reaches one ingress replica: repeat until both answered v1
                    r = await c.post(f"{server.base}/admin/reload")
                    reloads.append({"status": r.status_code, "body": r.json() if r.status_code < 500 else r.text})
                    await asyncio.sleep(0.2)

        t0 = time.monotonic()
        results = asyncio.run(load(server.base, users, 8, args.seconds, events=[(args.seconds / 4, roll_back)]))
        tail = [r for r in results if r.start > t0 + args.seconds * 0.85]
        return {
            "clients": 8, "seconds": args.seconds, "requests": len(results),
            "failed": sum(r.status != 200 for r in results), "by_status": by_status(results),
            "failures": failures(results),
            "versions_seen": sorted({str(r.version) for r in results if r.status == 200}),
            "without_version": sum(r.status == 200 and not r.version for r in results),
            "versions_in_last_15pct": sorted({str(r.version) for r in tail if r.status == 200}),
            "reload_statuses": [x["status"] for x in reloads],
            "reload_current_versions": [(x["body"].get("current") or {}).get("model_version")
                                        if isinstance(x["body"], dict) else None for x in reloads],
        }
    finally:
        log.info("rollback: server stopped in %.1f s", server.stop())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    from towerline.training.bundle import load_bundle

    b = load_bundle(args.model)
    users = [str(u) for u in b.vocabs.users.decode(b.histories.user_idx[: min(1000, len(b.histories))])]
    report: dict[str, Any] = {"model": args.model, "ingress": args.ingress or "default"}
    with tempfile.TemporaryDirectory(prefix="towerline-chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        wanted = set(args.only or ["replica_kill", "overload", "rollback"]) - ({"rollback"} if args.skip_rollback else set())
        scenarios = {"replica_kill": lambda: replica_kill(args, users, workdir),
                     "overload": lambda: overload(args, users, workdir), "rollback": lambda: rollback(args, workdir)}
        for name, run in scenarios.items():
            report[name] = run() if name in wanted else {"skipped": True}
            log.info("%s: %s", name, report[name])
    report["fuzz"] = {"TODO": "no fuzz helper on main yet (the http branch adds one); totals by status code go here"}
    rk, ov, rb = report["replica_kill"], report["overload"], report["rollback"]
    report["target"] = TARGETS
    report["met"] = {
        "replica_kill_failed_share": None if rk.get("skipped") else rk["failed_share"] <= TARGETS["replica_kill_failed_share"],
        "replica_kill_longest_gap_s": None if rk.get("skipped") else rk["longest_gap_s"] <= TARGETS["replica_kill_longest_gap_s"],
        "overload_p99_ratio": None if ov.get("skipped") else bool(
            ov["p99_ratio_64_vs_8"] and ov["p99_ratio_64_vs_8"] <= TARGETS["overload_p99_ratio"]),
        "overload_time_to_503_ms": None if ov.get("skipped") else bool(
            ov["64_clients"]["time_to_503_p99_ms"] is not None
            and ov["64_clients"]["time_to_503_p99_ms"] < TARGETS["overload_time_to_503_ms"]),
        "rollback_failed": None if rb.get("skipped") else rb["failed"] == 0,
    }
    report.update({"cpu_count": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                   "machine": platform.platform(),
                   "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["met"]), f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
