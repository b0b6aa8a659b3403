"""Benchmark: signups posted to ``POST /events`` reach the campaign outbox within a second, and the
events response does not slow down for it.

The ingress's own FastAPI app in-process (``IngressReplica`` with in-process stages, Starlette's test
client: no Ray, no network, so the figures are the handler's own cost), twice over the same bundle:
without campaigns, and with a signup campaign into a Parquet outbox (``serving/campaign_triggers.py``).
Each of ``--posts`` requests carries one new user's signup plus ``--batch - 1`` views; the latency of
``POST /events`` is compared between the two apps (interleaved rounds), and for the app with campaigns
the time from the request to the outbox file holding the user's message (its mtime) is measured
for every signup. Posts come every ``--pause-s`` seconds, without waiting for the messages.

    python bench/signup_trigger.py --model runs/latest/bundle --posts 200
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

WELCOME = """name: welcome-now
trigger: {kind: signup, days: 0}
content: {kind: recommendations, k: 4}
eligibility: {quiet_hours: {start: null}}
offer: {kind: fixed, unit: percent, value: 10}
channels: [email]
holdout: 0.0
"""


def build(model: str, tmp: Path, campaigns: bool):
    from fastapi.testclient import TestClient

    from towerline.serving.app import AppArgs, IngressReplica
    from towerline.serving.recommender import LocalStages

    settings = {"history_db": str(tmp / "h.sqlite"), "feedback_db": str(tmp / "f.sqlite")}
    if campaigns:
        (tmp / "campaigns").mkdir()
        (tmp / "campaigns" / "welcome-now.yaml").write_text(WELCOME)
        settings |= {"campaigns": ["welcome-now"], "campaign_dir": str(tmp / "campaigns"),
                     "campaign_outbox": str(tmp / "outbox"), "campaign_users": str(tmp / "users.csv")}
    args = AppArgs(model=model, settings=settings).resolved()
    replica = IngressReplica(args, stages=LocalStages(args.settings))
    return replica, TestClient(replica.asgi_app())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle directory")
    p.add_argument("--posts", type=int, default=200, help="POST /events requests per app")
    p.add_argument("--batch", type=int, default=10, help="events per request (one of them a signup)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of posts/rounds requests per app")
    p.add_argument("--pause-s", type=float, default=0.05, help="seconds between posts")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "signup_trigger.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import pandas as pd

    from towerline.marketing.outbox import ParquetOutbox

    with tempfile.TemporaryDirectory() as plain_dir, tempfile.TemporaryDirectory() as hook_dir:
        hook_tmp = Path(hook_dir)
        users = [f"bench-new-{i:05d}" for i in range(args.posts)]
        (hook_tmp / "users.csv").write_text("user_id,consent\n" + "".join(f"{u},true\n" for u in users))
        plain, plain_client = build(args.model, Path(plain_dir), campaigns=False)
        hooked, hook_client = build(args.model, hook_tmp, campaigns=True)
        outbox = ParquetOutbox(hook_tmp / "outbox")
        items = [str(i) for i in plain.state.bundle.vocabs.items.ids[:50]]
        latency: dict[str, list[float]] = {"without": [], "with": []}
        posted: dict[tuple[str, str], float] = {}
        to_outbox: list[float] = []
        per_round = max(args.posts // args.rounds, 1)
        with plain_client, hook_client:
            for r in range(args.rounds):
                for name, client in (("without", plain_client), ("with", hook_client)):
                    for u in users[r * per_round:(r + 1) * per_round]:
                        body = [{"user_id": u, "item_id": "-", "event_type": "signup", "event_id": f"{name}-s-{u}"}]
                        body += [{"user_id": u, "item_id": items[j % len(items)], "event_id": f"{name}-v-{u}-{j}"}
                                 for j in range(args.batch - 1)]
                        posted[(name, u)] = time.time()
                        t0 = time.perf_counter()
                        assert client.post("/events", json=body).status_code == 200
                        latency[name].append(time.perf_counter() - t0)
                        time.sleep(args.pause_s)  # a signup every pause_s, not a flood: the queue's work stays apart
            deadline = time.monotonic() + 10  # then every message, bounded
            while outbox.history()["user_id"].nunique() < len(users) and time.monotonic() < deadline:
                time.sleep(0.05)
        sent = outbox.history()
        for f in sorted((hook_tmp / "outbox").glob("part-*.parquet")):  # a file's mtime: when its messages were out
            written = f.stat().st_mtime
            for u in pd.read_parquet(f)["user_id"]:
                to_outbox.append(written - posted[("with", u)])

    def q(xs: list[float], f: float) -> float:
        return sorted(xs)[min(int(f * len(xs)), len(xs) - 1)] * 1000

    result = {
        "posts": args.posts, "batch": args.batch, "rounds": args.rounds, "pause_s": args.pause_s, "load_average": os.getloadavg()[0],
        "events_ms": {k: {"p50": q(v, 0.5), "p99": q(v, 0.99), "mean": statistics.mean(v) * 1000} for k, v in latency.items()},
        "signup_to_outbox_ms": {"p50": q(to_outbox, 0.5), "p99": q(to_outbox, 0.99), "max": max(to_outbox) * 1000},
        "messaged": int(sent["user_id"].nunique()), "duplicates": int(len(sent) - sent["message_id"].nunique()),
        "within_1s": sum(t <= 1.0 for t in to_outbox),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    e = result["events_ms"]
    print(f"POST /events ({args.batch} events, one signup) p50 {e['without']['p50']:.1f} ms without campaigns, "
          f"{e['with']['p50']:.1f} ms with (p99 {e['without']['p99']:.1f} / {e['with']['p99']:.1f} ms)")
    s = result["signup_to_outbox_ms"]
    print(f"signup -> outbox p50 {s['p50']:.0f} ms, p99 {s['p99']:.0f} ms, max {s['max']:.0f} ms; "
          f"{result['within_1s']} of {args.posts} within 1 s; {result['messaged']} users messaged, "
          f"{result['duplicates']} duplicates; load average {result['load_average']:.1f}")


if __name__ == "__main__":
    main()
