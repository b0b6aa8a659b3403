"""Served vs offline: the Beauty model with its ranker over HTTP against ``training.inference``.

For ``--users`` test users who gave consent (leave-one-out), the bundle is copied with each user's history cut just
before their test item, served on 127.0.0.1 by one Serve instance with the business rules set to
the evaluation's (history masked; no category cap, stock or block filter), and every user is asked
for a top-10 over HTTP, ``--clients`` requests in flight so the ingress really batches. The same
histories go through the offline pipeline (``serving.offline.offline_top_k``: ``inference.retrieve``
-> ``inference.rank`` -> best 10). Reported:

- top-10 overlap (|served ∩ offline| / 10, mean over users; target 1.000) and the share of users
  whose list is identical, order included;
- pipeline NDCG@10 of the test item computed from the served lists and from the offline lists
  (target: equal), beside the protocol's ``test/pipeline_ndcg_10`` for the same users (which keeps a
  repeated target rankable, so it may differ by the repeats).

    python bench/parity.py --model /tmp/beauty_run/bundle --users 2000

Writes ``bench/results/parity.json`` with the command line. MLflow is not touched (a bundle directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("bench.parity")

RESULTS = Path(__file__).resolve().parent / "results" / "parity.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle directory with ranker/ (towerline train-ranker)")
    p.add_argument("--users", type=int, default=2000, help="test users compared (default 2000)")
    p.add_argument("--clients", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def cut_bundle(src: Path, dst: Path, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Copy ``src`` to ``dst`` with every history ending before its test item; returns the test
    users' rows and targets (the first ``n_users`` test users)."""
    from towerline.bundle import MANIFEST, write_manifest
    from towerline.features.splits import split_leave_one_out
    from towerline.training.bundle import load_bundle

    bundle = load_bundle(src)
    if bundle.ranker is None:
        raise SystemExit(f"{src} has no ranker/: run `towerline train-ranker --model {src}` first")
    split = split_leave_one_out(bundle.histories, bundle.config.data.min_user_events)
    full, test = split.full, split.test
    cut = np.asarray(full.lengths).copy()
    cut[test.rows] = np.asarray(test.history_end) - full.offsets[:-1][test.rows]
    shutil.copytree(src, dst)
    full.truncate(cut).save(dst / "histories.npz")
    old = json.loads((dst / MANIFEST).read_text())
    write_manifest(dst, {k: v for k, v in old.items() if k not in ("format", "towerline_version", "created_at", "files")})
    # users who refused consent are served popular items (fallback), not the model: they are left out
    refused = set(pd.read_parquet(src / "users.parquet").query("consent == False")["user_id"].astype(str)) \
        if (src / "users.parquet").is_file() else set()
    ids = bundle.vocabs.users.decode(full.user_idx[np.asarray(test.rows)]).astype(str)
    take = np.flatnonzero([u not in refused for u in ids])[:n_users]
    return np.asarray(test.rows)[take], np.asarray(test.targets)[take]


async def ask_all(base: str, users: list[str], clients: int) -> tuple[list[list[str]], float]:
    import httpx

    out: list[list[str]] = [[] for _ in users]
    queue = list(enumerate(users))
    t0 = time.perf_counter()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            while queue:
                i, u = queue.pop()
                r = await c.post("/recommend", json={"user_id": u, "k": 10})
                r.raise_for_status()
                out[i] = [x["item_id"] for x in r.json()["items"]]

    await asyncio.gather(*(client() for _ in range(clients)))
    return out, time.perf_counter() - t0


def ndcg(lists: list[list[str]], targets: list[str]) -> float:
    gains = [1.0 / np.log2(lst.index(t) + 2.0) if t in lst[:10] else 0.0 for lst, t in zip(lists, targets)]
    return float(np.mean(gains))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    import ray
    import torch
    from ray import serve

    from towerline.serving import recommender as rec
    from towerline.serving.app import AppArgs, build_app
    from towerline.serving.offline import evaluation_settings, offline_top_k
    from towerline.features.splits import split_leave_one_out
    from towerline.training.evaluate import evaluate_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="towerline-parity-") as tmp:
        work = Path(tmp)
        bundle_dir = work / "bundle"
        rows, targets = cut_bundle(Path(args.model).resolve(), bundle_dir, args.users)
        settings = evaluation_settings(history_db=str(work / "history.sqlite"), feedback_db=str(work / "feedback.sqlite"))
        state = rec.load_model(str(bundle_dir), settings)
        b = state.bundle
        user_ids = b.vocabs.users.decode(b.histories.user_idx[rows]).astype(str).tolist()
        target_ids = b.vocabs.items.decode(targets).astype(str).tolist()

        t0 = time.perf_counter()
        offline_idx = offline_top_k(state, rec.training_histories(b, rows), 10)
        offline_s = time.perf_counter() - t0
        offline = [b.vocabs.items.decode(t).astype(str).tolist() for t in offline_idx]

        port = free_port()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(AppArgs(model=str(bundle_dir), settings=settings)), name="towerline", route_prefix="/")
            served, served_s = asyncio.run(ask_all(f"http://127.0.0.1:{port}", user_ids, args.clients))
        finally:
            serve.shutdown()
            ray.shutdown()

        overlap = [len(set(s) & set(o)) / 10.0 for s, o in zip(served, offline)]
        identical = [s == o for s, o in zip(served, offline)]
        original = state.bundle  # histories cut before the test item; the protocol reads the original split
        from towerline.features.splits import EvalTargets
        from towerline.training.bundle import load_bundle

        source = load_bundle(Path(args.model).resolve())
        split = split_leave_one_out(source.histories, source.config.data.min_user_events)
        keep = np.searchsorted(np.asarray(split.test.rows), rows)  # the same users, in the same order
        sub = EvalTargets(**{f: np.asarray(getattr(split.test, f))[keep] for f in ("rows", "history_end", "targets")})
        protocol = evaluate_pipeline(source, split.full, sub, "test", 512)["test/pipeline_ndcg_10"]
        result: dict[str, Any] = {
            "command": "python " + shlex.join(["bench/parity.py", *(argv if argv is not None else sys.argv[1:])]),
            "model": str(args.model),
            "dataset": original.config.data.name,
            "users": len(user_ids),
            "n_candidates": state.n_candidates,
            "clients": args.clients,
            "rules": "evaluation (history masked; no category cap, stock or block filter)",
            "top10_overlap_mean": float(np.mean(overlap)),
            "top10_identical_share": float(np.mean(identical)),
            "pipeline_ndcg_10_served": ndcg(served, target_ids),
            "pipeline_ndcg_10_offline": ndcg(offline, target_ids),
            "pipeline_ndcg_10_protocol": protocol,
            "seconds_http": round(served_s, 1),
            "seconds_offline": round(offline_s, 1),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads 1",
        }
    log.info("parity: overlap %.3f, NDCG@10 served %.4f offline %.4f", result["top10_overlap_mean"], result["pipeline_ndcg_10_served"], result["pipeline_ndcg_10_offline"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["top10_overlap_mean"] == 1.0 and result["pipeline_ndcg_10_served"] == result["pipeline_ndcg_10_offline"]
    return 0 if ok else 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
