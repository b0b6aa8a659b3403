"""``towerline campaign report``: what a campaign's messages brought in, against its holdout.

``register_report(campaign_subparsers)`` adds the ``report`` subcommand to the ``campaign`` parser
that ``towerline.commands.campaign`` (``campaign run | preview``) builds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPORT_EXAMPLE = """example:
  towerline campaign report spring-sale --outbox outbox/ --data data/synthetic --out reports/
  towerline campaign report all --outbox outbox/ --data events.parquet --out reports/ \\
      --cost email=0.002 --cost sms=0.05 --window-days 14 --currency GBP

The outbox is the Parquet folder `towerline campaign run` writes (one row per message, holdout
users included with holdout=true). Opens and clicks are events of type open/click with the
message's channel (or a message_id column); conversions are purchase events, revenue their value."""


def register_report(campaign_sub: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``campaign`` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    r = campaign_sub.add_parser(
        "report", help="per channel sends/opens/clicks/conversions/revenue/cost, lift over holdout, ROI, attribution",
        description="Per campaign and channel: sends, opens, clicks, conversions, revenue and cost; incremental "
        "conversions and revenue against the holdout with 95%% intervals; ROI and LTV/CAC; last-touch, linear, "
        "position-based and Markov attribution side by side. Writes HTML + JSON.",
        epilog=REPORT_EXAMPLE, formatter_class=fmt)
    r.add_argument("name", help="campaign name in the outbox, or 'all'")
    r.add_argument("--outbox", type=Path, required=True, help="outbox Parquet folder (from `towerline campaign run`)")
    r.add_argument("--data", type=Path, required=True, help="data folder with events.* or an events file")
    r.add_argument("--out", type=Path, default=Path("."), help="folder for campaign-<name>.html/.json (default: .)")
    r.add_argument("--window-days", type=float, default=7.0, help="purchase window after a message (default: 7)")
    r.add_argument("--currency", default="EUR", help="currency code of the event values (default: EUR)")
    r.add_argument("--cost", action="append", default=[], metavar="CHANNEL=AMOUNT",
                   help="cost of one message on a channel (repeatable; defaults: email 0.002, push 0.0005, sms 0.05)")
    dp = r.add_argument_group("differentially private results by segment (needs the 'campaigns' extra)")
    dp.add_argument("--private-by-segment", type=Path, default=None, metavar="PROFILES",
                    help="also release users, conversions and revenue per segment x holdout with differential "
                    "privacy, segments from this profiles.parquet")
    dp.add_argument("--epsilon", type=float, default=1.0, help="epsilon of that release (default: 1.0)")
    dp.add_argument("--ledger", type=Path, default=Path("privacy_ledger.json"),
                    help="privacy ledger JSON (default: privacy_ledger.json)")
    dp.add_argument("--budget", type=float, default=None, help="total epsilon budget when creating the ledger")
    dp.add_argument("--revenue-cap", type=float, default=500.0, help="per-user revenue clip (default: 500)")
    r.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from towerline.errors import ConfigError
    from towerline.marketing.campaign_report import (
        DEFAULT_COST_PER_MESSAGE,
        CampaignReportSettings,
        campaign_report,
        campaign_verdict,
        read_campaign_events,
        read_outbox,
        write_campaign_report,
    )

    costs = dict(DEFAULT_COST_PER_MESSAGE)
    for item in args.cost:
        ch, _, raw = item.partition("=")
        try:
            costs[ch] = float(raw)
        except ValueError:
            raise ConfigError(f"--cost {item!r}: expected CHANNEL=AMOUNT, e.g. email=0.002") from None
    if args.window_days <= 0:
        raise ConfigError(f"--window-days must be > 0, got {args.window_days}")
    settings = CampaignReportSettings(window_days=args.window_days, currency=args.currency, costs=costs)
    report = campaign_report(read_outbox(args.outbox), read_campaign_events(args.data), args.name, settings)
    for name, c in report["campaigns"].items():
        print(f"{name}: {campaign_verdict(c, settings.currency)}")
    html_path, json_path = write_campaign_report(report, args.out)
    print(f"written: {html_path}  {json_path}")
    if args.private_by_segment is not None:
        print(f"written: {release_private(args, settings)}")
    return 0


def release_private(args: argparse.Namespace, settings) -> Path:
    """The DP release of results by segment x holdout, charged to the ledger, as CSV beside the report."""
    import re

    from towerline.features.user_features import SEGMENTS, UNKNOWN
    from towerline.marketing.campaign_report import (
        outcomes_by_segment,
        read_campaign_events,
        read_outbox,
    )
    from towerline.marketing.privacy import PrivacyLedger, release_results_by_segment
    from towerline.marketing.profiles import load_profiles

    outcomes = outcomes_by_segment(read_outbox(args.outbox), read_campaign_events(args.data), args.name,
                                   load_profiles(args.private_by_segment), settings)
    ledger = PrivacyLedger(args.ledger, args.budget)
    table = release_results_by_segment(outcomes, args.epsilon, ledger, args.revenue_cap,
                                       name=f"campaign {args.name} results by segment",
                                       categories={"segment": [*SEGMENTS, UNKNOWN], "holdout": [False, True]})
    path = Path(args.out) / f"campaign-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.name)}-by-segment-dp.csv"
    table.to_csv(path, index=False)
    print(f"privacy: epsilon {args.epsilon:g} spent, {ledger.spent:g} of {ledger.budget:g} in {ledger.path}")
    return path
