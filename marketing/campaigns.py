"""The campaign engine: triggers over the event log -> eligibility -> content -> offer -> messages.

One sequence, shared by the batch run (``run_campaign``: ``towerline campaign run``), the preview
(``plan_campaign`` without content: ``towerline campaign preview``) and the immediate path the
service calls for signups (``messages_for_events``):

1. **Trigger** (``triggered``): rows of (user, trigger moment, anchor item, reason). Day-based
   triggers (signup, purchase + N days, view without purchase + N days) count calendar days in
   the campaign's timezone: a purchase on Monday with ``days: 3`` is due on Thursday, and any run
   on Thursday (or up to ``window_days`` later) sends it. The trigger moment is the *day* of the
   event, so two purchases on one day make one message. ``churn_risk`` reads a score column and
   its moment is the run's day (the per-campaign frequency cap keeps it from repeating daily);
   ``item_launch`` takes the launched item's audience (``audience.find_audience``) on launch day.
2. **Eligibility** (``eligible``): consent (``consent == False`` or a user absent from the users
   table gets nothing), lifecycle segment, a channel the user consents to (``consent_<channel>``
   columns where the users table has them), the holdout (a stable hash of (campaign, user), the
   same function A/B arms use, so a holdout user stays held out on every run and can be
   compared with the treated users later), then messages already sent and the frequency caps
   (counted in the outbox's history). Every row keeps a ``status``: the preview counts them.
3. **Content** (``attach_content``): the model's recommendations through an injected
   ``recommend(user_ids, k)`` callable (the serving path, with its business rules and fallback,
   lives in ``serving/``, which marketing may not import), the purchased item's neighbours in the
   item tower's space, the viewed item, or the launched item.
4. **Offer** (``attach_offers``): none, fixed, tiered by predicted LTV, or given to the highest
   predicted uplift until the budget is spent; scores come from a per-user column (profiles or a
   ``--scores`` Parquet). Without one, ``load_inputs`` has the churn and LTV models score the
   profiles it builds at ``as_of`` (``scores.add_campaign_scores``), and ``with_uplift_scores``
   learns the uplift from the outbox's earlier messages and holdout of the campaign.
5. **Message** ids hash (campaign, user, trigger moment), so a re-run for the same time makes the
   same ids and the outbox drops them; quiet hours move ``send_at`` to their end. The held-out
   rows are recorded beside the messages (``Outbox.record_holdout``): the report's control group
   and the uplift model's training data.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta
from typing import Any, Callable, Sequence
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from towerline.config import ProfileConfig, TowerlineConfig
from towerline.errors import ConfigError, DataValidationError
from towerline.features.contracts import Dataset
from towerline.marketing.assignment import assignment_unit
from towerline.marketing.campaign_config import CampaignConfig, OfferConfig, QuietHoursConfig
from towerline.marketing.outbox import Outbox, as_messages, empty_messages
from towerline.features.vocab import N_RESERVED
from towerline.marketing.audience import find_audience, user_vectors
from towerline.features.readers import load_dataset
from towerline.features.user_features import build_profiles
from towerline.training.bundle import load_bundle
from towerline.marketing.profiles import load_profiles
from towerline.marketing.scores import SCORE_COLUMNS, add_campaign_scores
from towerline.marketing.uplift import learn_uplift_scores

log = logging.getLogger(__name__)

Recommend = Callable[[Sequence[str], int], list[list[str]]]  # (user ids, k) -> item ids per user, best first
DAY_S = 86_400
PURCHASE, VIEW, SIGNUP = "purchase", "view", "signup"

# statuses of a planned row, in the order the stages apply them
SEND = "send"
HOLDOUT = "holdout"
STATUSES = ("no_consent", "segment", "no_channel_consent", "holdout", "already_sent", "capped", "no_content", SEND)


# ----------------------------------------------------------------------------------------------
# time


def parse_time(value: str | int | float) -> int:
    """``--as-of``: epoch seconds or ISO-8601 (a time without zone is UTC) -> epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        ts = pd.Timestamp(text)
    except (ValueError, TypeError):
        raise ConfigError(f"--as-of {value!r}: neither epoch seconds nor ISO-8601 (e.g. 2025-06-30T09:00)") from None
    if ts is pd.NaT:
        raise ConfigError(f"--as-of {value!r}: not a time")
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts
    return int(ts.timestamp())


def local_days(ts: np.ndarray | pd.Series, tz: str) -> np.ndarray:
    """(N,) int64 calendar day numbers (days since 1970-01-01) of epoch seconds in zone ``tz``."""
    t = pd.to_datetime(np.asarray(ts, dtype=np.int64), unit="s", utc=True).tz_convert(tz).tz_localize(None)
    return np.asarray(t.values.astype("datetime64[D]").astype(np.int64))


def day_iso(day: int) -> str:
    return str(np.datetime64(int(day), "D"))


def quiet_until(as_of: int, quiet: QuietHoursConfig, tz: str) -> int | None:
    """End of the quiet hours (epoch seconds) when ``as_of`` falls inside them, else None."""
    if quiet.start is None:
        return None
    zone = ZoneInfo(tz)
    now = datetime.fromtimestamp(as_of, zone)
    start, end = dtime.fromisoformat(quiet.start), dtime.fromisoformat(quiet.end)
    t = now.time()
    inside = (start <= t < end) if start <= end else (t >= start or t < end)
    if not inside:
        return None
    day = now.date() if t < end else now.date() + timedelta(days=1)
    return int(datetime.combine(day, end, zone).timestamp())


# ----------------------------------------------------------------------------------------------
# triggers

TRIGGER_COLUMNS = ["user_id", "trigger_moment", "anchor_item", "reason"]


def triggered(
    campaign: CampaignConfig,
    data: Dataset,
    as_of: int,
    scores: pd.DataFrame | None = None,
    audience: Callable[[str, int], list[str]] | None = None,
) -> pd.DataFrame:
    """Who the trigger fires for at ``as_of``: ``TRIGGER_COLUMNS``, one row per (user, moment).

    Only events at or before ``as_of`` count: a run for a past time sees the log as it was then.
    """
    t, tz = campaign.trigger, campaign.timezone
    today = int(local_days(np.array([as_of]), tz)[0])
    ev = data.events
    needs = {"purchase": PURCHASE, "view_without_purchase": VIEW}.get(t.kind)
    if needs and "event_type" in ev and not (ev["event_type"].astype(str) == needs).any():
        log.warning("campaign %s: the data set has no '%s' events, so its %s trigger never fires "
                    "(event types: %s)", campaign.name, needs, t.kind, ", ".join(map(str, pd.unique(ev["event_type"])[:8])))
    ev = ev.loc[ev["timestamp"].to_numpy(dtype=np.int64) <= as_of]
    if t.kind == "signup":
        out = _signups(data, ev, as_of)
        return _due(out, t.days, t.window_days, today, tz, lambda d: f"signed up on {d}")
    if t.kind == "purchase":
        p = ev.loc[ev["event_type"].astype(str) == PURCHASE] if "event_type" in ev else ev.iloc[:0]
        out = pd.DataFrame({"user_id": p["user_id"].astype(str).to_numpy(), "ts": p["timestamp"].to_numpy(np.int64),
                            "anchor_item": p["item_id"].astype(str).to_numpy()})
        return _due(out, t.days, t.window_days, today, tz, lambda d: f"purchase on {d} + {t.days} days")
    if t.kind == "view_without_purchase":
        out = _views_without_purchase(ev)
        return _due(out, t.days, t.window_days, today, tz, lambda d: f"viewed on {d}, not bought, + {t.days} days")
    if t.kind == "churn_risk":
        s = _score_column(scores, t.score_column, campaign, "trigger")
        hit = s.loc[s > t.threshold]
        return pd.DataFrame({
            "user_id": hit.index.astype(str), "trigger_moment": day_iso(today), "anchor_item": None,
            "reason": [f"{t.score_column} {v:.2f} > {t.threshold:g}" for v in hit.to_numpy()],
        }, columns=TRIGGER_COLUMNS)
    if t.kind == "item_launch":
        launch = parse_time(str(t.launch_at))
        launch_day = int(local_days(np.array([launch]), tz)[0])
        if not (launch_day <= today < launch_day + t.window_days):
            return pd.DataFrame(columns=TRIGGER_COLUMNS)
        if audience is None:
            raise ConfigError(f"campaign '{campaign.name}': an item_launch trigger needs a model for the audience; pass --model")
        users = audience(str(t.item_id), t.audience_size)
        return pd.DataFrame({"user_id": pd.Series(users, dtype=object).astype(str), "trigger_moment": str(t.launch_at),
                             "anchor_item": str(t.item_id), "reason": f"audience of new item {t.item_id}"},
                            columns=TRIGGER_COLUMNS)
    raise AssertionError(t.kind)  # the Literal is closed


def _signups(data: Dataset, ev: pd.DataFrame, as_of: int) -> pd.DataFrame:
    """Signup times: the users table's ``signup_ts`` and ``signup`` events, the earliest per user."""
    parts = []
    users = data.users
    if users is not None and "signup_ts" in users:
        ok = users["signup_ts"].notna()
        parts.append(pd.DataFrame({"user_id": users.loc[ok, "user_id"].astype(str).to_numpy(),
                                   "ts": users.loc[ok, "signup_ts"].to_numpy(np.int64)}))
    if "event_type" in ev:
        s = ev.loc[ev["event_type"].astype(str) == SIGNUP]
        parts.append(pd.DataFrame({"user_id": s["user_id"].astype(str).to_numpy(), "ts": s["timestamp"].to_numpy(np.int64)}))
    if not parts:
        return pd.DataFrame({"user_id": [], "ts": np.zeros(0, np.int64)})
    out = pd.concat(parts, ignore_index=True)
    out = out.loc[out["ts"] <= as_of]
    return out.groupby("user_id", as_index=False, sort=False)["ts"].min().assign(anchor_item=None)


def _views_without_purchase(ev: pd.DataFrame) -> pd.DataFrame:
    """Views of items the user has not bought since (up to the run time): ``user_id, ts, anchor_item``."""
    if "event_type" not in ev:
        return pd.DataFrame({"user_id": [], "ts": np.zeros(0, np.int64), "anchor_item": []})
    etype = ev["event_type"].astype(str)
    frame = pd.DataFrame({"user_id": ev["user_id"].astype(str).to_numpy(), "item": ev["item_id"].astype(str).to_numpy(),
                          "ts": ev["timestamp"].to_numpy(np.int64)})
    views = frame.loc[(etype == VIEW).to_numpy()]
    last_buy = frame.loc[(etype == PURCHASE).to_numpy()].groupby(["user_id", "item"])["ts"].max().rename("bought_ts")
    views = views.join(last_buy, on=["user_id", "item"])
    open_views = views.loc[~(views["bought_ts"] >= views["ts"])]  # NaN (never bought) stays
    return pd.DataFrame({"user_id": open_views["user_id"].to_numpy(), "ts": open_views["ts"].to_numpy(np.int64),
                         "anchor_item": open_views["item"].to_numpy()})


def _due(events: pd.DataFrame, days: int, window_days: int, today: int, tz: str,
         reason: Callable[[str], str]) -> pd.DataFrame:
    """Events (``user_id, ts, anchor_item``) whose day + ``days`` is today or up to ``window_days - 1``
    days before: one row per (user, event day), its anchor the day's latest event."""
    if not len(events):
        return pd.DataFrame(columns=TRIGGER_COLUMNS)
    day = local_days(events["ts"].to_numpy(np.int64), tz)
    lag = today - (day + days)
    hit = events.assign(day=day).loc[(lag >= 0) & (lag < window_days)]
    hit = hit.sort_values(["user_id", "day", "ts"], kind="stable").drop_duplicates(["user_id", "day"], keep="last")
    moments = [day_iso(d) for d in hit["day"]]
    return pd.DataFrame({"user_id": hit["user_id"].to_numpy(), "trigger_moment": moments,
                         "anchor_item": hit["anchor_item"].to_numpy(), "reason": [reason(m) for m in moments]},
                        columns=TRIGGER_COLUMNS)


def _score_column(scores: pd.DataFrame | None, column: str, campaign: CampaignConfig, what: str) -> pd.Series:
    """Per-user ``column`` from the score table, indexed by user id (users without a score left out)."""
    if scores is None or column not in scores:
        have = ", ".join(c for c in (scores.columns if scores is not None else []) if c != "user_id") or "none"
        raise DataValidationError(
            f"campaign '{campaign.name}': the {what} reads the score column '{column}', which neither the profiles "
            f"nor --scores has (score columns: {have}); pass --scores PATH with user_id and {column}"
        )
    s = pd.to_numeric(scores[column], errors="coerce")
    s.index = scores["user_id"].astype(str).to_numpy()
    return s.dropna()


def score_table(profiles: pd.DataFrame | None, scores: pd.DataFrame | None) -> pd.DataFrame | None:
    """Numeric per-user columns of the profiles with a ``--scores`` table over them (a user's score
    from ``--scores`` wins over the profile's; a user it lacks keeps the profile's)."""
    frames = [f for f in (profiles, scores) if f is not None]
    if not frames:
        return None
    for f in frames:
        if "user_id" not in f:
            raise DataValidationError("scores: a score table needs a user_id column")
    numeric = [f[["user_id"] + [c for c in f.columns if c != "user_id" and pd.api.types.is_numeric_dtype(f[c])
                                and not pd.api.types.is_bool_dtype(f[c])]] for f in frames]
    keyed = [f.assign(user_id=f["user_id"].astype(str)).drop_duplicates("user_id", keep="last").set_index("user_id")
             for f in numeric]
    out = keyed[-1] if len(keyed) == 1 else keyed[1].combine_first(keyed[0])  # a score where given, else the profile's
    return out.rename_axis("user_id").reset_index()


# ----------------------------------------------------------------------------------------------
# eligibility


def in_holdout(campaign_name: str, user_ids: Sequence[str], share: float) -> np.ndarray:
    """(U,) bool: the users a campaign never messages. The A/B hash of ("campaign/<name>", user), so
    membership never changes between runs and does not correlate with any experiment's arms."""
    units = np.fromiter((assignment_unit(f"campaign/{campaign_name}", str(u)) for u in user_ids), np.float64, len(user_ids))
    return units < share


def channel_consent(users: pd.DataFrame, user_ids: Sequence[str], channel: str | None = None) -> np.ndarray:
    """(U,) bool: may ``channel`` reach each user (``None``: may anything)? ``consent`` must be true
    (users absent from the table: no, marketing is opt-in), and where the table has
    ``consent_<channel>`` (``consent_email``, ``consent_push``, ``consent_sms``) that must be true too."""
    ids = pd.Index(np.asarray(user_ids, dtype=object).astype(str))
    if users is None or not len(users):
        return np.zeros(len(ids), dtype=bool)
    u = users.drop_duplicates("user_id").set_index(users["user_id"].drop_duplicates().astype(str))
    ok = pd.Series(True, index=u.index)
    if "consent" in u:
        ok &= u["consent"].fillna(False).astype(bool)
    col = f"consent_{channel.replace('-', '_')}" if channel else None
    if col and col in u:
        ok &= u[col].fillna(False).astype(bool)
    return ok.reindex(ids).fillna(False).to_numpy(dtype=bool)


def eligible(
    campaign: CampaignConfig,
    rows: pd.DataFrame,
    users: pd.DataFrame,
    as_of: int,
    history: pd.DataFrame,
    segments: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``rows`` (triggered) -> one row per (user, moment, channel) with ``status``, ``channel``,
    ``message_id``, ``segment`` and ``send_at``; only ``status == "send"`` rows become messages."""
    rows = rows.reset_index(drop=True).copy()
    ids = rows["user_id"].astype(str).to_numpy(dtype=object)
    seg = segments.reindex(ids) if segments is not None else pd.DataFrame(index=ids)
    rows["segment"] = seg["segment"].fillna("unknown").astype(str).to_numpy() if "segment" in seg else "unknown"
    status = np.full(len(rows), SEND, dtype=object)

    def mark(mask: np.ndarray, why: str) -> None:
        status[(status == SEND) & mask] = why

    mark(~channel_consent(users, ids), "no_consent")
    allowed = {s.lower() for s in campaign.eligibility.segments}
    if allowed:  # a lifecycle segment or an RFM group; users without a profile match neither
        ok = np.zeros(len(rows), bool)
        for col in ("segment", "rfm_group"):
            if col in seg:
                ok |= seg[col].astype(str).str.lower().isin(allowed).to_numpy()
        mark(~ok, "segment")
    by_channel = {ch: channel_consent(users, ids, ch) for ch in campaign.channels}
    any_channel = np.logical_or.reduce(list(by_channel.values()))
    mark(~any_channel, "no_channel_consent")
    mark(in_holdout(campaign.name, ids, campaign.holdout), "holdout")
    rows["status"] = status

    # one row per channel the message goes out on
    picked = []
    for i, ch in enumerate(campaign.channels):
        take = by_channel[ch].copy()
        if campaign.channel_policy == "first":
            earlier = np.zeros(len(rows), bool)
            for prev in campaign.channels[:i]:
                earlier |= by_channel[prev]
            take &= ~earlier
        picked.append(rows.loc[take].assign(channel=ch))
    unreachable = rows.loc[~any_channel].assign(channel=None)
    out = pd.concat(picked + [unreachable], ignore_index=True)
    out["message_id"] = [
        message_id(campaign.name, u, m, ch if campaign.channel_policy == "all" else None)
        for u, m, ch in zip(out["user_id"], out["trigger_moment"], out["channel"])
    ]
    out = _drop_sent_and_capped(campaign, out, as_of, history)
    quiet_end = quiet_until(as_of, campaign.eligibility.quiet_hours, campaign.timezone)
    quiet_ch = set(campaign.eligibility.quiet_hours.channels)
    deferred = out["channel"].isin(quiet_ch).to_numpy() & (quiet_end is not None)
    out["send_at"] = np.where(deferred, quiet_end or as_of, as_of).astype(np.int64)
    out["created_at"] = np.int64(as_of)
    return out


def message_id(campaign: str, user_id: str, moment: str, channel: str | None = None) -> str:
    """sha256 of (campaign, user, trigger moment[, channel]), 32 hex digits: the same run makes the same ids."""
    key = "\x1f".join([campaign, str(user_id), str(moment)] + ([channel] if channel else []))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _drop_sent_and_capped(campaign: CampaignConfig, out: pd.DataFrame, as_of: int, history: pd.DataFrame) -> pd.DataFrame:
    """Mark ids already in the outbox ``already_sent``, then apply the frequency caps.

    Caps count *contacts* (distinct (campaign, user, trigger moment)), so one trigger sent on two
    channels (``channel_policy: all``) counts once; within a run the oldest trigger moments are
    admitted first. History newer than ``as_of`` is ignored: a run for a past time sees the outbox
    as it was then.
    """
    status = out["status"].to_numpy(dtype=object).copy()
    sent_ids = set(history["message_id"].astype(str)) if len(history) else set()
    status[(status == SEND) & out["message_id"].isin(sent_ids).to_numpy()] = "already_sent"

    cap = campaign.eligibility.frequency_cap
    h = history.loc[history["created_at"].to_numpy(np.int64) <= as_of] if len(history) else history
    h = h.drop_duplicates(["campaign", "user_id", "trigger_moment"]) if len(h) else h
    created = h["created_at"].to_numpy(np.int64) if len(h) else np.zeros(0, np.int64)
    past_user = _counts(h.loc[created > as_of - cap.per_user_days * DAY_S]) if len(h) else {}
    past_campaign = _counts(h.loc[(created > as_of - cap.per_campaign_days * DAY_S)
                                  & (h["campaign"] == campaign.name).to_numpy()]) if len(h) else {}

    users = out["user_id"].astype(str).to_numpy(dtype=object)
    moments = out["trigger_moment"].astype(str).to_numpy(dtype=object)
    live = status == SEND
    contacts = sorted({(m, u) for u, m in zip(users[live], moments[live])})  # oldest moment first
    admitted: set[tuple[str, str]] = set()
    new_user: dict[str, int] = {}
    for m, u in contacts:
        n = new_user.get(u, 0)
        if cap.per_user and past_user.get(u, 0) + n >= cap.per_user:
            continue
        if cap.per_campaign and past_campaign.get(u, 0) + n >= cap.per_campaign:
            continue
        admitted.add((u, m))
        new_user[u] = n + 1
    ok = np.fromiter(((u, m) in admitted for u, m in zip(users, moments)), bool, len(out))
    status[live & ~ok] = "capped"
    return out.assign(status=status)


def _counts(history: pd.DataFrame) -> dict[str, int]:
    return history["user_id"].astype(str).value_counts().to_dict() if len(history) else {}


# ----------------------------------------------------------------------------------------------
# content


def similar_items(bundle: Any, item_ids: Sequence[str], k: int) -> list[list[str]]:
    """The ``k`` nearest catalogue items to each of ``item_ids`` by item-tower inner product (as the
    service's ``/items/{id}/similar``), without the item itself and out-of-stock items; an item the
    model does not know gets ``[]``. Exact search (``IndexFlatIP``) over the catalogue: campaigns ask
    for a few thousand anchors per run, which exact search answers in milliseconds."""
    import faiss


    vocab = bundle.vocabs.items
    emb = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)  # (V, D)
    catalogue = np.arange(N_RESERVED, len(emb))
    items = bundle.items
    if items is not None and "in_stock" in items and len(items):
        out_of_stock = set(items.loc[~items["in_stock"].fillna(True).astype(bool), "item_id"].astype(str))
        if out_of_stock:
            catalogue = catalogue[~np.isin(vocab.decode(catalogue).astype(str), list(out_of_stock))]
    anchors = vocab.encode(np.asarray(item_ids, dtype=object).astype(str))  # (A,)
    known = anchors >= N_RESERVED
    result: list[list[str]] = [[] for _ in item_ids]
    if not known.any() or not len(catalogue):
        return result
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb[catalogue])
    _, rows = index.search(emb[anchors[known]], min(k + 1, len(catalogue)))  # (A', k+1): one spare for itself
    names = vocab.decode(catalogue).astype(str)
    for slot, anchor, found in zip(np.flatnonzero(known), anchors[known], rows):
        result[slot] = [names[r] for r in found if r >= 0 and catalogue[r] != anchor][:k]
    return result


def attach_content(
    campaign: CampaignConfig,
    plan: pd.DataFrame,
    recommend: Recommend | None = None,
    bundle: Any = None,
) -> pd.DataFrame:
    """Fill ``items`` for the rows to send; a row left without items becomes ``no_content``."""
    plan = plan.copy()
    plan["items"] = pd.Series([[] for _ in range(len(plan))], index=plan.index, dtype=object)
    send = plan.index[plan["status"] == SEND]
    if not len(send):
        return plan
    c = campaign.content
    anchors = plan.loc[send, "anchor_item"].astype(str).tolist()
    if c.kind == "recommendations":
        if recommend is None:
            raise ConfigError(f"campaign '{campaign.name}': content 'recommendations' needs the model; pass --model")
        users = plan.loc[send, "user_id"].astype(str)
        unique = list(dict.fromkeys(users))
        lists = dict(zip(unique, recommend(unique, c.k)))
        found = [list(lists.get(u, []))[: c.k] for u in users]
    elif c.kind == "similar_to_purchased":
        if bundle is None:
            raise ConfigError(f"campaign '{campaign.name}': content 'similar_to_purchased' needs the model's item vectors; pass --model")
        found = similar_items(bundle, anchors, c.k)
    else:  # viewed_item, item_audience: the trigger's item itself
        found = [[a] for a in anchors]
    plan.loc[send, "items"] = pd.Series(found, index=send, dtype=object)
    empty = plan.index.isin(send) & (plan["items"].map(len) == 0).to_numpy()
    plan.loc[empty, "status"] = "no_content"
    return plan


# ----------------------------------------------------------------------------------------------
# offers


def attach_offers(campaign: CampaignConfig, plan: pd.DataFrame, scores: pd.DataFrame | None) -> pd.DataFrame:
    """``offer`` (label) and ``offer_value`` per row to send, by the campaign's offer rule."""
    o = campaign.offer
    plan = plan.copy()
    value = np.full(len(plan), np.nan)
    send = (plan["status"] == SEND).to_numpy()
    if o.kind == "fixed":
        value[send] = o.value
    elif o.kind in ("ltv_tiers", "uplift_budget"):
        s = _score_column(scores, str(o.column), campaign, "offer")
        score = s[~s.index.duplicated()].reindex(plan["user_id"].astype(str)).to_numpy(dtype=np.float64)
        value = _tiered(o, score) if o.kind == "ltv_tiers" else _within_budget(o, score, send, plan["user_id"].astype(str).to_numpy())
        value[~send] = np.nan
    plan["offer_value"] = value
    plan["offer"] = [offer_label(o, v) for v in value]
    return plan


def offer_label(offer: OfferConfig, value: float) -> str | None:
    if value is None or np.isnan(value):
        return None
    return f"{value:g}%" if offer.unit == "percent" else f"{value:.2f}"


def _tiered(o: OfferConfig, score: np.ndarray) -> np.ndarray:
    """The highest tier whose ``min_score`` the user's score reaches; no score or below all: none."""
    tiers = sorted(o.tiers, key=lambda t: t.min_score)
    out = np.full(len(score), np.nan)
    for t in tiers:
        out[score >= t.min_score] = t.value
    return out


def _within_budget(o: OfferConfig, score: np.ndarray, send: np.ndarray, users: np.ndarray) -> np.ndarray:
    """``value`` to the users with the highest positive predicted uplift until ``budget`` is spent.

    Ranked by uplift (the expected extra conversions, or revenue, an offer buys), not by propensity:
    a user who buys anyway costs the offer and gains nothing. One offer per user per run, whatever its channels.
    """
    cost = o.cost_per_offer if o.cost_per_offer is not None else o.value
    n_affordable = int(o.budget // cost)
    out = np.full(len(score), np.nan)
    floor = cost if o.uplift_outcome == "revenue" else 0.0  # extra revenue must pay for the offer
    cand = np.flatnonzero(send & (score > floor))
    order = cand[np.argsort(-score[cand], kind="stable")]
    chosen: set[str] = set()
    for i in order:
        u = str(users[i])
        if u not in chosen and len(chosen) >= n_affordable:
            continue
        chosen.add(u)
        out[i] = o.value
    return out


# ----------------------------------------------------------------------------------------------
# the whole sequence


@dataclass
class CampaignRun:
    """What one run did: ``plan`` holds every triggered row with its status, ``messages`` the new
    messages published, ``counts`` rows per status."""

    campaign: str
    as_of: int
    plan: pd.DataFrame
    messages: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def segment_lookup(profiles: pd.DataFrame | None) -> pd.DataFrame | None:
    """Profiles' ``segment`` and ``rfm_group`` indexed by user id (what eligibility filters on)."""
    if profiles is None:
        return None
    cols = [c for c in ("segment", "rfm_group") if c in profiles]
    if not cols:
        return None
    p = profiles.drop_duplicates("user_id")
    return pd.DataFrame(p[cols].to_numpy(), index=p["user_id"].astype(str).to_numpy(), columns=cols)


def plan_campaign(
    campaign: CampaignConfig,
    data: Dataset,
    as_of: int,
    history: pd.DataFrame,
    *,
    profiles: pd.DataFrame | None = None,
    scores: pd.DataFrame | None = None,
    recommend: Recommend | None = None,
    bundle: Any = None,
    with_content: bool = True,
) -> pd.DataFrame:
    """Every row the campaign's trigger fires at ``as_of``, with status, channel, content and offer.

    ``with_content=False`` (the preview) skips the content step, which is the one that needs the
    model; an item-launch trigger still needs ``bundle`` for its audience.
    """
    check_model_inputs(campaign, recommend, bundle, with_content)
    table = score_table(profiles, scores)
    audience = (lambda item, size: launch_audience(bundle, data.users, item, size)) if bundle is not None else None
    rows = triggered(campaign, data, as_of, table, audience)
    plan = eligible(campaign, rows, data.users, as_of, history, segment_lookup(profiles))
    if with_content:
        plan = attach_content(campaign, plan, recommend, bundle)
    else:
        plan["items"] = pd.Series([[] for _ in range(len(plan))], index=plan.index, dtype=object)
    plan = attach_offers(campaign, plan, table)
    plan["campaign"] = campaign.name
    plan["trigger"] = campaign.trigger.kind
    log.info("campaign %s at %s: %d triggered, %s", campaign.name, pd.Timestamp(as_of, unit="s", tz="UTC").isoformat(),
             len(rows), {str(k): int(v) for k, v in plan["status"].value_counts().items()})
    return plan


def check_model_inputs(campaign: CampaignConfig, recommend: Recommend | None, bundle: Any, with_content: bool = True) -> None:
    """Fail before any work when the campaign needs the model and none was given (not only on the
    day its trigger first fires)."""
    where = f"campaign '{campaign.name}'"
    if campaign.trigger.kind == "item_launch" and bundle is None:
        raise ConfigError(f"{where}: an item_launch trigger needs the model for its audience; pass --model")
    if not with_content:
        return
    if campaign.content.kind == "recommendations" and recommend is None:
        raise ConfigError(f"{where}: content 'recommendations' needs the model; pass --model")
    if campaign.content.kind == "similar_to_purchased" and bundle is None:
        raise ConfigError(f"{where}: content 'similar_to_purchased' needs the model's item vectors; pass --model")


def events_after_training(bundle: Any, data: Dataset, as_of: int) -> pd.DataFrame:
    """The log's events newer than the model's training data and not after ``as_of``: what the
    serving path must see as recent history for its recommendations to reflect the run's time."""
    ev = data.events
    ts = ev["timestamp"].to_numpy(np.int64)
    hist = getattr(bundle, "histories", None)
    cutoff = int(hist.timestamp.max()) if hist is not None and len(hist.timestamp) else None
    keep = ts <= as_of if cutoff is None else (ts > cutoff) & (ts <= as_of)
    if cutoff is None:
        log.info("the model carries no training histories; all %d events up to the run time count as recent", int(keep.sum()))
    cols = [c for c in ("user_id", "item_id", "event_type", "timestamp") if c in ev]
    return ev.loc[keep, cols].reset_index(drop=True)


def launch_audience(bundle: Any, users: pd.DataFrame, item_id: str, size: int) -> list[str]:
    """The ``size`` users most likely to buy ``item_id`` (``find_audience``), consenting users only."""
    ids, vectors = user_vectors(bundle)
    consent = pd.DataFrame({"user_id": users["user_id"].astype(str),
                            "consent": users["consent"].fillna(False).astype(bool) if "consent" in users else True})
    frame = find_audience(bundle, vectors, ids, item_id=item_id, size=size, profiles=consent)
    return frame["user_id"].astype(str).tolist()


def run_campaign(
    campaign: CampaignConfig,
    data: Dataset,
    as_of: int,
    outbox: Outbox,
    *,
    recommend: Recommend | None = None,
    bundle: Any = None,
    profiles: pd.DataFrame | None = None,
    scores: pd.DataFrame | None = None,
) -> CampaignRun:
    """Evaluate the campaign at ``as_of`` and publish its new messages to ``outbox`` (once each).

    Args:
        campaign: the definition (``load_campaign``).
        data: the event log and users table (consent, ``consent_<channel>``, ``signup_ts``).
        as_of: the run's time, epoch seconds; events after it are not seen.
        outbox: where messages go (``open_outbox``); its history gives de-duplication and caps.
        recommend: ``(user_ids, k) -> item lists`` for content ``recommendations``: the serving
            path, injected by the caller because marketing may not import serving.
        bundle: the model bundle (item vectors for ``similar_to_purchased``, user vectors for an
            ``item_launch`` audience).
        profiles: profiles table (``segment``, ``rfm_group`` and any score columns).
        scores: per-user scores (``user_id`` + columns such as ``churn_probability``,
            ``predicted_ltv``, ``predicted_uplift``); they override same-named profile columns.
    """
    plan = plan_campaign(campaign, data, as_of, outbox.history(), profiles=profiles, scores=scores,
                         recommend=recommend, bundle=bundle)
    to_send = as_messages(plan.loc[plan["status"] == SEND])
    published = outbox.publish(to_send)
    outbox.record_holdout(as_messages(plan.loc[plan["status"] == HOLDOUT]))  # the report's comparison group
    counts = {s: int(n) for s, n in plan["status"].value_counts().items()}
    return CampaignRun(campaign.name, as_of, plan, published, counts)


def messages_for_events(
    campaigns: Sequence[CampaignConfig],
    events: pd.DataFrame | Sequence[Any],
    users: pd.DataFrame,
    history: pd.DataFrame,
    *,
    now: int | None = None,
    recommend: Recommend | None = None,
    profiles: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Messages that events just posted should fire now: today's ``signup`` campaigns (``days: 0``).

    The service's ``POST /events`` calls this with the accepted events, the consent rows of their
    users and the outbox's history, then publishes the result (``outbox.publish``); the message
    ids are the batch run's, so a nightly run later the same day sends none of them again.

    Args:
        campaigns: the loaded campaigns; only ``signup`` triggers with ``days == 0`` fire here.
        events: a DataFrame (``user_id``, ``item_id``, ``timestamp``, ``event_type``) or
            ``features.contracts.Event`` objects; only ``event_type == "signup"`` rows count.
        users: ``user_id``, ``consent`` and optional ``consent_<channel>`` of those users.
        history: ``outbox.history()`` (de-duplication and frequency caps).
        now: the time of the decision (default: the newest event's time).
        recommend: as for ``run_campaign``.
    """
    plan = plan_for_events(campaigns, events, users, history, now=now, recommend=recommend, profiles=profiles)
    return as_messages(plan.loc[plan["status"] == SEND]) if len(plan) else empty_messages()


def plan_for_events(
    campaigns: Sequence[CampaignConfig],
    events: pd.DataFrame | Sequence[Any],
    users: pd.DataFrame,
    history: pd.DataFrame,
    *,
    now: int | None = None,
    recommend: Recommend | None = None,
    profiles: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``messages_for_events``'s plan, every row with its ``status`` (``plan_campaign``'s columns,
    empty when nothing fires): the service publishes the ``send`` rows and records the ``holdout``
    ones, as a batch run does."""
    frame = events if isinstance(events, pd.DataFrame) else pd.DataFrame(
        [{"user_id": e.user_id, "item_id": e.item_id, "timestamp": e.timestamp, "event_type": e.event_type} for e in events]
    )
    if not len(frame):
        return pd.DataFrame()
    frame = frame.loc[frame["event_type"].astype(str) == SIGNUP]
    if not len(frame):
        return pd.DataFrame()
    clock = int(time.time()) if now is None else int(now)
    ts = pd.to_numeric(frame["timestamp"], errors="coerce").fillna(clock)  # no timestamp: the server's clock, as /events
    frame = frame.assign(timestamp=ts.astype(np.int64))
    at = int(frame["timestamp"].max()) if now is None else int(now)
    data = Dataset(name="events", events=frame, items=pd.DataFrame({"item_id": []}),
                   users=users.drop(columns=["signup_ts"], errors="ignore"))
    plans = [plan_campaign(c, data, at, history, profiles=profiles, recommend=recommend)
             for c in campaigns if c.trigger.kind == SIGNUP and c.trigger.days == 0]
    plans = [p for p in plans if len(p)]
    return pd.concat(plans, ignore_index=True) if plans else pd.DataFrame()


def preview_counts(plan: pd.DataFrame) -> dict[str, dict[str, int]]:
    """What ``towerline campaign preview`` prints: rows per status, and messages to send per trigger
    moment, channel, segment and offer."""
    send = plan.loc[plan["status"] == SEND] if len(plan) else plan

    def count(frame: pd.DataFrame, col: str) -> dict[str, int]:
        if not len(frame):
            return {}
        return {str(k): int(v) for k, v in frame[col].fillna("none").astype(str).value_counts().sort_index().items()}

    return {
        "status": {s: int((plan["status"] == s).sum()) for s in STATUSES if len(plan) and (plan["status"] == s).any()},
        "trigger": count(send, "trigger_moment"),
        "channel": count(send, "channel"),
        "segment": count(send, "segment"),
        "offer": count(send.assign(offer=send["offer"].fillna("none")) if len(send) else send, "offer"),
    }


def default_profile_config(model_config: TowerlineConfig | None) -> ProfileConfig:
    """The thresholds the model was trained with (its typed config), else the defaults."""
    return model_config.profile if model_config is not None else ProfileConfig()


# ----------------------------------------------------------------------------------------------
# inputs of a run, from files


@dataclass
class CampaignInputs:
    data: Dataset
    bundle: Any = None
    profiles: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None


def load_inputs(
    data: str,
    as_of: int,
    *,
    format: str | None = None,
    model: str | None = None,
    profiles_path: str | None = None,
    scores_path: str | None = None,
    score_columns: Sequence[str] = (),
) -> CampaignInputs:
    """Read what a run needs: the data set, the bundle (``model``), profiles and scores.

    Profiles come from ``profiles_path`` (a ``towerline profile`` export) or are built from the
    events up to ``as_of`` with the model's thresholds, so segments are those of the run's time.
    Built profiles also get the ``score_columns`` (``campaign_score_columns``) that the churn and
    LTV models give (``scores.add_campaign_scores``, trained on the log up to ``as_of``) unless
    ``scores_path`` has them.
    """
    dataset = load_dataset(data, format)[0]
    bundle = None
    if model:
        bundle = load_bundle(model)
    if profiles_path:
        profiles = load_profiles(profiles_path)
    else:
        past = dataset.events.loc[dataset.events["timestamp"].to_numpy(np.int64) <= as_of]
        profiles = None
        if len(past):
            seen = Dataset(dataset.name, past, dataset.items, dataset.users)
            profile_cfg = default_profile_config(bundle.config if bundle else None)
            profiles = build_profiles(seen, profile_cfg, reference_time=as_of)
    scores = None
    if scores_path:
        try:
            scores = pd.read_parquet(scores_path)
        except (OSError, ValueError) as e:
            raise DataValidationError(f"--scores {scores_path}: not a readable Parquet file ({e})") from None
        if "user_id" not in scores:
            raise DataValidationError(f"--scores {scores_path}: needs a user_id column (has {', '.join(scores.columns)})")
    missing = [c for c in score_columns if c in SCORE_COLUMNS and (scores is None or c not in scores)]
    if profiles is not None and not profiles_path and missing:
        profiles = add_campaign_scores(profiles, dataset, profile_cfg, columns=missing)
    return CampaignInputs(dataset, bundle, profiles, scores)


def with_uplift_scores(
    campaign: CampaignConfig, inputs: CampaignInputs, as_of: int, outbox: Outbox | None
) -> pd.DataFrame | None:
    """``inputs.scores`` plus the uplift column an ``uplift_budget`` offer reads, learnt from the
    outbox (``uplift.learn_uplift_scores``) when neither ``--scores`` nor the profiles carry it.

    The training rows are the messages and holdout rows of ``offer.uplift_from`` (default: this
    campaign) whose outcome windows ended by ``as_of``: a campaign with a holdout is its own
    randomised experiment, and each run prices the next one's offers.
    """
    o = campaign.offer
    table = score_table(inputs.profiles, inputs.scores)
    if o.kind != "uplift_budget" or (table is not None and o.column in table):
        return inputs.scores
    source = o.uplift_from or campaign.name
    where = f"campaign '{campaign.name}': the uplift_budget offer reads '{o.column}', which neither --scores nor the profiles have"
    if outbox is None:
        raise DataValidationError(f"{where}; pass --scores, or an --outbox holding the messages and holdout of '{source}'")
    sent, held = outbox.history(), outbox.holdout_history()
    sent, held = sent.loc[sent["campaign"] == source], held.loc[held["campaign"] == source]
    try:
        learnt = learn_uplift_scores(inputs.data, sent, held, as_of, window_days=o.uplift_window_days,
                                     outcome=o.uplift_outcome, column=str(o.column))
    except DataValidationError as e:
        raise DataValidationError(f"{where}, and the outbox cannot teach it: {e}; run '{source}' with a holdout "
                                  f"first (or pass --scores)") from None
    if inputs.scores is None:
        return learnt
    return inputs.scores.assign(user_id=inputs.scores["user_id"].astype(str)).merge(learnt, on="user_id", how="outer")


def campaign_score_columns(campaign: CampaignConfig) -> list[str]:
    """The per-user score columns the campaign's trigger and offer read."""
    t = campaign.trigger
    cols = [t.score_column] if t.kind == "churn_risk" else []
    return cols + ([campaign.offer.column] if campaign.offer.column else [])
