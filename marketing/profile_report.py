"""The profiles report: one self-contained HTML page a marketer can open or attach to an email.

Written for the reader who will act on it, not for the engineer who built the table:

* every chart carries its counts and shares on the bars (a chart without numbers cannot be quoted);
* every lifecycle segment and RFM group shows its revenue and share of revenue beside its size, and
  the rule that put users in it, with the thresholds the profiles were *built with*
  (``profiles.attrs["profile_config"]``), not today's defaults;
* attribute tokens read as words (``price_band:1`` -> "Price band 1", ``category:skincare`` ->
  "Category: skincare");
* R, F and M histograms show only the scores that occur, and say why a score is missing (ties:
  quintile scoring gives tied users one score); the R x FM grid the groups come from carries the
  count in each cell;
* data without order values says so ("no order values in this data") instead of printing a
  median of 0.00.

Plots are matplotlib PNGs inlined as base64, so the page has no side files and survives being
logged to MLflow as a single artifact. It shows aggregates only: like the export, it names no
user and shows no event.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerline.features.user_features import RFM_GRID, RFM_GROUP_DESCRIPTIONS, SEGMENTS
from towerline.marketing import report_html as H
from towerline.marketing.profiles import profile_thresholds, segment_definitions

log = logging.getLogger(__name__)

BASIS_WORDS = {
    "orders": "orders (purchases at distinct times)",
    "interaction_count": "interactions (the data has no purchases)",
    "order_value": "order value",
    "order_count": "number of orders (purchases carry no value)",
}
BAR = "#4C72B0"


def pretty_tag(token: str) -> str:
    """``price_band:1`` -> ``Price band 1``; ``category:skincare`` -> ``Category: skincare``; others unchanged."""
    key, sep, value = str(token).partition(":")
    if not sep:
        return str(token)
    name = key.replace("_", " ").strip().capitalize()
    return f"{name} {value}" if re.fullmatch(r"[0-9.]+", value) else f"{name}: {value}"


def write_profile_report(
    profiles: pd.DataFrame,
    path: str | Path,
    cluster_labels: dict[int, list[str]] | None = None,
    title: str = "Customer profiles",
) -> Path:
    """Write the HTML report of ``profiles`` (consenting users only) to ``path``; returns it."""
    H.use_agg()
    p = profiles[profiles["consent"].astype(bool)] if "consent" in profiles else profiles
    attrs = profiles.attrs
    has_money = (attrs.get("monetary_basis") or _first(p, "monetary_basis")) == "order_value"
    has_r = "r_score" in p and p["r_score"].notna().any()
    sections = [f"<h1>{H.esc(title)}</h1>", _facts(p, attrs, has_money), _rules(profiles)]

    sections += ["<h2>Lifecycle segments</h2>"]
    if (p["segment"] == "unknown").all():
        sections.append("<p>Unavailable: the data has no clock (timestamps are positions), so no user can be "
                        "placed in time.</p>")
    else:
        seg = _ordered_counts(p["segment"], SEGMENTS)
        sections += [H.img(_bar(seg, "Users per lifecycle segment"), "users per lifecycle segment with counts and shares"),
                     _group_table(p, "segment", seg.index, has_money, "segment", _segment_rules(profiles))]

    sections += ["<h2>RFM groups</h2>"]
    if (p["rfm_group"] == "unknown").all():
        sections.append("<p>Unavailable without recency (the data has no clock).</p>")
    else:
        groups = _ordered_counts(p["rfm_group"], tuple(RFM_GROUP_DESCRIPTIONS))
        sections += [H.img(_bar(groups, "Users per RFM group"), "users per RFM group with counts and shares"),
                     _group_table(p, "rfm_group", groups.index, has_money, "group", RFM_GROUP_DESCRIPTIONS)]

    sections += ["<h2>Recency, frequency and monetary scores</h2>",
                 "<p>Each score is 1-5 by quintile of users (5 = most recent, most frequent, highest spend); "
                 "users with the same value share a score, so a score can be missing when many users tie.</p>",
                 H.img(_histograms(p, has_r), "histograms of the R, F and M scores with counts"),
                 _missing_scores_note(p, has_r)]
    if has_r:
        sections += ["<h3>Users by recency and frequency-monetary score</h3>",
                     "<p>The RFM groups are regions of this grid: FM is the mean of the F and M scores, rounded.</p>",
                     H.img(_heatmap(p), "heatmap of users by R score and FM score, with the count in each cell")]

    if "cluster" in p and (p["cluster"] >= 0).any():
        sizes = p.loc[p["cluster"] >= 0, "cluster"].value_counts().sort_index()
        labels = cluster_labels or {}
        sections += [
            "<h2>Clusters of user embeddings: groups of similar taste</h2>",
            "<p>Groups of users whose behaviour the model sees as alike (spherical k-means over the model's user "
            "vectors); each is labelled by the interests most over-represented in it.</p>",
            H.img(_bar(sizes.rename(lambda c: f"#{c}"), "Users per taste cluster"), "users per cluster with counts and shares"),
            H.table(["cluster", "users", "share", "distinctive interests"],
                    [[f"#{int(c)}", f"{int(n):,}", H.pct(n / len(p)), ", ".join(pretty_tag(t) for t in labels.get(int(c), []))]
                     for c, n in sizes.items()], numeric=[1, 2]),
        ]
    top_tags = p["tags"].explode().dropna().value_counts().head(15) if "tags" in p else pd.Series(dtype=int)
    if len(top_tags):
        sections += ["<h2>Most common interests</h2>",
                     "<p>Users with the attribute among their top interests (recency-weighted: this month's "
                     "interests outrank last year's).</p>",
                     H.img(_bar(top_tags.rename(pretty_tag), "Users with the interest in their top interests (share of all users)",
                                horizontal=True, total=len(p)), "most common interest tags with counts and shares"),
                     H.table(["interest", "users", "share of users"],
                             [[pretty_tag(t), f"{int(n):,}", H.pct(n / len(p))] for t, n in top_tags.items()],
                             numeric=[1, 2])]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(H.page(title, "\n".join(sections)))
    log.info("profile report written to %s", out)
    return out


def _first(p: pd.DataFrame, col: str) -> Any:
    return p[col].iloc[0] if col in p and len(p) else None


def _facts(p: pd.DataFrame, attrs: dict[str, Any], has_money: bool) -> str:
    freq = attrs.get("frequency_basis") or _first(p, "frequency_basis")
    mon = attrs.get("monetary_basis") or _first(p, "monetary_basis")
    rows = [["users (with consent)", f"{len(p):,}"], ["data set", str(attrs.get("dataset", "-"))],
            ["frequency counts", BASIS_WORDS.get(str(freq), str(freq))],
            ["monetary measures", BASIS_WORDS.get(str(mon), str(mon))]]
    if attrs.get("reference_time") is not None and attrs.get("has_clock", True):
        rows.append(["profiles as of (UTC)", str(pd.Timestamp(int(attrs["reference_time"]), unit="s"))])
    if attrs.get("has_clock") is False:
        rows.append(["recency", "unavailable: the data has no clock (timestamps are positions)"])
    if has_money and len(p):
        buyers = p["monetary"] > 0
        rows += [["total revenue", f"{float(p['monetary'].sum()):,.2f}"],
                 ["median spend of customers who ordered",
                  f"{float(p.loc[buyers, 'monetary'].median()):,.2f}" if buyers.any() else "nobody ordered"]]
    else:
        rows.append(["revenue", "no order values in this data"])
    return H.table(None, rows)


def _rules(profiles: pd.DataFrame) -> str:
    cfg = profile_thresholds(profiles)
    recorded = bool(profiles.attrs.get("profile_config"))
    items = "".join(f"<li><b>{H.esc(d['name'])}</b>: {H.esc(d['rule'])}</li>"
                    for d in segment_definitions(cfg) if d["kind"] == "lifecycle")
    src = "as recorded with these profiles" if recorded else "defaults: these profiles recorded none"
    return (f"<h2>How users are placed</h2><p>Lifecycle segments, first matching rule wins ({H.esc(src)}):</p>"
            f"<ul>{items}</ul><p>Interest tags weigh each touch by 0.5 per {cfg.tag_half_life_days:g} days of age; "
            f"each user keeps their top {cfg.n_tags}.</p>")


def _segment_rules(profiles: pd.DataFrame) -> dict[str, str]:
    return {d["name"]: d["rule"] for d in segment_definitions(profile_thresholds(profiles)) if d["kind"] == "lifecycle"}


def _group_table(p: pd.DataFrame, col: str, order: pd.Index, has_money: bool, name: str,
                 meaning: dict[str, str]) -> str:
    n = p[col].astype(str).value_counts()
    revenue = p.groupby(p[col].astype(str))["monetary"].sum() if has_money else None
    total_rev = float(p["monetary"].sum()) if has_money else 0.0
    rows = []
    for g in order:
        users = int(n.get(g, 0))
        row = [g, f"{users:,}", H.pct(users / len(p)) if len(p) else "-"]
        if has_money:
            r = float(revenue.get(g, 0.0))
            row += [f"{r:,.2f}", H.pct(r / total_rev) if total_rev else "-"]
        rows.append(row + [meaning.get(g, "")])
    header = [name, "users", "share of users"] + (["revenue", "share of revenue"] if has_money else []) + ["rule"]
    note = "" if has_money else '<p class="muted">Revenue per group: no order values in this data.</p>'
    return H.table(header, rows, numeric=range(1, 5 if has_money else 3)) + note


def _ordered_counts(col: pd.Series, order: tuple[str, ...]) -> pd.Series:
    counts = col.astype(str).value_counts()
    first = [k for k in order if k in counts.index]
    return counts.reindex(first + sorted(set(counts.index) - set(first)))


def _bar(counts: pd.Series, title: str, horizontal: bool = False, total: float | None = None) -> bytes:
    """Bars labelled with count and share of ``total`` (default: the bars' sum)."""
    import matplotlib.pyplot as plt

    total = float(total if total is not None else counts.sum()) or 1.0
    labels = [f"{int(v):,} ({v / total:.1%})" for v in counts.to_numpy()]
    names = [str(k) for k in counts.index]
    if horizontal:
        fig, ax = plt.subplots(figsize=(9, 0.6 + 0.34 * len(counts)))
        y = np.arange(len(counts))
        bars = ax.barh(y, counts.to_numpy(), color=BAR)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("users")
        ax.margins(x=0.22)
    else:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        x = np.arange(len(counts))
        bars = ax.bar(x, counts.to_numpy(), color=BAR)
        ax.set_xticks(x, names)  # positions, not category units: labels may look numeric
        ax.set_ylabel("users")
        ax.margins(y=0.18)
        if max((len(s) for s in names), default=0) > 9:
            ax.tick_params(axis="x", rotation=25)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
    ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
    ax.set_title(title)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return H.png(fig)


def _score_counts(p: pd.DataFrame, col: str) -> pd.Series:
    s = p[col].dropna().astype(int)
    return s.value_counts().sort_index()  # only scores that occur: no empty bins


def _histograms(p: pd.DataFrame, has_r: bool) -> bytes:
    import matplotlib.pyplot as plt

    cols = (["r_score"] if has_r else []) + ["f_score", "m_score"]
    titles = {"r_score": "Recency score (5 = most recent)", "f_score": "Frequency score (5 = most often)",
              "m_score": "Monetary score (5 = highest)"}
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.4))
    for ax, col in zip(np.atleast_1d(axes), cols):
        counts = _score_counts(p, col)
        x = np.arange(len(counts))
        bars = ax.bar(x, counts.to_numpy(), color="#55A868")
        ax.set_xticks(x, [str(i) for i in counts.index])
        ax.bar_label(bars, labels=[f"{int(v):,}\n{v / len(p):.0%}" for v in counts.to_numpy()], padding=2, fontsize=8)
        ax.set_title(titles[col], fontsize=10)
        ax.set_xlabel("score")
        ax.set_ylabel("users")
        ax.margins(y=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return H.png(fig)


def _missing_scores_note(p: pd.DataFrame, has_r: bool) -> str:
    """Why a score has no bar: users tied at the lowest value all get its score (see ``quintile_scores``)."""
    words = {"r_score": "recency", "f_score": "frequency", "m_score": "monetary"}
    notes = []
    for col in (["r_score"] if has_r else []) + ["f_score", "m_score"]:
        counts = _score_counts(p, col)
        missing = [s for s in range(1, 6) if s not in counts.index]
        if missing and len(counts):
            biggest = int(counts.idxmax())
            listed = " and ".join([", ".join(map(str, missing[:-1])), str(missing[-1])] if len(missing) > 1 else [str(missing[0])])
            verb = "scores" if len(missing) > 1 else "score"
            notes.append(f"{words[col]} {verb} {listed} {'do' if len(missing) > 1 else 'does'} not occur: "
                         f"{counts.max() / len(p):.0%} of users share one value and all score {biggest}")
    return '<p class="muted">' + H.esc("; ".join(notes)) + ".</p>" if notes else ""


def _heatmap(p: pd.DataFrame) -> bytes:
    import matplotlib.pyplot as plt

    r = p["r_score"].astype("float").to_numpy()
    fm = np.floor((p["f_score"].to_numpy() + p["m_score"].to_numpy()) / 2 + 0.5)
    ok = ~np.isnan(r)
    grid = np.zeros((5, 5), dtype=np.int64)
    np.add.at(grid, (r[ok].astype(int) - 1, fm[ok].astype(int) - 1), 1)
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    from matplotlib.colors import PowerNorm

    im = ax.imshow(grid, origin="lower", cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=max(int(grid.max()), 1)))
    vmax = grid.max() or 1
    for i in range(5):
        for j in range(5):
            colour = "white" if np.sqrt(grid[i, j] / vmax) > 0.6 else "black"  # dark cell under the 0.5-power scale
            text = f"{grid[i, j]:,}\n{RFM_GRID[i][j]}" if grid[i, j] else RFM_GRID[i][j]
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour if grid[i, j] else "#999")
    ax.set_xticks(range(5), [str(i) for i in range(1, 6)])
    ax.set_yticks(range(5), [str(i) for i in range(1, 6)])
    ax.set_xlabel("FM score (frequency and monetary)")
    ax.set_ylabel("R score (recency)")
    ax.set_title("Users by R x FM score, with the RFM group of each cell")
    fig.colorbar(im, ax=ax, label="users")
    fig.tight_layout()
    return H.png(fig)
