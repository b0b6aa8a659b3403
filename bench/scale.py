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

    python bench/scale.py --events 5000000 --users 250000 --items 100000 --epochs 3 --budget-s 1200
    python bench/scale.py --events 50000000 --users 2500000 --items 1000000 --million   # full run
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
LASTFM = REPO.parent.parent / "shared" / "data" / "s3rec" / "LastFM.txt"
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

    from towerline.config import load_config
    from towerline.training.data import training_windows
    from towerline.training.distributed import train_distributed

    results: dict[str, Any] = {}
    for workers in (1, 2):
        cfg = load_config(REPO / "configs" / "lastfm.yaml", [
            f"data.path={LASTFM}", f"trainer.workers={workers}", f"trainer.max_epochs={args.epochs}",
            "trainer.patience=100", "trainer.max_time_s=null", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "tracking.experiment=bench-scale", "tracking.register=false",
        ])
        t0 = time.perf_counter()
        r = train_distributed(cfg, work / f"lastfm-{workers}", progress=False)
        wall = time.perf_counter() - t0
        from towerline.features.sequences import Sequences
        from towerline.training.data import make_split

        split = make_split(Sequences.load(work / f"lastfm-{workers}" / "data" / "sequences.npz"), cfg.data)
        n_windows = len(training_windows(split.train, cfg.model.max_len)[0])
        fit_s = r.metrics["train/seconds"]
        results[f"workers_{workers}"] = {
            "test_ndcg_10": round(r.metrics["test/ndcg_10"], 4), "test_hr_10": round(r.metrics["test/hr_10"], 4),
            "epochs": int(r.metrics["train/epochs"]), "fit_s": round(fit_s, 1), "wall_s": round(wall, 1),
            "windows_per_s": round(n_windows * r.metrics["train/epochs"] / max(fit_s, 1e-9), 1),
        }
        log.info("lastfm, %d worker(s): %s", workers, results[f"workers_{workers}"])
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
        "loss.kind=sampled_softmax", "loss.n_negatives=4096", "trainer.batch_size=256", "model.dim=32",
        "model.n_layers=1", f"trainer.max_time_s={args.million_budget_s}", "trainer.max_epochs=1",
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
    t1 = time.perf_counter()
    trainer.fit(system, train_dataloaders=dm.train_dataloader())
    fit_s = time.perf_counter() - t1
    steps = trainer.global_step
    metrics = evaluate_with_faiss(system.net, dm.split.full, dm.split.test, "test", max_users=args.million_eval_users)
    return {"items": 1_000_000, "users": args.million_users, "events": gen["events"], "prepare_s": round(prep_s, 1),
            "train_steps": steps, "fit_s": round(fit_s, 1), "sequences_per_s": round(steps * cfg.trainer.batch_size / fit_s, 1),
            "eval": {k: round(v, 4) for k, v in metrics.items()}}


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
    ap.add_argument("--skip", nargs="*", default=[], choices=["features", "train"], help="parts to skip")
    ap.add_argument("--merge", action="store_true", help="keep the other parts' entries already in --out")
    ap.add_argument("--million", action="store_true", help="also train on a 1M-item shop (sampled softmax)")
    ap.add_argument("--million-users", type=int, default=2_000_000, help="users of the 1M-item shop (20 events each)")
    ap.add_argument("--million-budget-s", type=float, default=600)
    ap.add_argument("--million-eval-users", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    args = ap.parse_args(argv)
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
            report["targets"].append({"part": "train", "target": "2 Ray Train workers: same quality (test NDCG@10 within 10% of 1 worker)",
                                      "value": [one["test_ndcg_10"], two["test_ndcg_10"]],
                                      "met": two["test_ndcg_10"] >= 0.9 * one["test_ndcg_10"]})
            report["targets"].append({"part": "train", "target": "2 Ray Train workers: higher throughput than 1", "value": [one["windows_per_s"], two["windows_per_s"]],
                                      "met": two["windows_per_s"] > one["windows_per_s"]})
        if args.million:
            m = report["million"] = bench_million(args, work)
            report["targets"].append({"part": "million", "target": "1M-item shop trains with sampled softmax and evaluates by FAISS top-k",
                                      "value": m["eval"].get("test/ndcg_10"), "met": m["train_steps"] > 0})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.out.exists():  # one part per invocation, one results file
        old = json.loads(args.out.read_text())
        parts = [k for k in ("features", "train", "million") if k in report]
        kept = [t for t in old.get("targets", []) if t.get("part") not in parts]
        for k in ("features", "train", "million"):
            if k not in report and k in old:
                report[k] = old[k]
        report["commands"] = sorted(set(old.get("commands", [old.get("command", "")])) | {report["command"]})
        report["targets"] = kept + report["targets"]
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
