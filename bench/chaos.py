"""Chaos under load against a real ``towerline serve`` on 127.0.0.1: a replica killed, overload, rollback.

Each scenario starts the server as a subprocess (the default ingress unless ``--ingress``), drives
it with closed-loop asyncio clients for a bounded time, and records per request its start, end,
status and ``model_version``:

- **replica SIGKILL** (8 clients): one ingress replica is killed with SIGKILL a third of the way in;
  figures: failed requests (anything but 200), the longest gap between two completed requests, and
  how long Serve took to have two replicas again. Targets: <= 1% failed, no gap over 2 s.
- **overload** (8 then 64 connections) driven by ``hey`` (Debian's ``hey`` package: a native
  closed-loop generator, so the client does not eat the server's two cores as 64 Python clients
  do; ``--client python`` keeps the asyncio clients). Each connection sends its next request as soon
  as the last was answered, a 503 included (no ``Retry-After`` honoured: the harshest caller).
  Figures per level: answers by status, accepted throughput and p50/p99, and the time to a 503 (its
  p50/p99 latency); targets: accepted p99 at 64 <= 3x the 8-connection p99, 503s in under 50 ms.
- **rollback** (8 clients): the ``--model`` bundle is registered twice in a fresh MLflow store
  (versions 1 and 2, champion -> 2, served as ``models:/chaos-retriever@champion``); under load
  ``towerline promote --version 1`` moves the alias and one ``POST /admin/reload`` (no body: the
  start URI again) switches every ingress replica; the load goes on for a quarter of ``--seconds``
  after the reload answered. Figures: failed requests (target 0), versions before the promote and
  after the reload answered (target: only "1"), requests without a version, the reload's replica count.
- **fuzz**: schemathesis over the running app's OpenAPI document (``--fuzz-cases`` valid and as many
  invalid requests per operation, fixed seed; ``/admin/reload`` left out: a model load per case);
  totals by status code (target: no 5xx).

Everything binds 127.0.0.1 and every loop is bounded in time.

    python bench/chaos.py --model runs/latest/bundle              # all scenarios
    python bench/chaos.py --model runs/latest/bundle --seconds 10 --skip-rollback
    python bench/chaos.py --model runs/latest/bundle --only overload --only fuzz

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
           "overload_time_to_503_ms": 50.0, "rollback_failed": 0, "fuzz_5xx": 0}
SCENARIOS = ["replica_kill", "overload", "rollback", "fuzz"]
SERVE_SET: list[str] = []  # --set values, for every Server


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
    p.add_argument("--workdir", type=Path, default=None, help="stores, logs and the rollback registry (default: a temp dir)")
    p.add_argument("--skip-rollback", action="store_true", help="skip the rollback scenario")
    p.add_argument("--only", choices=SCENARIOS, action="append", default=None,
                   help="run only these scenarios (repeatable; default: all)")
    p.add_argument("--client", choices=["hey", "python"], default="hey", help="overload load generator (default: hey)")
    p.add_argument("--set", dest="serve_set", action="append", default=[], metavar="KEY=VALUE",
                   help="a serve setting for every server started (towerline serve --set), repeatable")
    p.add_argument("--fuzz-cases", type=int, default=20, help="fuzz cases per operation and mode (default 20)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the server


class Server:
    """``towerline serve`` in its own session on a free 127.0.0.1 port, stopped with SIGTERM."""

    def __init__(self, model: str, workdir: Path, ingress: str | None, extra: list[str] = (), env: dict | None = None):
        from towerline.serving.ingress import free_ports

        self.port = free_ports("127.0.0.1")[0]
        self.base = f"http://127.0.0.1:{self.port}"
        extra = [*extra, *(x for kv in SERVE_SET for x in ("--set", kv))]
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
               events: list[tuple[float, Any]] | None = None, stop: asyncio.Event | None = None) -> list[Result]:
    """``clients`` closed-loop clients POSTing /recommend for ``seconds`` (or until ``stop`` is set,
    ``seconds`` still the bound); ``events`` are ``(at_s, coroutine function)`` run concurrently at
    their offsets (the chaos)."""
    import httpx

    results: list[Result] = []
    t_start = time.monotonic()
    deadline = t_start + seconds

    def going() -> bool:
        return time.monotonic() < deadline and not (stop is not None and stop.is_set())

    async def client(i: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=15.0, limits=limits) as c:
            n = i
            while going():
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


def hey(base: str, user: str, clients: int, seconds: float) -> list[tuple[float, int]]:
    """(latency s, status) of every request ``hey`` sent: ``clients`` connections POSTing /recommend
    back to back for ``seconds``. Connection errors are not in hey's CSV; its summary counts them."""
    import csv
    import io

    body = json.dumps({"user_id": user, "k": 10})
    cmd = ["hey", "-z", f"{seconds:g}s", "-c", str(clients), "-m", "POST", "-T", "application/json", "-d", body,
           "-t", "20", "-o", "csv", f"{base}/recommend"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    rows = csv.DictReader(io.StringIO(out))
    return [(float(r["response-time"]), int(r["status-code"])) for r in rows if r.get("status-code")]


def level(results: list[tuple[float, int]], seconds: float) -> dict[str, Any]:
    """The figures of one load level from (latency, status) pairs."""
    ok = [t for t, st in results if st == 200]
    shed = [t for t, st in results if st == 503]
    statuses: dict[str, int] = {}
    for _, st in results:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    return {"requests": len(results), "by_status": dict(sorted(statuses.items())),
            "accepted_rps": round(len(ok) / seconds, 1), "share_503": round(len(shed) / max(1, len(results)), 4),
            "accepted_p50_ms": ms(ok, 50), "accepted_p99_ms": ms(ok, 99),
            "time_to_503_p50_ms": ms(shed, 50), "time_to_503_p99_ms": ms(shed, 99)}


def overload(args: argparse.Namespace, users: list[str], workdir: Path) -> dict[str, Any]:
    server = Server(args.model, workdir, args.ingress)
    try:
        server.wait_healthy()
        time.sleep(2)
        if args.client == "hey":
            hey(server.base, users[0], 8, 2.0)  # warm-up
            base8 = level(hey(server.base, users[0], 8, args.seconds), args.seconds)
            over = level(hey(server.base, users[0], 64, args.seconds), args.seconds)
        else:  # the asyncio clients, honouring Retry-After (they share the server's cores)
            asyncio.run(load(server.base, users, 8, 2.0))
            base8 = level([(r.end - r.start, r.status) for r in asyncio.run(load(server.base, users, 8, args.seconds))
                           if isinstance(r.status, int)], args.seconds)
            over = level([(r.end - r.start, r.status) for r in asyncio.run(load(server.base, users, 64, args.seconds))
                          if isinstance(r.status, int)], args.seconds)
        p99_8, p99_64 = base8["accepted_p99_ms"], over["accepted_p99_ms"]
        report = {"client": args.client, "clients": [8, 64], "seconds": args.seconds,
                  "honours_retry_after": args.client == "python", "8_clients": base8, "64_clients": over,
                  "p99_ratio_64_vs_8": round(p99_64 / p99_8, 2) if p99_8 and p99_64 else None}
        if "fuzz" in args.wanted:  # the same server: one start fewer
            report["fuzz"] = fuzz(server.base, args.fuzz_cases)
        return report
    finally:
        log.info("overload: server stopped in %.1f s", server.stop())


def fuzz(base: str, cases: int) -> dict[str, Any]:
    """schemathesis over the running app's OpenAPI document: ``cases`` valid and invalid requests per
    operation (fixed seed), answers counted by status; the first few 5xx kept for the report."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    statuses: dict[str, int] = {}
    per_operation: dict[str, dict[str, int]] = {}
    server_errors: list[str] = []
    not_problem: list[str] = []  # 4xx answers without a problem+json body (the first few)
    not_problem_count = 0
    for result in schema.get_all_operations():
        op = result.ok()
        where = f"{op.method.upper()} {op.path}"
        if where == "POST /admin/reload":
            continue  # a model load per case
        counts = per_operation.setdefault(where, {})
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=cases, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                try:
                    resp = case.call(base_url=base, timeout=30)
                    key = str(resp.status_code)
                except Exception as e:  # a refused or cut connection is a finding too
                    key, resp = type(e).__name__, None
                statuses[key] = statuses.get(key, 0) + 1
                counts[key] = counts.get(key, 0) + 1
                nonlocal not_problem_count
                if resp is not None and resp.status_code >= 500 and len(server_errors) < 5:
                    server_errors.append(f"{where}: {resp.status_code} {resp.text[:200]}")
                ctype = resp.headers.get("content-type", "") if resp is not None else ""
                ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis keeps every value
                if resp is not None and 400 <= resp.status_code < 500 and "problem+json" not in ctype:
                    not_problem_count += 1
                    if len(not_problem) < 5:
                        not_problem.append(f"{where}: {resp.status_code} {ctype} {resp.text[:150]}")

            try:
                run()
            except Unsatisfiable:  # nothing in it can be invalid
                pass
    total = sum(statuses.values())
    fivexx = sum(n for k, n in statuses.items() if k.isdigit() and int(k) >= 500)
    return {"cases_per_operation_and_mode": cases, "requests": total, "by_status": dict(sorted(statuses.items())),
            "5xx": fivexx, "first_5xx": server_errors, "4xx_not_problem_json": not_problem_count,
            "first_4xx_not_problem_json": not_problem, "by_operation": per_operation}


def fuzz_alone(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The fuzz on a server of its own (``--only fuzz``; with the overload it shares that server)."""
    server = Server(args.model, workdir, args.ingress)
    try:
        server.wait_healthy()
        time.sleep(2)
        return fuzz(server.base, args.fuzz_cases)
    finally:
        log.info("fuzz: server stopped in %.1f s", server.stop())


def registry_with_two_versions(bundle: str, root: Path) -> tuple[str, str]:
    """A fresh SQLite MLflow store under ``root`` with ``bundle`` registered twice (versions 1 and 2),
    champion -> 2: (tracking URI, model name). Both versions hold the same weights; what the rollback
    watches is the version every answer names."""
    import mlflow

    from towerline.training.tracking import promote, register_bundle

    uri = f"sqlite:///{root / 'mlflow.db'}"
    name = "chaos-retriever"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("chaos", artifact_location=(root / "artifacts").as_uri())
        for _ in range(2):  # a run each: a run's params (the version it registered) are written once
            register_bundle(mlflow.MlflowClient().create_run(experiment).info.run_id, name, bundle)
        promote(name, 2, "champion")
    finally:
        mlflow.set_tracking_uri(None)
    return uri, name


def rollback(args: argparse.Namespace, users: list[str], workdir: Path) -> dict[str, Any]:
    """champion = v2 served; under load champion -> v1 with ``towerline promote`` and one reload."""
    root = workdir / "registry"
    root.mkdir(exist_ok=True)
    uri, name = registry_with_two_versions(args.model, root)
    env = {"MLFLOW_TRACKING_URI": uri}
    promote = [sys.executable, "-m", "towerline.cli", "promote", "--name", name, "--alias", "champion", "--version", "1"]
    server = Server(f"models:/{name}@champion", workdir, args.ingress, ["--tracking-uri", uri], env)
    try:
        server.wait_healthy()
        time.sleep(2)
        marks: dict[str, Any] = {}

        async def run() -> list[Result]:
            import httpx

            stop = asyncio.Event()

            async def roll_back() -> None:
                try:
                    await asyncio.sleep(args.seconds / 4)
                    marks["promote_at"] = time.monotonic()
                    await asyncio.to_thread(subprocess.run, promote, check=True, env={**os.environ, **env}, cwd=root,
                                            capture_output=True, timeout=120)
                    marks["reload_at"] = time.monotonic()
                    async with httpx.AsyncClient(timeout=60) as c:
                        r = await c.post(f"{server.base}/admin/reload")
                    marks["reloaded_at"] = time.monotonic()
                    marks["reload"] = {"status": r.status_code, "body": r.json() if r.status_code < 500 else r.text[:300]}
                    await asyncio.sleep(args.seconds / 4)  # the load goes on after the switch
                finally:
                    stop.set()

            clients = load(server.base, users, 8, args.seconds * 4, stop=stop)  # bounded even if the promote hangs
            results, _ = await asyncio.gather(clients, roll_back())
            return results

        t0 = time.monotonic()
        results = asyncio.run(run())
        ok = [r for r in results if r.status == 200]
        before = [r for r in ok if r.end < marks.get("promote_at", t0)]
        after = [r for r in ok if r.start > marks.get("reloaded_at", float("inf"))]
        body = (marks.get("reload") or {}).get("body")
        return {
            "clients": 8, "seconds": round(time.monotonic() - t0, 1), "requests": len(results),
            "failed": sum(r.status != 200 for r in results), "by_status": by_status(results), "failures": failures(results),
            "versions_seen": sorted({str(r.version) for r in ok}), "without_version": sum(not r.version for r in ok),
            "versions_before_promote": sorted({str(r.version) for r in before}),
            "versions_after_reload": sorted({str(r.version) for r in after}), "requests_after_reload": len(after),
            "old_version_after_reload": sum(r.version != "1" for r in after),
            "promote_s": round(marks["reload_at"] - marks["promote_at"], 2) if "reload_at" in marks else None,
            "reload_s": round(marks["reloaded_at"] - marks["reload_at"], 2) if "reloaded_at" in marks else None,
            "reload_status": (marks.get("reload") or {}).get("status"),
            "reload_current_version": ((body or {}).get("current") or {}).get("model_version") if isinstance(body, dict) else None,
            "reload_replicas": (body or {}).get("replicas") if isinstance(body, dict) else None,
        }
    finally:
        log.info("rollback: server stopped in %.1f s", server.stop())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    SERVE_SET.extend(args.serve_set)
    from towerline.training.bundle import load_bundle

    b = load_bundle(args.model)
    users = [str(u) for u in b.vocabs.users.decode(b.histories.user_idx[: min(1000, len(b.histories))])]
    report: dict[str, Any] = {"model": args.model, "ingress": args.ingress or "default"}
    args.wanted = set(args.only or SCENARIOS) - ({"rollback"} if args.skip_rollback else set())
    with tempfile.TemporaryDirectory(prefix="towerline-chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        scenarios = {"replica_kill": lambda: replica_kill(args, users, workdir),
                     "overload": lambda: overload(args, users, workdir), "rollback": lambda: rollback(args, users, workdir)}
        for name, run in scenarios.items():
            report[name] = run() if name in args.wanted else {"skipped": True}
            log.info("%s: %s", name, {k: v for k, v in report[name].items() if k != "fuzz"})
        report["fuzz"] = report["overload"].pop("fuzz", None) or (
            fuzz_alone(args, workdir) if "fuzz" in args.wanted else {"skipped": True})
    rk, ov, rb, fz = report["replica_kill"], report["overload"], report["rollback"], report["fuzz"]
    report["target"] = TARGETS
    report["met"] = {
        "replica_kill_failed_share": None if rk.get("skipped") else rk["failed_share"] <= TARGETS["replica_kill_failed_share"],
        "replica_kill_longest_gap_s": None if rk.get("skipped") else rk["longest_gap_s"] <= TARGETS["replica_kill_longest_gap_s"],
        "overload_p99_ratio": None if ov.get("skipped") else bool(
            ov["p99_ratio_64_vs_8"] and ov["p99_ratio_64_vs_8"] <= TARGETS["overload_p99_ratio"]),
        "overload_time_to_503_ms": None if ov.get("skipped") else bool(
            ov["64_clients"]["time_to_503_p50_ms"] is not None
            and ov["64_clients"]["time_to_503_p50_ms"] < TARGETS["overload_time_to_503_ms"]),
        "rollback_failed": None if rb.get("skipped") else rb["failed"] == 0,
        "rollback_switched": None if rb.get("skipped") else rb["versions_after_reload"] == ["1"],
        "fuzz_5xx": None if fz.get("skipped") else fz["5xx"] == 0,
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
