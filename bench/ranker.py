"""Ranking-stage benchmark: retrieve-then-rank vs retrieval alone, and the ranker's latency.

    python bench/ranker.py                                   # Beauty: retriever (config budget) + ranker
    python bench/ranker.py --dataset lastfm --set trainer.max_time_s=120 --set ranker.max_epochs=5
    python bench/ranker.py --model runs/beauty/bundle        # ranker only, for a retriever already trained

Quality: test NDCG@10 of the pipeline (retriever top-N, re-ranked) against the retriever alone on the
same users, full catalogue, history masked; the ratio with its 95% paired-bootstrap interval (target:
>= 1.05x with the interval above 1.0) and the retriever's recall@N (the ceiling of any re-ranking).
Latency: ``rank_candidates`` for one user and N = 100 candidates, in process, one thread, real test
histories and candidates (target: p50 <= 5 ms). Writes bench/results/ranker.json with the command line.
Runs in a temporary MLflow store unless --tracking-uri is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"lift_ndcg_10": 1.05, "lift_ci_low_above": 1.0, "latency_p50_ms": 5.0}


def measure_latency(bundle_dir: Path, n_users: int, n_candidates: int, repeats: int) -> dict[str, float]:
    """Per-call wall time of ``rank_candidates`` (one user, ``n_candidates``), torch on one thread."""
    import torch

    from towerline.training.bundle import load_bundle
    from towerline.training.candidates import eval_positions, retrieve_candidates
    from towerline.training.data import make_split
    from towerline.training.inference import rank_candidates

    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir)
    if bundle.ranker is None:
        raise SystemExit(f"{bundle_dir} has no ranker/")
    split = make_split(bundle.histories, bundle.config.data)
    test = split.test
    pos = eval_positions(split.full, test)
    take = np.arange(min(n_users, len(test)))
    sub = type(pos)(**{k: v[take] for k, v in pos.__dict__.items()})
    cands = retrieve_candidates(bundle.net, split.full, sub, n_candidates, bundle.ranker.cfg.history_len)
    full = split.full
    args = []
    for u in take:
        lo, hi = full.offsets[test.rows[u]], test.history_end[u]
        args.append((full.item_idx[lo:hi], full.event_type_idx[lo:hi], full.timestamp[lo:hi], cands.cand[u], cands.cand_scores[u]))
    for a in args[:20]:  # warm-up
        rank_candidates(bundle.ranker, *a)
    times = []
    for _ in range(repeats):
        for a in args:
            t0 = time.perf_counter()
            rank_candidates(bundle.ranker, *a)
            times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000.0
    return {
        "calls": int(len(ms)),
        "n_candidates": int(cands.cand.shape[1]),
        "threads": 1,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="beauty", choices=["beauty", "lastfm", "synthetic"])
    parser.add_argument("--model", type=Path, default=None, help="existing bundle: train only its ranker (on a copy)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--latency-users", type=int, default=200)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ranker.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from towerline.config import load_config, to_dict

    work = Path(tempfile.mkdtemp(prefix="towerline-ranker-"))

    # paths given on the command line are relative to where it ran
    args.out, args.model = args.out.resolve(), (args.model.resolve() if args.model else None)
    os.chdir(work)  # MLflow puts run artifacts under ./mlruns: keep them out of the checkout
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    t0 = time.perf_counter()
    if args.model:
        from towerline.training.ranker_train import train_ranker_for_bundle

        bundle_dir = work / "bundle"
        shutil.copytree(args.model, bundle_dir)
        result = train_ranker_for_bundle(bundle_dir, None, ["ranker.enabled=true", *args.overrides], uri, progress=False, register=False)
        metrics, config = result.metrics, None
    else:
        from towerline.training.train import train

        cfg = load_config(REPO / "configs" / f"{args.dataset}.yaml",
                          ["ranker.enabled=true", *args.overrides, f"tracking.tracking_uri={uri}"])
        result = train(cfg, work / args.dataset, progress=False)
        metrics, bundle_dir, config = result.metrics, result.bundle_dir, to_dict(cfg)
    wall = time.perf_counter() - t0
    n = next(k.rsplit("_", 1)[1] for k in metrics if k.startswith("test/retrieval_recall_"))
    latency = measure_latency(bundle_dir, args.latency_users, int(n), args.latency_repeats)

    lift, low = metrics["test/pipeline_lift_ndcg_10"], metrics["test/pipeline_lift_ndcg_10_ci_low"]
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "dataset": args.dataset if not args.model else str(args.model),
        "wall_s": wall,
        "config": config,
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("test/", "valid/", "ranker/"))},
        "latency": latency,
        "targets": {
            "lift_ndcg_10": {"target": TARGETS["lift_ndcg_10"], "value": lift, "met": lift >= TARGETS["lift_ndcg_10"]},
            "lift_ci_low": {"target": f"> {TARGETS['lift_ci_low_above']}", "value": low, "met": low > TARGETS["lift_ci_low_above"]},
            "latency_p50_ms": {"target": TARGETS["latency_p50_ms"], "value": latency["p50_ms"],
                               "met": latency["p50_ms"] <= TARGETS["latency_p50_ms"]},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"test NDCG@10 pipeline {metrics['test/pipeline_ndcg_10']:.4f} vs retrieval {metrics['test/retrieval_ndcg_10']:.4f}: "
          f"{lift:.3f}x [{low:.3f}, {metrics['test/pipeline_lift_ndcg_10_ci_high']:.3f}]; recall@{n} "
          f"{metrics[f'test/retrieval_recall_{n}']:.3f}; ranker p50 {latency['p50_ms']:.2f} ms (N={latency['n_candidates']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
