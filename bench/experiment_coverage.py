"""Benchmark: do the experiment report's 95% intervals hold the truth 95% of the time?

Runs ``--experiments`` simulated A/B tests with known rates (``marketing.simulation.simulate_per_user``:
the real assignment hash, Poisson impressions, Bernoulli clicks and orders, Gamma order values)
through the report's statistics (``experiment_report.report_from_users``) and counts, per metric,
how often each interval contains the true value:

* per arm: CTR (delta method), conversion (Wilson), revenue per user (normal);
* the treatment's relative lift over control (Poisson bootstrap percentile interval).

Target: every coverage in [93%, 97%]. With E experiments a true 95% coverage is measured with
standard error sqrt(0.95 * 0.05 / E) (1.1 points at E = 400), printed beside each figure.

Usage::

    python bench/experiment_coverage.py --experiments 400 --users 10000

Writes ``bench/results/experiment_coverage.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.experiment_coverage")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", type=int, default=400)
    p.add_argument("--users", type=int, default=10_000, help="users per experiment (both arms)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates per experiment")
    p.add_argument("--control", default="0.05,0.04,40", help="true CTR,CONVERSION,MEAN_ORDER_VALUE of control")
    p.add_argument("--lift", type=float, default=0.10, help="true relative lift of treatment's CTR and conversion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "experiment_coverage.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("towerline").setLevel(logging.WARNING)

    from towerline.config import ArmConfig, ExperimentConfig
    from towerline.marketing.experiment_report import METRICS, report_from_users
    from towerline.marketing.simulation import simulate_per_user

    exp = ExperimentConfig("coverage", (ArmConfig("control", share=0.5), ArmConfig("treatment", share=0.5)))
    ctr, conv, value = (float(x) for x in args.control.split(","))
    true = {"control": (ctr, conv, value), "treatment": (ctr * (1 + args.lift), conv * (1 + args.lift), value)}
    arm_truth = {arm: {"ctr": r[0], "conversion": r[1], "revenue_per_user": r[1] * r[2]} for arm, r in true.items()}
    lift_truth = {m: arm_truth["treatment"][m] / arm_truth["control"][m] - 1 for m in METRICS}

    hits: dict[str, int] = {}
    widths: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for k in range(args.experiments):
        users = simulate_per_user(exp, args.users, true, seed=args.seed * 1_000_003 + k)
        report = report_from_users(users, exp, n_boot=args.bootstrap, seed=k)
        for arm in ("control", "treatment"):
            for m in METRICS:
                lo, hi = report["arms"][arm][m]["ci"]
                key = f"{arm}/{m}"
                hits[key] = hits.get(key, 0) + int(lo <= arm_truth[arm][m] <= hi)
                widths.setdefault(key, []).append(hi - lo)
        for m in METRICS:
            lo, hi = report["arms"]["treatment"]["lift"][m]["relative"]["ci"]
            key = f"lift/{m}"
            hits[key] = hits.get(key, 0) + int(lo <= lift_truth[m] <= hi)
            widths.setdefault(key, []).append(hi - lo)
        if (k + 1) % 50 == 0:
            log.info("%d / %d experiments (%.0f s)", k + 1, args.experiments, time.perf_counter() - t0)
    E = args.experiments
    se = float(np.sqrt(0.95 * 0.05 / E))
    coverage = {k: h / E for k, h in hits.items()}
    result = {
        "coverage": coverage,
        "mean_ci_width": {k: float(np.mean(w)) for k, w in widths.items()},
        "all_within_93_97": all(0.93 <= c <= 0.97 for c in coverage.values()),
        "standard_error_at_95": se,
        "experiments": E, "users_per_experiment": args.users, "bootstrap": args.bootstrap,
        "true_rates": true, "true_lift": lift_truth,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for k, c in coverage.items():
        flag = "ok" if 0.93 <= c <= 0.97 else "OUT OF [93%, 97%]"
        print(f"{k:<28} coverage {c:6.1%}  (+- {se:.1%} s.e.)  {flag}")
    print(f"{E} experiments x {args.users:,} users in {result['seconds']} s; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
