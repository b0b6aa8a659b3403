"""Time-aware history benchmark: position-only vs time-gap user tower on the synthetic shop.

    python bench/time_gaps.py                              # configs/synthetic.yaml, seed 42, 8 epochs
    python bench/time_gaps.py --seeds 42 7 --max-time-s 120

Trains ``configs/synthetic.yaml`` twice per seed with the same budget (epochs and wall-clock cap),
``model.time_gaps`` false then true, and reports each run's best validation NDCG@10 (the model
selection signal) and its test NDCG@10/HR@10 (history masked, full ranking), with the time per epoch.
The synthetic shop has real timestamps with session structure: inside a session the next item
follows a successor of the previous one far more often than across sessions, which only the times
reveal. Writes bench/results/time_gaps.json; runs in a temporary MLflow store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("best/valid_ndcg_10", "test/ndcg_10", "test/hr_10", "test_unmasked/ndcg_10")


def run(time_gaps: bool, seed: int, args: argparse.Namespace, uri: str, work: Path) -> dict:
    from towerline.config import load_config
    from towerline.training.train import train

    overrides = [
        f"model.time_gaps={str(time_gaps).lower()}",
        f"trainer.seed={seed}",
        f"trainer.max_epochs={args.epochs}",
        f"tracking.tracking_uri={uri}",
        *args.overrides,
    ]
    if args.max_time_s:
        overrides.append(f"trainer.max_time_s={args.max_time_s}")
    cfg = load_config(REPO / "configs" / "synthetic.yaml", overrides)
    t0 = time.perf_counter()
    result = train(cfg, work / f"gaps{int(time_gaps)}-seed{seed}", progress=False)
    wall = time.perf_counter() - t0
    curve = result.curve
    return {
        "time_gaps": time_gaps,
        "seed": seed,
        "wall_s": round(wall, 1),
        "epochs": len(curve),
        "seconds_per_epoch": round(curve[-1]["elapsed_s"] / max(len(curve), 1), 2) if curve else None,
        **{k: result.metrics.get(k) for k in KEYS},
        "valid_ndcg_10_curve": [(round(p["elapsed_s"], 1), p.get("valid/ndcg_10")) for p in curve],
    }


def summary(runs: list[dict]) -> dict:
    out = {}
    for arm, on in (("position_only", False), ("time_gaps", True)):
        rows = [r for r in runs if r["time_gaps"] is on]
        out[arm] = {k: statistics.median(r[k] for r in rows) for k in KEYS if all(r[k] is not None for r in rows)}
    base, new = out["position_only"], out["time_gaps"]
    out["ratio"] = {k: new[k] / base[k] for k in KEYS if base.get(k) and k in new}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--epochs", type=int, default=8, help="max epochs per run (the config's 8)")
    parser.add_argument("--max-time-s", type=float, default=None, help="wall-clock cap per run, seconds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "time_gaps.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out = args.out.resolve()
    work = Path(tempfile.mkdtemp(prefix="towerline-time-gaps-"))
    os.chdir(work)  # MLflow's ./mlruns artifacts stay out of the checkout
    uri = f"sqlite:///{work / 'mlflow.db'}"
    runs = []
    for seed in args.seeds:
        for on in (False, True):
            r = run(on, seed, args, uri, work)
            print(f"seed {seed} time_gaps={on}: valid NDCG@10 {r['best/valid_ndcg_10']:.4f}  test NDCG@10 "
                  f"{r['test/ndcg_10']:.4f}  HR@10 {r['test/hr_10']:.4f}  {r['epochs']} epochs, "
                  f"{r['seconds_per_epoch']} s/epoch", flush=True)
            runs.append(r)
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "load_average": os.getloadavg(),
        "runs": runs,
        "median": summary(runs),
    }
    for arm in ("position_only", "time_gaps"):
        m = report["median"][arm]
        print(f"{arm:14s} valid NDCG@10 {m['best/valid_ndcg_10']:.4f}  test NDCG@10 {m['test/ndcg_10']:.4f}  HR@10 {m['test/hr_10']:.4f}")
    print("ratio time_gaps / position_only:", {k: round(v, 3) for k, v in report["median"]["ratio"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
