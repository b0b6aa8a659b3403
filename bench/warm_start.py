"""Warm-start benchmark: fine-tune the last version on the newest days vs retrain on everything.

    python bench/warm_start.py                       # synthetic shop, 3,000 users / 800 items

The synthetic shop's events are split by day: days before the 80% quantile train the *parent*;
days in [80%, 90%) are the newest period; days from 90% on are the *next period*, never trained on.
Two children are compared on the next period:

- full retrain: from scratch on every day before 90% (the config's own budget, 8 epochs);
- warm start:  ``trainer.warm_start=<parent bundle>`` on the newest period's events only, with a
  wall-clock budget of 25% of the full retrain's measured fit time.

Next-period NDCG@10: for each user active in the next period, the target is the first item they
touch then that their history lacks; the history is every event before the next period (both
models see the same one); scores go through the serving retrieval path (``recommender.retrieve``,
full catalogue, history masked). Targets: warm start within 2% of the full retrain's NDCG@10 in at
most 25% of its fit time. Writes bench/results/warm_start.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
K = 10

log = logging.getLogger("bench.warm_start")


def write_window(dataset, events: pd.DataFrame, out: Path) -> Path:
    from towerline.features.contracts import Dataset
    from towerline.features.writers import write_dataset

    write_dataset(Dataset(dataset.name, events.reset_index(drop=True), dataset.items, dataset.users), out)
    return out


def fit(cfg_overrides: list[str], data: Path, out: Path, tracking: str) -> tuple[object, float]:
    from towerline.config import load_config
    from towerline.training.train import train

    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        f"data.path={data}", "data.format=parquet", f"tracking.tracking_uri={tracking}", "tracking.register=false",
        *cfg_overrides])
    t0 = time.perf_counter()
    result = train(cfg, out, progress=False)
    return result, time.perf_counter() - t0


def next_period_ndcg(bundle_dir: Path, history: pd.DataFrame, future: pd.DataFrame, max_users: int) -> dict:
    from towerline.serving import recommender as rec
    from towerline.serving.settings import ServeSettings

    state = rec.load_model(bundle_dir)
    vocabs = state.bundle.vocabs
    hist = history.sort_values(["user_id", "timestamp"], kind="stable")
    by_user = {u: g for u, g in hist.groupby("user_id", sort=False, observed=True)}
    fut = future.sort_values(["user_id", "timestamp"], kind="stable")
    histories, targets = [], []
    for user, g in fut.groupby("user_id", sort=True, observed=True):
        h = by_user.get(user)
        if h is None or len(h) < 2:
            continue
        seen = set(h["item_id"].astype(str))
        new = [i for i in g["item_id"].astype(str) if i not in seen]
        if not new:
            continue
        items = vocabs.items.encode(h["item_id"].astype(str).to_numpy(dtype=object))
        types = vocabs.event_types.encode(h["event_type"].astype(str).to_numpy(dtype=object))
        ts = h["timestamp"].astype("int64").to_numpy() if not np.issubdtype(h["timestamp"].dtype, np.datetime64) \
            else h["timestamp"].astype("int64").to_numpy() // 10**9
        i, t, s = rec._fold_repeats(items, types, ts)
        histories.append(rec.UserHistory(i, t, s))
        targets.append(vocabs.items.encode_one(new[0]))
        if len(targets) >= max_users:
            break
    settings = ServeSettings(n_candidates=K)
    gains = []
    for lo in range(0, len(histories), 256):
        for (cand, _), target in zip(rec.retrieve(state, settings, histories[lo : lo + 256]), targets[lo : lo + 256]):
            where = np.flatnonzero(cand == target)
            gains.append(1.0 / math.log2(where[0] + 2) if where.size else 0.0)
    return {"users": len(gains), f"ndcg_{K}": float(np.mean(gains)) if gains else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--share", type=float, default=0.25, help="warm start's budget as a share of the full fit time")
    p.add_argument("--max-eval-users", type=int, default=3000)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "warm_start.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from towerline.features.synthetic import generate_dataset

    ds = generate_dataset(args.users, args.items, args.seed)
    ev = ds.events.copy()
    ts = pd.to_datetime(ev["timestamp"], unit="s") if not np.issubdtype(ev["timestamp"].dtype, np.datetime64) else ev["timestamp"]
    day = (ts - ts.min()).dt.days.to_numpy()
    d80, d90 = np.quantile(np.unique(day), [0.8, 0.9]).astype(int)
    parts = {"parent": ev[day < d80], "newest": ev[(day >= d80) & (day < d90)], "all_before": ev[day < d90],
             "next": ev[day >= d90]}
    log.info("days: parent < %d <= newest < %d <= next; events %s", d80, d90, {k: len(v) for k, v in parts.items()})
    with tempfile.TemporaryDirectory(prefix="towerline-warm-") as tmp:
        work = Path(tmp)
        tracking = f"sqlite:///{work / 'mlflow.db'}"
        parent, parent_s = fit([], write_window(ds, parts["parent"], work / "d-parent"), work / "parent", tracking)
        full, full_s = fit([], write_window(ds, parts["all_before"], work / "d-all"), work / "full", tracking)
        full_fit = full.metrics["train/seconds"]
        budget = 0.85 * args.share * full_fit  # Lightning checks max_time between batches and validates after: leave room
        warm, warm_s = fit([f"trainer.warm_start={parent.bundle_dir}", f"trainer.max_time_s={budget:.1f}", "trainer.max_epochs=50"],
                           write_window(ds, parts["newest"], work / "d-new"), work / "warm", tracking)
        warm_fit = warm.metrics["train/seconds"]
        res = {}
        for name, r in (("parent", parent), ("full_retrain", full), ("warm_start", warm)):
            res[name] = next_period_ndcg(r.bundle_dir, parts["all_before"], parts["next"], args.max_eval_users)
            res[name]["fit_s"] = round(r.metrics["train/seconds"], 1)
            res[name]["epochs"] = r.metrics.get("train/epochs")
        res["parent"]["wall_s"], res["full_retrain"]["wall_s"], res["warm_start"]["wall_s"] = (
            round(parent_s, 1), round(full_s, 1), round(warm_s, 1))
    f, w = res["full_retrain"][f"ndcg_{K}"], res["warm_start"][f"ndcg_{K}"]
    out = {
        "command": "python bench/" + Path(__file__).name + " " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": {"synthetic_users": args.users, "synthetic_items": args.items, "seed": args.seed,
                 "day_cutoffs": [int(d80), int(d90)], "events": {k: int(len(v)) for k, v in parts.items()}},
        "results": res,
        "warm_vs_full_ndcg": w / f if f else None,
        "warm_fit_share_of_full": warm_fit / full_fit if full_fit else None,
        "targets": {"ndcg_within_2pct": bool(f and w >= 0.98 * f), "time_at_most_25pct": bool(warm_fit <= 0.25 * full_fit + 1e-9)},
    }
    args.out.write_text(json.dumps(out, indent=2))
    log.info("%s", json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
