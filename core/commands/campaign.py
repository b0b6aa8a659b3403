"""``towerline campaign run | preview``: evaluate a campaign's trigger over the event log and write
its messages to an outbox (a Parquet folder, RabbitMQ or NATS JetStream), or count them first.

The campaign engine is ``towerline.marketing.campaigns``. Content "the model's recommendations"
must go through the serving request path (business rules, consent, popular fallback), which
marketing may not import; this file builds that callable from ``towerline.serving.recommender``
and hands it in. (``report`` joins these subcommands later.)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from towerline.commands.campaign_report import register_report

if TYPE_CHECKING:
    import pandas as pd

RUN_EXAMPLE = """examples:
  towerline campaign run welcome --data data/synthetic --model runs/latest/bundle \\
      --as-of 2025-06-30T09:00 --outbox outbox/
  towerline campaign run win-back --data data/synthetic --model models:/towerline-retriever@champion \\
      --as-of 2025-06-30T09:00 --scores scores.parquet --outbox amqp://guest:guest@127.0.0.1:5672/%2F?queue=campaigns
  towerline campaign run viewed-not-bought --data data/synthetic --model runs/latest/bundle \\
      --as-of 2025-06-30T09:00 --scores scores.parquet --outbox nats://127.0.0.1:4222 --ledger outbox-ledger/

Campaigns are configs/campaigns/<name>.yaml (or --campaigns DIR). Re-running for the same time
publishes nothing new: message ids hash (campaign, user, trigger moment)."""

PREVIEW_EXAMPLE = """example:
  towerline campaign preview related-after-purchase --data data/synthetic --as-of 2025-06-30T09:00 --outbox outbox/

Counts per status (holdout, no consent, capped, ...), and messages per trigger day, channel,
segment and offer. --outbox gives the history that de-duplication and frequency caps read."""


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("campaign", help="campaigns: run one into an outbox, or preview its counts",
                       description="Evaluate a campaign (trigger, eligibility, content, offer, channels, holdout) "
                       "over the event log at a time and publish its messages once each.",
                       epilog=RUN_EXAMPLE, formatter_class=fmt)
    actions = p.add_subparsers(dest="campaign_command", metavar="<run|preview|report>", required=True)

    r = actions.add_parser("run", help="write the campaign's new messages to an outbox",
                           description="Evaluate the trigger at --as-of, apply consent, segments, holdout, "
                           "frequency caps and quiet hours, attach content and offers, and publish the new "
                           "messages to --outbox.", epilog=RUN_EXAMPLE, formatter_class=fmt)
    _common(r)
    r.add_argument("--model", default=None, help="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias> "
                   "(needed for recommendations, similar items and item-launch audiences)")
    r.add_argument("--outbox", required=True, help="folder for Parquet files, amqp://... (RabbitMQ) or nats://... (JetStream)")
    r.set_defaults(func=cmd_run)

    v = actions.add_parser("preview", help="count the campaign's messages without sending",
                           description="Count what `run` would send at --as-of: rows per status and messages "
                           "per trigger day, channel, segment and offer.", epilog=PREVIEW_EXAMPLE, formatter_class=fmt)
    _common(v)
    v.add_argument("--model", default=None, help="bundle (needed only for an item_launch trigger's audience)")
    v.add_argument("--outbox", default=None, help="the outbox whose history de-duplication and caps read (default: none)")
    v.set_defaults(func=cmd_preview)

    register_report(actions)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="campaign name (configs/campaigns/<name>.yaml) or a campaign YAML file")
    p.add_argument("--data", required=True, help="data folder (events, users with consent columns) or events file")
    p.add_argument("--format", choices=["csv", "parquet"], default=None, help="format of --data (default: from the suffix)")
    p.add_argument("--as-of", required=True, help="the run's time: ISO-8601 (UTC unless it has a zone) or epoch seconds")
    p.add_argument("--campaigns", type=Path, default=Path("configs/campaigns"), help="campaign folder (default: configs/campaigns)")
    p.add_argument("--scores", default=None, help="Parquet of per-user scores (user_id, churn_probability, predicted_ltv, ...)")
    p.add_argument("--profiles", default=None, help="profiles Parquet (default: built from --data at --as-of)")
    p.add_argument("--ledger", default=None, help="broker outboxes: folder of published ids (default: outbox-ledger)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")


def _prepare(args: argparse.Namespace):
    from towerline.marketing.campaign_config import find_campaign
    from towerline.marketing.campaigns import campaign_score_columns, load_inputs, parse_time

    campaign = find_campaign(args.name, args.campaigns)
    as_of = parse_time(args.as_of)
    if args.model and args.model.startswith(("runs:/", "models:/")):  # MLflow only when the URI needs it (slow import)
        from towerline.config import TrackingConfig
        from towerline.training.tracking import use_tracking

        use_tracking(TrackingConfig(tracking_uri=args.tracking_uri))
    inputs = load_inputs(args.data, as_of, format=args.format, model=args.model,
                         profiles_path=args.profiles, scores_path=args.scores,
                         score_columns=campaign_score_columns(campaign))
    return campaign, as_of, inputs


def cmd_run(args: argparse.Namespace) -> int:
    from towerline.marketing.campaigns import events_after_training, run_campaign, with_uplift_scores
    from towerline.marketing.outbox import open_outbox, redact

    campaign, as_of, inputs = _prepare(args)
    outbox = open_outbox(args.outbox, args.ledger)
    inputs.scores = with_uplift_scores(campaign, inputs, as_of, outbox)
    recommend = None
    if args.model and campaign.content.kind == "recommendations":
        recommend = serving_recommend(args.model, events_after_training(inputs.bundle, inputs.data, as_of))
    result = run_campaign(campaign, inputs.data, as_of, outbox, recommend=recommend, bundle=inputs.bundle,
                          profiles=inputs.profiles, scores=inputs.scores)
    counts = ", ".join(f"{k} {v:,}" for k, v in sorted(result.counts.items())) or "nothing triggered"
    print(f"campaign {campaign.name} at {args.as_of}: {counts}")
    print(f"published {len(result.messages):,} new messages -> {redact(args.outbox)}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from towerline.marketing.campaigns import plan_campaign, preview_counts, with_uplift_scores
    from towerline.marketing.outbox import empty_messages, open_outbox

    campaign, as_of, inputs = _prepare(args)
    outbox = open_outbox(args.outbox, args.ledger) if args.outbox else None
    history = outbox.history() if outbox is not None else empty_messages()
    inputs.scores = with_uplift_scores(campaign, inputs, as_of, outbox)
    plan = plan_campaign(campaign, inputs.data, as_of, history, profiles=inputs.profiles, scores=inputs.scores,
                         bundle=inputs.bundle, with_content=False)
    counts = preview_counts(plan)
    print(f"campaign {campaign.name} ({campaign.trigger.kind}) at {args.as_of}: {len(plan):,} rows")
    for section, values in counts.items():
        print(f"  by {section}:")
        for key, n in values.items():
            print(f"    {key:<24} {n:>8,}")
        if not values:
            print("    (none)")
    return 0


def serving_recommend(model: str, recent_events: "pd.DataFrame | None" = None):
    """``(user_ids, k) -> item lists`` through the serving path (rules, consent, popular fallback).

    ``recent_events`` (``user_id, item_id, event_type, timestamp``: the log's events newer than the
    model's training data) reach the user tower as the online history store's events would.
    """
    import torch
    from towerline.serving.recommender import Recommender, load_model
    from towerline.serving.settings import ServeSettings

    settings = ServeSettings()
    torch.set_num_threads(settings.threads)  # one request at a time: more threads only spin (41 -> 5 ms/user here)
    rec = Recommender(load_model(model), settings, _EventLog(recent_events))

    def recommend(user_ids: Sequence[str], k: int) -> list[list[str]]:
        return [[item for item, _ in rec.recommend(str(u), k).items] for u in user_ids]

    return recommend


class _EventLog:
    """The read side of the ``HistoryStore`` protocol over a frame of events (oldest first)."""

    def __init__(self, events: "pd.DataFrame | None") -> None:
        from towerline.serving.history import HistoryEvent

        self.by_user: dict[str, list] = {}
        if events is not None and len(events):
            e = events.sort_values("timestamp", kind="stable")
            for user, g in e.groupby(e["user_id"].astype(str), sort=False):
                self.by_user[user] = [HistoryEvent(str(i), str(t), int(ts)) for i, t, ts in
                                      zip(g["item_id"], g["event_type"], g["timestamp"])]

    def recent(self, user_id: str, n: int) -> list:
        return self.by_user.get(user_id, [])[-n:]

    def count(self) -> int:
        return sum(map(len, self.by_user.values()))

    def close(self) -> None:
        pass
