"""What a campaign brought in: sends, opens, clicks, conversions and revenue per channel, the increment
over the holdout, ROI and LTV/CAC, and four attribution models side by side.

Inputs (the contract):

* **outbox**: the Parquet folder ``towerline campaign run`` writes (``part-*`` messages, sent at
  their ``send_at``, and ``_holdout-*`` rows of the users each run held out), or any Parquet folder
  or file with one row per message:
  ``message_id, campaign, user_id, channel, items, offer, reason, sent_at, holdout``. A row with
  ``holdout = true`` records a user the campaign chose but deliberately did *not* message (the
  control group); its ``sent_at`` is when the message would have gone out, its ``channel`` the
  channel it would have used. ``sent_at`` is epoch seconds or a timestamp.
* **events**: the ordinary event log (``features.contracts``). Engagement with a message is an event
  with ``event_type`` ``open`` or ``click`` (``item_id`` may be any placeholder). It is linked to its
  message by an extra ``message_id`` column when the log has one; otherwise to the user's latest
  message on the event's ``channel`` sent at or before the event and at most ``window_days``
  earlier. Conversions are ``purchase`` events, revenue their ``value``.

Measures, per campaign:

* **conversion** of a user = any purchase within ``window_days`` after their (first) message of the
  campaign, for recipients and holdout users alike, so the two groups are measured the same way;
* **incremental conversions** = (conversion rate of recipients - of holdout) x recipients, 95% CI
  from Newcombe's hybrid score interval of the difference (``statistics.proportion_difference_interval``);
  **incremental revenue** the same with revenue per user and Welch's interval;
* **cost** = messages x cost per message of the channel (``costs``) + offer cost (an offer written
  ``"10%"``, ``"10% off"`` or ``"pct:10"`` costs that share of the revenue of recipients who converted);
* **ROI** = (incremental revenue - cost) / cost, with the interval carried over from incremental
  revenue (cost is known); **CAC** = cost / incremental conversions; **LTV** = revenue per converting
  recipient in the window (a lower bound of their lifetime value: only the window is observed);
* **attribution** of recipients' conversions over their touch paths (every send, open and click is
  a touch on its channel): last touch, linear, position-based and Markov removal effect
  (``towerline.marketing.attribution``). Attribution shares out *observed* conversions; only the
  holdout comparison says how many the campaign *caused*.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from towerline.errors import DataValidationError
from towerline.marketing import report_html as H
from towerline.marketing.outbox import ParquetOutbox
from towerline.marketing.attribution import MODEL_LABELS, MODELS, attribute, build_paths
from towerline.marketing.statistics import mean_difference_interval, proportion_difference_interval, wilson_interval
from towerline.features.readers import read_table
from towerline.features.validate import validate_events

log = logging.getLogger(__name__)

OUTBOX_COLUMNS: tuple[str, ...] = ("message_id", "campaign", "user_id", "channel", "items", "offer", "reason",
                                   "sent_at", "holdout")
# Cost of sending one message, by channel, in the report's currency: typical list prices of
# e-mail/push/SMS providers; pass your own with ``costs`` (``--cost CHANNEL=AMOUNT``).
DEFAULT_COST_PER_MESSAGE: dict[str, float] = {"email": 0.002, "push": 0.0005, "sms": 0.05, "web": 0.0, "app": 0.0005}
DAY = 86_400


@dataclasses.dataclass(frozen=True)
class CampaignReportSettings:
    window_days: float = 7.0  # a purchase this many days after the message counts as its conversion
    currency: str = "EUR"  # ISO 4217 code the event values are in
    costs: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_COST_PER_MESSAGE))


# inputs


def read_outbox(path: str | Path) -> pd.DataFrame:
    """The outbox Parquet folder or file -> messages with ``sent_at`` as int epoch seconds."""
    p = Path(path)
    if not p.exists():
        raise DataValidationError(f"{p}: outbox not found; write one with `towerline campaign run`")
    try:
        frame = pq.read_table(p).to_pandas()
    except Exception as e:  # pyarrow raises several types for unreadable folders
        raise DataValidationError(f"{p}: cannot be read as a Parquet outbox ({e})") from None
    if "sent_at" not in frame and "send_at" in frame and p.is_dir():
        frame = _run_outbox(p)
    missing = [c for c in ("message_id", "campaign", "user_id", "channel", "sent_at", "holdout") if c not in frame]
    if missing:
        raise DataValidationError(f"{p}: outbox lacks column(s) {missing}; expected {list(OUTBOX_COLUMNS)}")
    frame["sent_at"] = _epoch_seconds(frame["sent_at"], f"{p}: sent_at")
    for c in ("message_id", "campaign", "user_id", "channel"):
        frame[c] = frame[c].astype(str)
    frame["holdout"] = frame["holdout"].fillna(False).astype(bool)
    if "offer" not in frame:
        frame["offer"] = None
    return frame


def _run_outbox(folder: Path) -> pd.DataFrame:
    """The folder ``towerline campaign run`` writes: its messages (``part-*``, sent at their
    ``send_at``) and the users its runs held out (``_holdout-*``), as the report's rows."""
    box = ParquetOutbox(folder)
    sent, held = box.history().assign(holdout=False), box.holdout_history().assign(holdout=True)
    if not len(held):
        log.warning("%s: no holdout rows (_holdout-*.parquet); incremental figures need a campaign with a holdout", folder)
    frame = pd.concat([f for f in (sent, held) if len(f)] or [sent], ignore_index=True)
    return frame.rename(columns={"send_at": "sent_at"})


def read_campaign_events(path: str | Path) -> pd.DataFrame:
    """Events (a data folder with ``events.*`` or one events file), validated, ``message_id`` kept if present."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("events.*"))
        if not found:
            raise DataValidationError(f"{p}: no events.csv or events.parquet in the folder")
        p = found[0]
    raw = read_table(p, "events")
    message_id = raw.pop("message_id") if "message_id" in raw else None  # not a contract column: set aside
    events, report = validate_events(raw, p.name)
    report.raise_if_invalid()
    if message_id is not None:  # the validated frame keeps the file's row numbers as its index
        events["message_id"] = message_id.astype("string").reindex(events.index).to_numpy()
    return events.reset_index(drop=True)


def _epoch_seconds(s: pd.Series, where: str) -> pd.Series:
    """Epoch seconds from ints, datetimes (naive = UTC) or ISO-8601 strings."""
    if pd.api.types.is_numeric_dtype(s):
        return s.astype(np.int64)
    try:
        ts = pd.to_datetime(s, utc=True)
    except (ValueError, TypeError):
        raise DataValidationError(f"{where}: neither epoch seconds nor ISO-8601") from None
    return ((ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype(np.int64)


# engagement


def link_engagement(outbox: pd.DataFrame, events: pd.DataFrame, window_s: float) -> pd.DataFrame:
    """Open and click events -> ``message_id, kind, timestamp`` rows (see the module docstring's contract)."""
    eng = events[events["event_type"].isin(["open", "click"])]
    sent = outbox[~outbox["holdout"]]
    out = []
    if "message_id" in eng:
        by_id = eng[eng["message_id"].notna()]
        by_id = by_id[by_id["message_id"].astype(str).isin(set(sent["message_id"]))]
        out.append(pd.DataFrame({"message_id": by_id["message_id"].astype(str).to_numpy(),
                                 "kind": by_id["event_type"].astype(str).to_numpy(),
                                 "timestamp": by_id["timestamp"].to_numpy(np.int64)}))
        eng = eng[eng["message_id"].isna()]
    eng = eng[eng["channel"].notna()]
    if len(eng):
        e = pd.DataFrame({"user_id": eng["user_id"].astype(str).to_numpy(), "channel": eng["channel"].astype(str).to_numpy(),
                          "kind": eng["event_type"].astype(str).to_numpy(), "timestamp": eng["timestamp"].to_numpy(np.int64)})
        m = sent[["message_id", "user_id", "channel", "sent_at"]].rename(columns={"sent_at": "timestamp_m"})
        e = e.sort_values("timestamp")
        m = m.sort_values("timestamp_m")
        joined = pd.merge_asof(e, m, left_on="timestamp", right_on="timestamp_m", by=["user_id", "channel"],
                               direction="backward", tolerance=int(window_s))
        joined = joined[joined["message_id"].notna()]
        out.append(joined[["message_id", "kind", "timestamp"]])
    if not out:
        return pd.DataFrame({"message_id": pd.Series(dtype=str), "kind": pd.Series(dtype=str),
                             "timestamp": pd.Series(dtype=np.int64)})
    return pd.concat(out, ignore_index=True)


# per-user outcomes


def user_outcomes(messages: pd.DataFrame, purchases: pd.DataFrame, window_s: float) -> pd.DataFrame:
    """One row per user of one campaign: ``user_id, holdout, first_at, converted, revenue``.

    A user's window starts at their first message (or would-be message, in the holdout).
    """
    first = messages.groupby("user_id").agg(first_at=("sent_at", "min"), holdout=("holdout", "first")).reset_index()
    p = purchases.merge(first[["user_id", "first_at"]], on="user_id")
    p = p[(p["timestamp"] >= p["first_at"]) & (p["timestamp"] <= p["first_at"] + window_s)]
    agg = p.groupby("user_id").agg(orders=("timestamp", "size"), revenue=("value", "sum"))
    first["converted"] = first["user_id"].map(agg["orders"]).fillna(0).to_numpy() > 0
    first["revenue"] = first["user_id"].map(agg["revenue"]).fillna(0.0).to_numpy(np.float64)
    return first


def offer_share(offer: Any) -> float:
    """``"10%"``, ``"10% off"``, ``"pct:10"`` -> 0.10; anything else (free shipping, none) -> 0."""
    if offer is None or (isinstance(offer, float) and np.isnan(offer)):
        return 0.0
    m = re.search(r"(?:pct:)?\s*(\d+(?:\.\d+)?)\s*%?", str(offer))
    if m and ("%" in str(offer) or str(offer).startswith("pct:")):
        return min(float(m.group(1)) / 100.0, 1.0)
    return 0.0


# the report


def campaign_report(
    outbox: pd.DataFrame,
    events: pd.DataFrame,
    campaign: str,
    settings: CampaignReportSettings = CampaignReportSettings(),
    *,
    simulated: bool = False,
) -> dict[str, Any]:
    """The campaign's figures as a JSON-ready dict (see the module docstring for every definition).

    Args:
        campaign: a campaign name of the outbox, or ``"all"`` for every campaign in it.
    Raises:
        DataValidationError: the campaign is not in the outbox.
    """
    names = sorted(outbox["campaign"].unique())
    chosen = names if campaign == "all" else [campaign]
    if campaign != "all" and campaign not in names:
        raise DataValidationError(f"campaign '{campaign}' is not in the outbox; campaigns there: {', '.join(names) or 'none'}")
    window_s = settings.window_days * DAY
    eng = link_engagement(outbox, events, window_s)
    purchases = events[events["event_type"] == "purchase"]
    purchases = pd.DataFrame({"user_id": purchases["user_id"].astype(str).to_numpy(),
                              "timestamp": purchases["timestamp"].to_numpy(np.int64),
                              "value": purchases["value"].fillna(0.0).to_numpy(np.float64)})
    campaigns = {name: _one_campaign(outbox[outbox["campaign"] == name], eng, purchases, settings)
                 for name in chosen}
    return {
        "campaign": campaign,
        "currency": settings.currency,
        "window_days": settings.window_days,
        "cost_per_message": settings.costs,
        "simulated": simulated,
        "campaigns": campaigns,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "methods": {
            "conversion": f"a purchase within {settings.window_days:g} days of the user's first message "
                          "(or would-be message in the holdout)",
            "incremental": "(recipients' rate - holdout's rate) x recipients; 95% CI by Newcombe's hybrid score "
                           "interval (conversions) and Welch's interval (revenue per user)",
            "roi": "(incremental revenue - cost) / cost",
            "ltv_cac": "LTV = revenue per converting recipient in the window; CAC = cost / incremental conversions",
            "attribution": "recipients' conversions over their touch paths (sends, opens, clicks); Markov removal "
                           "effect after Anderl et al. (2016)",
        },
    }


def _one_campaign(msgs: pd.DataFrame, eng: pd.DataFrame, purchases: pd.DataFrame,
                  settings: CampaignReportSettings) -> dict[str, Any]:
    window_s = settings.window_days * DAY
    sent = msgs[~msgs["holdout"]]
    e = eng[eng["message_id"].isin(set(sent["message_id"]))].merge(sent[["message_id", "user_id", "channel"]], on="message_id")
    outcomes = user_outcomes(msgs, purchases, window_s)
    treated, hold = outcomes[~outcomes["holdout"]], outcomes[outcomes["holdout"]]
    converted_users = set(treated.loc[treated["converted"], "user_id"])
    revenue_of = treated.set_index("user_id")["revenue"]

    # per channel
    channels = []
    cost_total = 0.0
    for ch, g in sent.groupby("channel"):
        users = set(g["user_id"])
        opens = e[(e["channel"] == ch) & (e["kind"] == "open")]["message_id"].nunique()
        clicks = e[(e["channel"] == ch) & (e["kind"] == "click")]["message_id"].nunique()
        conv_users = users & converted_users
        revenue = float(revenue_of.reindex(list(conv_users)).sum()) if conv_users else 0.0
        per_msg = settings.costs.get(ch)
        if per_msg is None:
            log.warning("campaign report: no cost per message for channel '%s'; counted as 0", ch)
            per_msg = 0.0
        offer_cost = float(sum(offer_share(o) * revenue_of.get(u, 0.0)
                               for u, o in zip(g["user_id"], g["offer"]) if u in converted_users))
        cost = len(g) * per_msg + offer_cost
        cost_total += cost
        channels.append({"channel": ch, "sends": int(len(g)), "recipients": int(len(users)), "opens": int(opens),
                         "clicks": int(clicks), "conversions": int(len(conv_users)), "revenue": revenue,
                         "message_cost": len(g) * per_msg, "offer_cost": offer_cost, "cost": cost})

    n_t, n_h = len(treated), len(hold)
    x_t, x_h = int(treated["converted"].sum()), int(hold["converted"].sum())
    inc: dict[str, Any] = {"recipients": n_t, "holdout_users": n_h, "recipient_conversions": x_t,
                           "holdout_conversions": x_h,
                           "recipient_rate": _ci(x_t / n_t if n_t else None, *wilson_interval(x_t, n_t)),
                           "holdout_rate": _ci(x_h / n_h if n_h else None, *wilson_interval(x_h, n_h))}
    if n_t and n_h:
        d, lo, hi = proportion_difference_interval(x_t, n_t, x_h, n_h)
        inc["rate_difference"] = _ci(d, lo, hi)
        inc["conversions"] = _ci(d * n_t, lo * n_t, hi * n_t)
        rd, rlo, rhi = mean_difference_interval(treated["revenue"].to_numpy(), hold["revenue"].to_numpy())
        inc["revenue_per_user"] = _ci(rd, rlo, rhi)
        inc["revenue"] = _ci(rd * n_t, rlo * n_t, rhi * n_t)
    else:
        log.warning("campaign has %s: no incremental figures", "no holdout" if not n_h else "no recipients")
        for k in ("rate_difference", "conversions", "revenue_per_user", "revenue"):
            inc[k] = _ci(None, None, None)

    revenue_total = float(treated["revenue"].sum())
    roi = _ci(None, None, None)
    if cost_total > 0 and inc["revenue"]["value"] is not None:
        r = inc["revenue"]
        roi = _ci(*((x - cost_total) / cost_total if x is not None else None for x in (r["value"], *r["ci"])))
    inc_conv = inc["conversions"]["value"]
    cac = cost_total / inc_conv if inc_conv is not None and inc_conv > 0 else None
    ltv = revenue_total / x_t if x_t else None
    economics = {"cost": cost_total, "revenue": revenue_total, "roi": roi, "cac": cac, "ltv": ltv,
                 "ltv_cac": ltv / cac if ltv is not None and cac else None}

    # attribution over recipients' touch paths
    touches = pd.concat([
        sent[["user_id", "channel", "sent_at"]].rename(columns={"sent_at": "timestamp"}),
        e[["user_id", "channel", "timestamp"]],
    ], ignore_index=True)
    conv = purchases.merge(treated[["user_id", "first_at"]], on="user_id")
    conv = conv[(conv["timestamp"] >= conv["first_at"]) & (conv["timestamp"] <= conv["first_at"] + window_s)]
    paths = build_paths(touches, conv, lookback_s=int(window_s))
    table = attribute(paths) if len(paths) else pd.DataFrame()
    attribution = {m: {ch: {"conversions": float(table.loc[ch, f"{m}_conversions"]),
                            "revenue": float(table.loc[ch, f"{m}_revenue"])} for ch in table.index}
                   for m in MODELS} if len(table) else {m: {} for m in MODELS}
    return {"channels": channels, "incremental": inc, "economics": economics, "attribution": attribution,
            "paths": {"converting": int(paths["converted"].sum()) if len(paths) else 0,
                      "not_converting": int((~paths["converted"]).sum()) if len(paths) else 0}}


def _ci(value: float | None, lo: float | None, hi: float | None) -> dict[str, Any]:
    def clean(x: float | None) -> float | None:
        return None if x is None or not np.isfinite(x) else float(x)

    out: dict[str, Any] = {"value": clean(value), "ci": [clean(lo), clean(hi)]}
    if out["ci"][0] is not None and out["ci"][1] is not None:
        out["excludes_zero"] = bool(out["ci"][0] > 0 or out["ci"][1] < 0)
    return out


def outcomes_by_segment(outbox: pd.DataFrame, events: pd.DataFrame, campaign: str, profiles: pd.DataFrame,
                        settings: CampaignReportSettings = CampaignReportSettings()) -> pd.DataFrame:
    """One row per consenting user of ``campaign``: ``user_id, segment, holdout, converted, revenue``.

    The input of a differentially private release of campaign results by segment
    (``privacy.release_results_by_segment``); users without consent, or without a profile, are
    left out, as from every export.
    """
    msgs = outbox if campaign == "all" else outbox[outbox["campaign"] == campaign]
    if not len(msgs):
        raise DataValidationError(f"campaign '{campaign}' is not in the outbox")
    purchases = events[events["event_type"] == "purchase"]
    purchases = pd.DataFrame({"user_id": purchases["user_id"].astype(str).to_numpy(),
                              "timestamp": purchases["timestamp"].to_numpy(np.int64),
                              "value": purchases["value"].fillna(0.0).to_numpy(np.float64)})
    out = user_outcomes(msgs, purchases, settings.window_days * DAY)
    p = profiles[profiles["consent"].astype(bool)] if "consent" in profiles else profiles
    seg = p.set_index(p["user_id"].astype(str))["segment"].astype(str)
    out["segment"] = out["user_id"].map(seg)
    missing = int(out["segment"].isna().sum())
    if missing:
        log.info("results by segment: %d users without a (consenting) profile left out", missing)
    return out[out["segment"].notna()][["user_id", "segment", "holdout", "converted", "revenue"]].reset_index(drop=True)


# output


def write_campaign_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``campaign-<name>.html`` (tables and plots, inlined) and ``campaign-<name>.json``."""
    H.use_agg()
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"campaign-{re.sub(r'[^A-Za-z0-9_.-]+', '_', report['campaign'])}"
    json_path = d / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2))
    cur = report["currency"]
    parts = [f"<h1>Campaign report: {H.esc(report['campaign'])}"
             + (' <span class="badge">simulated data</span>' if report.get("simulated") else "") + "</h1>",
             f"<p class=\"muted\">Conversions counted within {report['window_days']:g} days of a user's first message. "
             f"Money in {H.esc(cur)}. Generated {H.esc(report['generated_at'])}.</p>"]
    for name, c in report["campaigns"].items():
        parts.append(_campaign_section(name, c, cur))
    parts.append("<h2>How the figures are computed</h2><ul>" + "".join(
        f"<li><b>{H.esc(k.replace('_', ' '))}</b>: {H.esc(v)}</li>" for k, v in report["methods"].items()) + "</ul>")
    costs = ", ".join(f"{k} {cur} {v:g}" for k, v in report["cost_per_message"].items())
    parts.append(f"<p class=\"muted\">Cost per message: {H.esc(costs)}.</p>")
    html_path = d / f"{stem}.html"
    html_path.write_text(H.page(f"Campaign report: {report['campaign']}", "\n".join(parts)))
    log.info("campaign report written to %s and %s", html_path, json_path)
    return html_path, json_path


def _campaign_section(name: str, c: dict[str, Any], cur: str) -> str:
    inc, eco = c["incremental"], c["economics"]
    out = [f"<h2>{H.esc(name)}</h2>", f"<p class=\"verdict\">{H.esc(campaign_verdict(c, cur))}</p>"]
    rows = [[ch["channel"], f"{ch['sends']:,}", f"{ch['opens']:,}", H.pct(ch["opens"] / ch["sends"]) if ch["sends"] else "-",
             f"{ch['clicks']:,}", f"{ch['conversions']:,}", H.money(ch["revenue"], cur),
             H.money(ch["message_cost"], cur), H.money(ch["offer_cost"], cur), H.money(ch["cost"], cur)]
            for ch in c["channels"]]
    out += ["<h3>Per channel</h3>",
            H.table(["channel", "sends", "opens", "open rate", "clicks", "converted recipients", "their revenue",
                     "message cost", "offer cost", "cost"], rows, numeric=range(1, 10))]

    def fmt(m: dict[str, Any], f) -> str:
        lo, hi = m["ci"]
        return "-" if m["value"] is None else f"{f(m['value'])} (95% CI {f(lo) if lo is not None else '-'} to {f(hi) if hi is not None else '-'})"

    out += ["<h3>Against the holdout</h3>", H.table(None, [
        ["recipients / holdout users", f"{inc['recipients']:,} / {inc['holdout_users']:,}"],
        ["conversion rate, recipients", fmt(inc["recipient_rate"], H.pct)],
        ["conversion rate, holdout", fmt(inc["holdout_rate"], H.pct)],
        ["incremental conversions", fmt(inc["conversions"], lambda x: f"{x:+,.1f}")],
        ["incremental revenue", fmt(inc["revenue"], lambda x: H.money(x, cur, signed=True))],
        ["cost", H.money(eco["cost"], cur)],
        ["ROI (incremental revenue - cost) / cost", fmt(eco["roi"], lambda x: H.pct(x, signed=True, digits=0))],
        ["LTV (revenue per converting recipient)", H.money(eco["ltv"], cur)],
        ["CAC (cost per incremental conversion)", H.money(eco["cac"], cur)],
        ["LTV / CAC", "-" if eco["ltv_cac"] is None else f"{eco['ltv_cac']:.2f}"],
    ])]
    att = c["attribution"]
    chans = sorted({ch for m in MODELS for ch in att[m]})
    if chans:
        out += ["<h3>Who gets the credit: four attribution models</h3>",
                "<p>Each model shares out the recipients' observed conversions over the channels of their "
                "touch paths; only the holdout comparison above says how many the campaign caused.</p>",
                H.table(["channel", *[MODEL_LABELS[m] for m in MODELS]],
                        [[ch, *[f"{att[m].get(ch, {}).get('conversions', 0.0):,.1f}" for m in MODELS]] for ch in chans],
                        numeric=range(1, 5)),
                H.img(_attribution_plot(att, chans), f"conversions credited to each channel by the four models, campaign {name}")]
    return "\n".join(out)


def campaign_verdict(c: dict[str, Any], cur: str) -> str:
    """One sentence: did the campaign cause conversions, how sure, and did it pay."""
    inc, eco = c["incremental"], c["economics"]
    conv = inc["conversions"]
    if conv["value"] is None:
        return "No holdout (or no recipients): the campaign's effect cannot be measured, only attributed."
    lo, hi = conv["ci"]
    sure = conv.get("excludes_zero", False)
    head = (f"The campaign caused about {conv['value']:+,.0f} conversions (95% CI {lo:+,.0f} to {hi:+,.0f})"
            if sure else f"No significant effect on conversions ({conv['value']:+,.0f}, 95% CI {lo:+,.0f} to {hi:+,.0f})")
    roi = eco["roi"]
    tail = ""
    if roi["value"] is not None:
        tail = f"; ROI {H.pct(roi['value'], signed=True, digits=0)} on {H.money(eco['cost'], cur)} spent"
    return head + tail + "."


def _attribution_plot(att: dict[str, dict[str, dict[str, float]]], chans: list[str]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.55 * len(chans) * 1.4))
    y = np.arange(len(chans))
    h = 0.8 / len(MODELS)
    for k, m in enumerate(MODELS):
        vals = [att[m].get(ch, {}).get("conversions", 0.0) for ch in chans]
        bars = ax.barh(y + (k - 1.5) * h, vals, height=h, label=MODEL_LABELS[m])
        ax.bar_label(bars, labels=[f"{v:,.1f}" for v in vals], padding=2, fontsize=8)
    ax.set_yticks(y, chans)
    ax.invert_yaxis()
    ax.set_xlabel("conversions credited")
    ax.set_title("Conversions credited to each channel")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    ax.margins(x=0.15)
    return H.png(fig)
