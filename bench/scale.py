"""Scaling-out benchmark (issue #17): Ray Data features, one vs two Ray Train workers, a million items.

Writes ``bench/results/scale.json``: one entry per target with its value, the target and whether it
was met, plus the sizes actually run (the full targets -- 50M events, a million-item shop -- need
more than the 2-core development machine gives one engineer; pass the full sizes to run them).

* ``features``: a sharded synthetic shop (``generate_sharded``) prepared by Ray Data
  (``prepare_features``): wall time, and peak resident memory of the driver and of the largest
  Ray worker process, sampled every 0.25 s (target <= 4 GiB per worker).
* ``train``: LastFM (S3Rec) through Ray Train with 1 and then 2 workers, the same config and a
  fixed number of epochs: test NDCG@10 and training throughput (training windows x epochs / fit s).
* ``million``: optional (``--million``): sampled softmax (in-batch + uniform negatives, logQ) on a
  streamed 1M-item shop for a time budget, then exact FAISS top-k evaluation of sampled test users.
* ``ann`` (``--model BUNDLE``): ``towerline index --target-recall 0.98`` for HNSW and for IVF with
  fast-scan PQ and exact re-ranking over the bundle's trained item embeddings, queried with the user
  vectors of sampled users (the choice on half, the figures on the held-out half): recall@10 against
  exact search and queries per second on one thread (target recall@10 >= 0.98 at >= 10x exact).
* ``serve`` (``--model BUNDLE``): one Serve instance (HAProxy ingress) holding the app twice, with one
  and with two ingress replicas, both keeping the online history in one Redis (``--redis-url``); wrk
  (``bench/serve_load.py``'s client) drives ``POST /recommend`` on each in interleaved rounds:
  throughput and p99 of two replicas against one.

    python bench/scale.py --events 5000000 --users 250000 --items 100000 --epochs 3 --budget-s 1200
    python bench/scale.py --events 50000000 --users 2500000 --items 1000000 --million   # full run
    python bench/scale.py --skip features train --model runs/beauty/bundle --parts ann serve --merge
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
LASTFM = REPO.parent / "shared" / "data" / "s3rec" / "LastFM.txt"
TARGET_WORKER_GIB = 4.0
TARGET_EVENTS = 50_000_000


class PeakMemory:
    """Peak RSS of this process and of the largest Ray worker (``ray::`` processes), sampled."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.driver, self.worker = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if cmd.startswith("ray::") and p.info.get("memory_info"):
                    self.worker = max(self.worker, p.info["memory_info"].rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_features(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from towerline.config import load_config
    from towerline.features.ray_data import prepare_features, ray_session
    from towerline.features.synthetic import generate_sharded

    t0 = time.perf_counter()
    if args.data:  # shards written before (towerline data generate --shard-events N)
        import pyarrow.parquet as pq

        from towerline.features.ray_data import event_shards

        shop, files = args.data, event_shards(args.data)[0]
        gen = {"events": sum(pq.read_metadata(f).num_rows for f in files), "shards": len(files)}
        args.users = pq.read_metadata(shop / "users.parquet").num_rows
        args.items = pq.read_metadata(shop / "items.parquet").num_rows
    else:
        shop = work / "shop"
        gen = generate_sharded(shop, args.users, args.items, seed=0, n_events=args.events, rows_per_shard=args.shard_rows)
    gen_s = time.perf_counter() - t0
    cfg = load_config(None, ["data.format=parquet", f"data.path={shop}", "data.engine=ray", "data.name=scale"]).data
    with ray_session(num_cpus=args.cpus, object_store_mb=args.object_store_mb), PeakMemory() as mem:
        t1 = time.perf_counter()
        summary = prepare_features(cfg, work / "prepared", 8, rows_per_partition=args.partition_rows)
        wall = time.perf_counter() - t1
    gib = 2**30
    out = {
        "events": gen["events"], "users": args.users, "items": args.items, "shards": gen["shards"],
        "generate_s": round(gen_s, 1), "prepare_s": round(wall, 1),
        "events_per_s": round(gen["events"] / wall), "peak_worker_gib": round(mem.worker / gib, 2),
        "peak_driver_gib": round(mem.driver / gib, 2), "ray_cpus": args.cpus,
        "steps": None,
    }
    import numpy as np

    with np.load(work / "prepared" / "sequences.npz") as z:
        out["steps"] = int(z["offsets"][-1])
    out["prepared"] = summary
    if not args.data:
        shutil.rmtree(shop, ignore_errors=True)
    return out


def bench_train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """LastFM with 1 and 2 Ray Train workers for ``--epochs``, once per ``--seeds`` seed (same global batch)."""
    import numpy as np

    from towerline.config import load_config
    from towerline.training.data import training_windows
    from towerline.training.distributed import train_distributed

    results: dict[str, Any] = {}
    for workers, seed in ((w, s) for s in args.seeds for w in (1, 2)):  # interleaved: load hits both alike
        cfg = load_config(REPO / "configs" / "lastfm.yaml", [
            f"data.path={LASTFM}", f"trainer.workers={workers}", f"trainer.max_epochs={args.epochs}", f"trainer.seed={seed}",
            "trainer.patience=100", "trainer.max_time_s=null", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "tracking.experiment=bench-scale", "tracking.register=false",
        ])
        t0 = time.perf_counter()
        r = train_distributed(cfg, work / f"lastfm-{workers}-{seed}", progress=False)
        wall = time.perf_counter() - t0
        from towerline.features.sequences import Sequences
        from towerline.training.data import make_split

        split = make_split(Sequences.load(work / f"lastfm-{workers}-{seed}" / "data" / "sequences.npz"), cfg.data)
        n_windows = len(training_windows(split.train, cfg.model.max_len)[0])
        fit_s = r.metrics["train/seconds"]
        run = {
            "seed": seed, "test_ndcg_10": round(r.metrics["test/ndcg_10"], 4), "test_hr_10": round(r.metrics["test/hr_10"], 4),
            "epochs": int(r.metrics["train/epochs"]), "fit_s": round(fit_s, 1), "wall_s": round(wall, 1),
            "windows_per_s": round(n_windows * r.metrics["train/epochs"] / max(fit_s, 1e-9), 1),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        results.setdefault(f"workers_{workers}", {"runs": []})["runs"].append(run)
        log.info("lastfm, %d worker(s), seed %d: %s", workers, seed, run)
    for summary in results.values():
        ndcg = [r["test_ndcg_10"] for r in summary["runs"]]
        summary.update(test_ndcg_10=round(float(np.mean(ndcg)), 4), ndcg_spread=round(max(ndcg) - min(ndcg), 4),
                       windows_per_s=round(float(np.median([r["windows_per_s"] for r in summary["runs"]])), 1))
    return results


def bench_million(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Sampled softmax on a streamed 1M-item shop for ``--million-budget-s``, then FAISS evaluation."""
    import lightning as L

    from towerline.config import load_config
    from towerline.features.synthetic import generate_sharded
    from towerline.training.data import SequenceDataModule
    from towerline.training.large_eval import evaluate_with_faiss
    from towerline.training.system import TwoTowerSystem

    shop = work / "million"
    gen = generate_sharded(shop, args.million_users, 1_000_000, seed=0, rows_per_shard=args.shard_rows)
    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        "data.format=parquet", f"data.path={shop}", "data.engine=ray", "data.name=million",
        "loss.kind=sampled_softmax", "loss.n_negatives=4096", f"trainer.batch_size={args.million_batch_size}",
        f"model.dim={args.million_dim}", "model.n_layers=1", f"trainer.max_time_s={args.million_budget_s}",
        "trainer.max_epochs=1", f"model.sparse_item_grads={args.million_sparse}",
    ])
    t0 = time.perf_counter()
    dm = SequenceDataModule(cfg, work / "million-data")
    dm.prepare_data()
    dm.setup()
    prep_s = time.perf_counter() - t0
    s = dm.stats
    system = TwoTowerSystem(s.n_items, s.n_attributes, s.n_event_types, cfg, item_attributes=dm.item_attributes, item_counts=dm.item_counts)
    trainer = L.Trainer(max_time={"seconds": args.million_budget_s}, max_epochs=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = dm.train_dataloader()
    targets = loader.dataset.tensors[2]  # (S, T): the next-item targets, PAD where none
    positions_per_window = float((targets != 0).sum()) / len(targets)
    t1, c1 = time.perf_counter(), time.process_time()
    with PeakMemory(every_s=2.0) as peak:
        trainer.fit(system, train_dataloaders=loader)
    fit_s, fit_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    steps = trainer.global_step
    t2 = time.perf_counter()
    metrics = evaluate_with_faiss(system.net, dm.split.full, dm.split.test, "test", max_users=args.million_eval_users)
    eval_s = time.perf_counter() - t2
    pop = popularity_ndcg(dm, args.million_eval_users)
    out = {"items": 1_000_000, "users": args.million_users, "events": gen["events"], "prepare_s": round(prep_s, 1),
           "dim": cfg.model.dim, "batch_size": cfg.trainer.batch_size, "n_negatives": cfg.loss.n_negatives,
           "sparse_item_grads": system.sparse_item_grads, "train_steps": steps, "fit_s": round(fit_s, 1),
           "fit_cpu_s": round(fit_cpu_s, 1), "steps_per_s": round(steps / fit_s, 3),
           "cpu_s_per_step": round(fit_cpu_s / max(steps, 1), 3),
           "sequences_per_s": round(steps * cfg.trainer.batch_size / fit_s, 1),
           "positions_per_s": round(steps * cfg.trainer.batch_size * positions_per_window / fit_s, 1),
           "epochs": round(steps * cfg.trainer.batch_size / len(targets), 3), "peak_rss_gib": round(peak.driver / 2**30, 2),
           "eval_s": round(eval_s, 1), "eval": {k: round(v, 4) for k, v in metrics.items()}, "popularity": pop,
           "loadavg_1m": round(os.getloadavg()[0], 2)}
    if args.million_bundle is not None:  # the trained 1M item vectors and held-out histories, for --parts ann --model
        from towerline.training.export import export_bundle

        export_bundle(system.net, dm.vocabs, cfg, args.million_bundle, items=dm.items_table(),
                      item_popularity=dm.item_counts, histories=dm.split.full, metrics=metrics,
                      manifest_extra={"model_name": "million-shop"})
        out["bundle"] = str(args.million_bundle)
    return out


def million_targets(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for the million-item shop, from ``bench_million``'s figures."""
    ndcg, pop = m["eval"].get("test/ndcg_10", 0.0), m["popularity"]["test/ndcg_10"]
    return [
        {"part": "million", "target": "1M-item shop trains with sampled softmax and evaluates by FAISS top-k",
         "value": ndcg, "met": m["train_steps"] > 0},
        {"part": "million", "target": f"1M-item shop: test NDCG@10 >= {TARGET_MILLION_VS_POP:.0f}x the popularity baseline",
         "value": {"ndcg_10": ndcg, "popularity_ndcg_10": pop, "ratio": round(ndcg / pop, 2) if pop else None},
         "met": bool(pop) and ndcg >= TARGET_MILLION_VS_POP * pop, "budget_s": m["fit_s"]},
        {"part": "million", "target": f"1M-item shop training: peak RSS <= {TARGET_MILLION_RSS_GIB:.0f} GiB",
         "value_gib": m["peak_rss_gib"], "met": m["peak_rss_gib"] <= TARGET_MILLION_RSS_GIB},
    ]


def popularity_ndcg(dm: Any, max_users: int, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Test NDCG@k / HR@k of "most popular first" (training counts), history masked, on the same
    seeded user sample as ``evaluate_with_faiss``: the popularity baseline without a users x items matrix."""
    import math

    import numpy as np
    from towerline.features.vocab import N_RESERVED

    full, targets = dm.split.full, dm.split.test
    counts = np.asarray(dm.item_counts, dtype=np.float64).copy()
    counts[:N_RESERVED] = -1.0
    order = np.arange(len(targets))
    if max_users < len(order):
        order = np.sort(np.random.default_rng(seed).choice(len(order), max_users, replace=False))
    starts, ends = full.offsets[:-1][targets.rows[order]], targets.history_end[order]
    top = np.argsort(-counts, kind="stable")[: k + int((ends - starts).max(initial=0))]  # most popular first
    ndcg = hr = 0.0
    for s, e, t in zip(starts, ends, targets.targets[order]):
        banned = np.setdiff1d(full.item_idx[s:e], [t])
        ranked = top[~np.isin(top, banned)][:k]
        where = np.flatnonzero(ranked == t)
        if len(where):
            hr += 1.0
            ndcg += 1.0 / math.log2(int(where[0]) + 2)
    n = max(len(order), 1)
    return {f"test/ndcg_{k}": round(ndcg / n, 4), f"test/hr_{k}": round(hr / n, 4), "test/users": len(order)}


TARGET_MILLION_VS_POP = 3.0
TARGET_MILLION_RSS_GIB = 8.0
TARGET_RECALL = 0.98
TARGET_SPEEDUP = 10.0


def bench_ann(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``build_model_index(target_recall=0.98)`` per ANN kind on the bundle's trained embeddings."""
    import os

    from towerline.serving.model_index import build_model_index

    out: dict[str, Any] = {"model": str(args.model), "target_recall": TARGET_RECALL, "queries": args.ann_queries}
    for kind in args.ann_kinds:
        t0 = time.perf_counter()
        try:
            r = build_model_index(str(args.model), work / f"index-{kind}", {"kind": kind}, n_queries=args.ann_queries,
                                  threads=1, target_recall=TARGET_RECALL, build_threads=args.cpus)
        except Exception as e:  # an unreachable target is a figure too
            out[kind] = {"error": str(e)}
            continue
        out["items"] = r["count"] - 2
        out["dim"] = r["dim"]
        out[kind] = {k: r[k] for k in ("recall_at_10", "qps", "cpu_qps", "exact_qps", "exact_cpu_qps", "speedup",
                                       "build_s", "memory_bytes", "n_queries")}
        out[kind]["cpu_speedup"] = r["cpu_qps"] / r["exact_cpu_qps"]
        out[kind]["chosen"] = r["tuning"]["chosen"]
        out[kind]["tried"] = len(r["tuning"]["tried"])
        out[kind]["tuning_s"] = round(time.perf_counter() - t0, 1)
        out[kind]["loadavg_1m"] = round(os.getloadavg()[0], 2)
        log.info("ann %s: %s", kind, out[kind])
    return out


def bench_ann_gaussian(args: argparse.Namespace) -> dict[str, Any]:
    """The worst case beside the trained vectors: ``tune_index`` on ``--ann-gaussian`` L2-normalised
    i.i.d. Gaussian vectors (dim 64) with fresh Gaussian queries, no structure for an index to use."""
    import os

    import numpy as np

    from towerline.errors import ConfigError
    from towerline.serving.index_tuning import tune_index

    rng = np.random.default_rng(0)

    def gaussian(n: int) -> np.ndarray:
        x = rng.standard_normal((n, 64), dtype=np.float32)  # (n, 64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    items, queries = gaussian(args.ann_gaussian), gaussian(args.ann_queries)
    half = len(queries) // 2
    out: dict[str, Any] = {"items": args.ann_gaussian, "dim": 64, "queries": len(queries)}
    for kind in args.ann_gaussian_kinds:
        t0 = time.perf_counter()
        try:
            t = tune_index(items, queries[:half], queries[half:], TARGET_RECALL, kinds=(kind,), threads=1,
                           build_threads=args.cpus)
        except ConfigError as e:
            out[kind] = {"error": str(e), "tuning_s": round(time.perf_counter() - t0, 1)}
            continue
        out[kind] = {"recall_at_10": t.recall_at_10, "qps": t.qps, "cpu_qps": t.cpu_qps, "exact_qps": t.exact_qps,
                     "exact_cpu_qps": t.exact_cpu_qps, "speedup": t.qps / t.exact_qps,
                     "cpu_speedup": t.cpu_qps / t.exact_cpu_qps, "build_s": round(t.build_s, 1),
                     "memory_bytes": t.memory_bytes, "chosen": t.chosen.record(), "tried": len(t.tried),
                     "tuning_s": round(time.perf_counter() - t0, 1), "loadavg_1m": round(os.getloadavg()[0], 2)}
        log.info("ann gaussian %s: %s", kind, out[kind])
    return out


def bench_serve(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One and two ingress replicas over one Redis, in one Serve instance, wrk in interleaved rounds."""
    import numpy as np

    from towerline.serving.settings import ServeSettings
    from towerline.serving.shedding import use_ingress_for

    use_ingress_for(ServeSettings(), "haproxy")  # before ray.serve is imported: the product's default front door
    from ray import serve

    sys.path.insert(0, str(REPO / "bench"))
    from serve_load import cmd_serve_wait, free_port, merge_wrk, wrk_slice

    from towerline.serving.app import AppArgs, build_app
    from towerline.serving.lifecycle import start_ray
    from towerline.training.bundle import load_bundle

    bundle = load_bundle(str(args.model))
    rng = np.random.default_rng(0)
    rows = rng.choice(len(bundle.histories), size=min(1000, len(bundle.histories)), replace=False)
    bodies = [{"user_id": str(u), "k": 10} for u in bundle.vocabs.users.decode(bundle.histories.user_idx[rows])]
    port = free_port()
    slices: dict[tuple[int, str], list[dict[str, Any]]] = {(c, name): [] for c in args.serve_clients
                                                           for name in ("one_replica", "two_replicas")}
    start_ray("127.0.0.1", args.cpus, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, replicas in (("one_replica", 1), ("two_replicas", 2)):
            settings = {"history_redis_url": args.redis_url, "ingress_replicas": replicas,
                        "history_db": str(work / f"{name}.sqlite"), "feedback_db": str(work / f"{name}-fb.sqlite")}
            serve.run(build_app(AppArgs(model=str(args.model), settings=settings)), name=name, route_prefix=f"/{name}")
        base = f"http://127.0.0.1:{port}"
        for name in ("one_replica", "two_replicas"):
            cmd_serve_wait(f"{base}/{name}")
        for r in range(args.serve_rounds):
            for clients, name in slices:
                sl = wrk_slice(f"{base}/{name}/recommend", bodies, clients, args.serve_seconds / args.serve_rounds, 1.0)
                log.info("round %d, %d connections, %s: %.1f req/s (%d not 2xx), p99 %.1f ms", r + 1, clients, name,
                         sl["requests"] / sl["seconds"], sl["errors"], sl["p99_ms"])
                slices[(clients, name)].append(sl)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    by_clients: dict[str, Any] = {}
    for clients in args.serve_clients:
        merged = {name: merge_wrk(slices[(clients, name)]) for name in ("one_replica", "two_replicas")}
        for m in merged.values():  # a shed request (503) is answered fast: count what was served
            m["ok_rps"] = (m["requests"] - m["errors"]) / m["seconds"]
        one, two = merged["one_replica"], merged["two_replicas"]
        by_clients[str(clients)] = {**merged, "ok_throughput_ratio": two["ok_rps"] / max(one["ok_rps"], 1e-9),
                                    "throughput_ratio": two["throughput_rps"] / one["throughput_rps"],
                                    "p99_ratio": two["p99_ms"] / one["p99_ms"]}
    return {"model": str(args.model), "items": int(bundle.item_embeddings.shape[0]) - 2, "ranker": bundle.ranker is not None,
            "ingress": "haproxy", "client": "wrk", "seconds_per_phase": args.serve_seconds, "rounds": args.serve_rounds,
            "ray_cpus": args.cpus, "redis": args.redis_url, "connections": by_clients}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000, help="features: synthetic events (full target 50M)")
    ap.add_argument("--users", type=int, default=250_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--data", type=Path, default=None, help="features: an existing sharded shop instead of generating one")
    ap.add_argument("--shard-rows", type=int, default=1_000_000, help="events per Parquet shard")
    ap.add_argument("--partition-rows", type=int, default=2_000_000, help="events per user partition (worker memory)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--object-store-mb", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=3, help="LastFM epochs per worker count")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 2024], help="seeds of the 1- vs 2-worker runs")
    ap.add_argument("--skip", nargs="*", default=[], choices=["features", "train"], help="parts to skip")
    ap.add_argument("--merge", action="store_true", help="keep the other parts' entries already in --out")
    ap.add_argument("--million", action="store_true", help="also train on a 1M-item shop (sampled softmax)")
    ap.add_argument("--million-users", type=int, default=2_000_000, help="users of the 1M-item shop (20 events each)")
    ap.add_argument("--million-budget-s", type=float, default=600)
    ap.add_argument("--million-eval-users", type=int, default=5000)
    ap.add_argument("--million-batch-size", type=int, default=256, help="sequences per step (in-batch negatives: N^2 logits)")
    ap.add_argument("--million-dim", type=int, default=32)
    ap.add_argument("--million-sparse", choices=["auto", "true", "false"], default="auto",
                    help="model.sparse_item_grads (false: the dense AdamW of before, for the comparison)")
    ap.add_argument("--million-bundle", type=Path, default=None, help="export the trained 1M-item model here")
    ap.add_argument("--model", type=Path, default=None, help="ann/serve: a trained bundle (the largest catalogue you have)")
    ap.add_argument("--parts", nargs="*", default=[], choices=["ann", "serve"], help="parts needing --model to run")
    ap.add_argument("--ann-queries", type=int, default=2000, help="ann: sampled users (half tune, half held out)")
    ap.add_argument("--ann-gaussian", type=int, default=0, help="ann: also tune on N random Gaussian vectors (worst case)")
    ap.add_argument("--ann-kinds", nargs="+", default=["hnsw", "ivf"], choices=["hnsw", "ivf"],
                    help="ann: index kinds tuned on the bundle's embeddings (one process each can run side by side)")
    ap.add_argument("--ann-gaussian-kinds", nargs="+", default=["ivf"], choices=["hnsw", "ivf"])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/9", help="serve: the Redis both apps share")
    ap.add_argument("--serve-seconds", type=float, default=60, help="serve: wrk seconds per app, over all rounds")
    ap.add_argument("--serve-rounds", type=int, default=3)
    ap.add_argument("--serve-clients", type=int, nargs="+", default=[8, 16],
                    help="serve: wrk connections, one comparison each (one replica takes 8 at once + 4 queued)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    args = ap.parse_args(argv)
    if args.model is None and ("serve" in args.parts or "ann" in args.parts and not args.ann_gaussian):
        ap.error(f"--parts {' '.join(args.parts)} needs --model BUNDLE (a trained bundle)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    work = Path(tempfile.mkdtemp(prefix="towerline-scale-"))
    report: dict[str, Any] = {"command": "python bench/scale.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
                              "machine": f"{os.cpu_count()} CPU cores", "targets": []}
    try:
        if "features" not in args.skip:
            f = report["features"] = bench_features(args, work)
            report["targets"].append({"part": "features", "target": "Ray Data features: peak memory per worker <= 4 GiB", "value_gib": f["peak_worker_gib"],
                                      "met": f["peak_worker_gib"] <= TARGET_WORKER_GIB, "events_run": f["events"]})
            report["targets"].append({"part": "features", "target": f"Ray Data features at {TARGET_EVENTS:,} events", "events_run": f["events"],
                                      "met": f["events"] >= TARGET_EVENTS, "prepare_s": f["prepare_s"]})
            log.info("features: %s", f)
        if "train" not in args.skip:
            t = report["train"] = bench_train(args, work)
            one, two = t["workers_1"], t["workers_2"]
            spread = max(one["ndcg_spread"], two["ndcg_spread"])
            report["targets"].append({"part": "train", "target": f"2 Ray Train workers: test NDCG@10 equal to 1 worker's within the "
                                      f"spread of {len(args.seeds)} seeds (mean difference <= the larger seed range)",
                                      "value": [one["test_ndcg_10"], two["test_ndcg_10"]], "spread": spread,
                                      "met": len(args.seeds) >= 3 and abs(two["test_ndcg_10"] - one["test_ndcg_10"]) <= spread})
            report["targets"].append({"part": "train", "target": "throughput of 1 and 2 workers reported (training windows/s, median)",
                                      "value": [one["windows_per_s"], two["windows_per_s"]], "met": True})
        if args.million:
            m = report["million"] = bench_million(args, work)
            report["targets"] += million_targets(m)
        if "ann" in args.parts and args.model is not None:
            a = report["ann"] = bench_ann(args, work)
            for kind in args.ann_kinds:
                r = a[kind]
                report["targets"].append({
                    "part": "ann", "kind": kind, "target": f"{kind} on trained embeddings ({a.get('items')} items): recall@10 >= "
                    f"{TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x exact QPS, one thread",
                    "value": None if "error" in r else {"recall_at_10": round(r["recall_at_10"], 4),
                                                        "speedup": round(r["speedup"], 2),
                                                        "cpu_speedup": round(r["cpu_speedup"], 2)},
                    "met": "error" not in r and r["recall_at_10"] >= TARGET_RECALL and r["speedup"] >= TARGET_SPEEDUP,
                    "million_items": a.get("items", 0) >= 1_000_000})
        if "ann" in args.parts and args.ann_gaussian:
            g = report["ann_gaussian"] = bench_ann_gaussian(args)
            for kind in args.ann_gaussian_kinds:
                r = g[kind]
                report["targets"].append({
                    "part": "ann_gaussian", "target": f"{kind} on {args.ann_gaussian:,} random Gaussian vectors (worst "
                    f"case): recall@10 >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x exact QPS, one thread",
                    "value": None if "error" in r else {"recall_at_10": round(r["recall_at_10"], 4),
                                                        "speedup": round(r["speedup"], 2),
                                                        "cpu_speedup": round(r["cpu_speedup"], 2)},
                    "met": "error" not in r and r["recall_at_10"] >= TARGET_RECALL and r["speedup"] >= TARGET_SPEEDUP})
        if "serve" in args.parts:
            v = report["serve"] = bench_serve(args, work)
            for clients, c in v["connections"].items():
                report["targets"].append({
                    "part": "serve", "target": f"two ingress replicas sharing Redis, {clients} wrk connections: more "
                    "/recommend answered (2xx) per second than one replica, p99 no higher",
                    "value": {"ok_rps": [round(c["one_replica"]["ok_rps"], 1), round(c["two_replicas"]["ok_rps"], 1)],
                              "not_2xx": [c["one_replica"]["errors"], c["two_replicas"]["errors"]],
                              "p99_ms": [c["one_replica"]["p99_ms"], c["two_replicas"]["p99_ms"]],
                              "ok_throughput_ratio": round(c["ok_throughput_ratio"], 3)},
                    "met": c["ok_throughput_ratio"] > 1.0 and c["p99_ratio"] <= 1.0})
        report["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.out.exists():  # one part per invocation, one results file
        old = json.loads(args.out.read_text())
        names = ("features", "train", "million", "ann", "ann_gaussian", "serve")
        parts = [k for k in names if k in report]
        kept = [t for t in old.get("targets", []) if t.get("part") not in parts]
        if "ann" in report and old.get("ann", {}).get("model") == report["ann"]["model"]:
            # --ann-kinds run one by one (or side by side) on the same bundle: keep the other kinds' figures
            kinds = [k for k in ("hnsw", "ivf") if k in report["ann"]]
            kept += [t for t in old.get("targets", []) if t.get("part") == "ann" and t.get("kind") not in (None, *kinds)]
            report["ann"] = {**old["ann"], **report["ann"]}
        for k in names:
            if k not in report and k in old:
                report[k] = old[k]
        report["commands"] = sorted(set(old.get("commands", [old.get("command", "")])) | {report["command"]})
        report["targets"] = kept + report["targets"]
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
