"""Quality benchmark: train the shared configs on the public S3Rec data sets, full-ranking metrics.

    python bench/quality.py                          # Beauty and LastFM with their configs' budgets
    python bench/quality.py --datasets beauty --set trainer.max_time_s=1000

Writes bench/results/quality.json: per data set the test metrics (masked and unmasked), time per
epoch, the validation NDCG@10 curve against wall time, the targets and whether each was met.
Runs in a temporary MLflow store unless --tracking-uri is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Published full-ranking, leave-one-out, history-masked figures and this project's targets.
TARGETS = {
    "beauty": {"test/ndcg_10": 0.048, "test/hr_10": 0.088, "valid_ndcg_10_at_1000s": 0.046},
    "lastfm": {"test/ndcg_10": 0.045},
}
PUBLISHED = {
    "beauty": {"SASRec": (0.0318, 0.0605), "S3-Rec": (0.0327, 0.0647), "best contrastive (~)": (0.0446, 0.0871)},
    "lastfm": {"S3-Rec": (0.0427, 0.0743)},
}


def run(dataset: str, overrides: list[str], tracking_uri: str, out: Path) -> dict:
    from towerline.config import load_config, to_dict
    from towerline.training.train import train

    cfg = load_config(REPO / "configs" / f"{dataset}.yaml", overrides + [f"tracking.tracking_uri={tracking_uri}"])
    t0 = time.perf_counter()
    result = train(cfg, out / dataset, progress=False)
    wall = time.perf_counter() - t0
    curve = result.curve
    per_epoch = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip([{"elapsed_s": 0.0}] + curve[:-1], curve)]
    at_1000 = max((p.get("valid/ndcg_10", 0.0) for p in curve if p["elapsed_s"] <= 1000.0), default=None)
    targets = TARGETS.get(dataset, {})
    met = {}
    for key, goal in targets.items():
        value = at_1000 if key == "valid_ndcg_10_at_1000s" else result.metrics.get(key)
        met[key] = {"target": goal, "value": value, "met": value is not None and value >= goal}
    return {
        "config": to_dict(cfg),
        "run_id": result.run_id,
        "wall_s": wall,
        "epochs": len(curve),
        "seconds_per_epoch": sum(per_epoch) / max(len(per_epoch), 1),
        "metrics": result.metrics,
        "valid_ndcg_10_curve": [(round(p["elapsed_s"], 1), p.get("valid/ndcg_10")) for p in curve],
        "targets": met,
        "published": PUBLISHED.get(dataset, {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["beauty", "lastfm"], choices=["beauty", "lastfm"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    work = Path(tempfile.mkdtemp(prefix="towerline-quality-"))

    args.out = args.out.resolve()  # paths given on the command line are relative to where it ran
    os.chdir(work)  # MLflow puts run artifacts under ./mlruns: keep them out of the checkout
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])), "results": {}}
    for name in args.datasets:
        report["results"][name] = run(name, args.overrides, uri, work)
        r = report["results"][name]
        m = r["metrics"]
        print(f"{name}: test NDCG@10 {m['test/ndcg_10']:.4f}  HR@10 {m['test/hr_10']:.4f}  "
              f"NDCG@20 {m['test/ndcg_20']:.4f}  MRR {m['test/mrr']:.4f}  (unmasked NDCG@10 "
              f"{m['test_unmasked/ndcg_10']:.4f}); {r['epochs']} epochs, {r['seconds_per_epoch']:.1f} s/epoch")
        for key, t in r["targets"].items():
            print(f"   {key}: {t['value']} vs target {t['target']} -> {'met' if t['met'] else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
