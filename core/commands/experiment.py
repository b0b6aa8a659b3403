"""``towerline experiment report | simulate``: measure an A/B experiment's arms, or demonstrate it.

Experiments come from the config's ``experiments:`` list (name, arms with traffic shares, control).
Feedback comes from the SQLite store ``POST /feedback`` writes (``--db``); ``simulate`` fills that
store with synthetic users whose true rates are known, so the report can be tried end to end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPORT_EXAMPLE = """example:
  towerline experiment report home-feed --config configs/synthetic.yaml --db feedback.db --out reports/

The config holds the experiment:
  experiments:
    - name: home-feed
      control: control
      currency: EUR          # money in the report is labelled with it
      arms:
        - {name: control, share: 0.5}
        - {name: challenger, share: 0.5, model: "models:/towerline-retriever@challenger"}"""

SIMULATE_EXAMPLE = """example:
  towerline experiment simulate home-feed --config configs/synthetic.yaml --users 20000 --db demo.db
  towerline experiment simulate home-feed --config configs/synthetic.yaml --users 20000 --db demo.db \\
      --rate control=0.05,0.03,40 --rate challenger=0.06,0.033,40 --out reports/

Each --rate is ARM=CTR,CONVERSION,MEAN_ORDER_VALUE; arms without one get the control's rates
(control default 0.05,0.03,40) with CTR and conversion 10% higher."""

DEFAULT_CONTROL_RATES = (0.05, 0.03, 40.0)
DEFAULT_UPLIFT = 1.10


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("experiment", help="A/B experiments: lift report per arm, or a simulation",
                       description="Report an A/B experiment's arms (users, CTR, conversion, revenue per user, "
                       "each with a 95% interval, and each arm's lift over control), or simulate one.",
                       epilog=REPORT_EXAMPLE, formatter_class=fmt)
    ex = p.add_subparsers(dest="experiment_command", metavar="<report|simulate>", required=True)

    r = ex.add_parser("report", help="print and write (HTML + JSON) the experiment's report",
                      description="Per arm: users, impressions, CTR, conversion and revenue per user with 95% "
                      "intervals, and each arm's lift over control with a bootstrap interval; a sample-ratio "
                      "mismatch check (chi-square vs the configured shares, flagged at p < 0.001) and a verdict "
                      "line per arm. Simulated feedback is marked as such.",
                      epilog=REPORT_EXAMPLE, formatter_class=fmt)
    _common(r)
    r.set_defaults(func=cmd_report)

    s = ex.add_parser("simulate", help="replay synthetic users with known rates into the feedback store",
                      description="Assign synthetic users to arms with the real hash, draw their impressions, "
                      "clicks and purchases from known rates, store them, and print the report.",
                      epilog=SIMULATE_EXAMPLE, formatter_class=fmt)
    _common(s)
    s.add_argument("--users", type=int, required=True, help="synthetic users to simulate")
    s.add_argument("--rate", action="append", default=[], metavar="ARM=CTR,CONV,VALUE",
                   help="true rates of one arm (repeatable)")
    s.add_argument("--impressions", type=float, default=5.0, help="mean impressions per user (default: 5)")
    s.add_argument("--seed", type=int, default=0, help="simulation seed (default: 0)")
    s.set_defaults(func=cmd_simulate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="experiment name (from the config's experiments: list)")
    p.add_argument("--config", type=Path, default=None, help="YAML config with the experiments: list")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--db", type=Path, default=Path("feedback.db"), help="feedback store (default: feedback.db)")
    p.add_argument("--out", type=Path, default=None, help="folder for <name>.html and <name>.json (default: print only, "
                   "except for `report`, which writes to the current folder)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for lift intervals (default: 1000)")


def _experiment(args: argparse.Namespace):
    from towerline.config import load_config
    from towerline.marketing.assignment import find_experiment
    return find_experiment(load_config(args.config, args.overrides).experiments, args.name)


def cmd_report(args: argparse.Namespace) -> int:
    from towerline.errors import DataValidationError
    from towerline.marketing.feedback import FeedbackStore
    from towerline.marketing.experiment_report import experiment_report, format_report, write_report
    experiment = _experiment(args)
    if not args.db.is_file():
        raise DataValidationError(f"{args.db}: feedback store not found; pass --db (the file POST /feedback writes)")
    report = experiment_report(FeedbackStore(args.db), experiment, n_boot=args.bootstrap)
    print(format_report(report))
    html_path, json_path = write_report(report, args.out or Path("."))
    print(f"written: {html_path}  {json_path}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from towerline.errors import ConfigError
    from towerline.marketing.feedback import FeedbackStore
    from towerline.marketing.experiment_report import experiment_report, format_report, write_report
    from towerline.marketing.simulation import simulate
    experiment = _experiment(args)
    if args.users < 1:
        raise ConfigError(f"--users must be >= 1, got {args.users}")
    rates = parse_rates(args.rate, [a.name for a in experiment.arms], experiment.control)
    store = FeedbackStore(args.db)
    written = simulate(store, experiment, args.users, rates, seed=args.seed, impressions_per_user=args.impressions)
    print(f"simulated {args.users:,} users of experiment {experiment.name}: {written:,} events -> {args.db}")
    for arm, (ctr, conv, value) in rates.items():
        print(f"  true rates {arm}: CTR {ctr:.2%}, conversion {conv:.2%}, mean order value {value:.2f}")
    report = experiment_report(store, experiment, n_boot=args.bootstrap)
    print(format_report(report))
    if args.out:
        html_path, json_path = write_report(report, args.out)
        print(f"written: {html_path}  {json_path}")
    return 0


def parse_rates(items: list[str], arms: list[str], control: str) -> dict[str, tuple[float, float, float]]:
    """``["control=0.05,0.03,40", ...]`` -> ``{arm: (ctr, conversion, mean_value)}`` for every arm."""
    from towerline.errors import ConfigError

    given: dict[str, tuple[float, float, float]] = {}
    for item in items:
        arm, _, raw = item.partition("=")
        try:
            ctr, conv, value = (float(x) for x in raw.split(","))
        except ValueError:
            raise ConfigError(f"--rate {item!r}: expected ARM=CTR,CONVERSION,MEAN_VALUE, e.g. control=0.05,0.03,40") from None
        if arm not in arms:
            raise ConfigError(f"--rate {item!r}: no arm '{arm}'; arms: {', '.join(arms)}")
        given[arm] = (ctr, conv, value)
    base = given.get(control, DEFAULT_CONTROL_RATES)
    lifted = (min(1.0, base[0] * DEFAULT_UPLIFT), min(1.0, base[1] * DEFAULT_UPLIFT), base[2])
    return {a: given.get(a, base if a == control else lifted) for a in arms}
