"""``towerline campaign report``: what a campaign's messages brought in, against its holdout.

``register_report(campaign_subparsers)`` adds the ``report`` subcommand to the ``campaign`` parser
that ``towerline.commands.campaign`` (``campaign run | preview``) builds. Until that module exists,
``register_standalone`` builds a ``campaign`` parser holding only ``report``.
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
    r.set_defaults(func=cmd_report)


def register_standalone(sub: argparse._SubParsersAction) -> None:
    """A ``campaign`` command with only ``report``, for trees without ``towerline.commands.campaign``."""
    p = sub.add_parser("campaign", help="campaigns: report", description="Campaign reports.",
                       epilog=REPORT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    register_report(p.add_subparsers(dest="campaign_command", metavar="<report>", required=True))


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
    return 0
