"""The profiles report: one self-contained HTML page a marketer can open or attach to an email.

Plots are matplotlib PNGs inlined as base64, so the page has no side files and survives being
logged to MLflow as a single artifact. It shows aggregates only (segment sizes, RFM score
distributions, cluster sizes and labels): like the export, it names no user and shows no event.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerline.features.user_features import RFM_GROUP_DESCRIPTIONS, SEGMENTS
log = logging.getLogger(__name__)


def write_profile_report(
    profiles: pd.DataFrame,
    path: str | Path,
    cluster_labels: dict[int, list[str]] | None = None,
    title: str = "Customer profiles",
) -> Path:
    """Write the HTML report of ``profiles`` (consenting users only) to ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; safe in CLI, tests and Serve replicas

    p = profiles[profiles["consent"].astype(bool)] if "consent" in profiles else profiles
    attrs = profiles.attrs
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        _facts(p, attrs),
        "<h2>Lifecycle segments</h2>",
        _img(_bar(_ordered_counts(p["segment"], SEGMENTS), "users per lifecycle segment", "users")),
        "<h2>RFM groups</h2>",
        _img(_bar(_ordered_counts(p["rfm_group"], tuple(RFM_GROUP_DESCRIPTIONS)), "users per RFM group", "users")),
        _table(
            ["group", "users", "meaning"],
            [[g, int(n), RFM_GROUP_DESCRIPTIONS.get(g, "")] for g, n in p["rfm_group"].value_counts().items()],
        ),
        "<h2>RFM score distribution</h2>",
        _img(_score_grid(p)),
    ]
    if "cluster" in p and (p["cluster"] >= 0).any():
        sizes = p.loc[p["cluster"] >= 0, "cluster"].value_counts().sort_index()
        labels = cluster_labels or {}
        sections += [
            "<h2>Clusters of user embeddings</h2>",
            "<p>Spherical k-means over the model's user vectors; each cluster is labelled by the "
            "interest tags most over-represented in it (lift over the overall share).</p>",
            _img(_bar(sizes.rename(lambda c: f"#{c}"), "users per cluster", "users")),
            _table(
                ["cluster", "users", "distinctive tags"],
                [[int(c), int(n), ", ".join(labels.get(int(c), []))] for c, n in sizes.items()],
            ),
        ]
    top_tags = p["tags"].explode().dropna().value_counts().head(15) if "tags" in p else pd.Series(dtype=int)
    if len(top_tags):
        sections += ["<h2>Most common interest tags</h2>", _img(_bar(top_tags, "users with the tag in their top tags", "users"))]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(title, "\n".join(sections)))
    log.info("profile report written to %s", out)
    return out


def _facts(p: pd.DataFrame, attrs: dict[str, Any]) -> str:
    rows = [
        ["users (with consent)", f"{len(p):,}"],
        ["data set", str(attrs.get("dataset", "-"))],
        ["frequency from", str(attrs.get("frequency_basis", p.get("frequency_basis", pd.Series(["-"])).iloc[0] if len(p) else "-"))],
        ["monetary from", str(attrs.get("monetary_basis", p.get("monetary_basis", pd.Series(["-"])).iloc[0] if len(p) else "-"))],
    ]
    if attrs.get("reference_time") is not None and attrs.get("has_clock", True):
        rows.append(["reference time (UTC)", str(pd.Timestamp(int(attrs["reference_time"]), unit="s"))])
    if attrs.get("has_clock") is False:
        rows.append(["recency", "unavailable: the data has no clock (timestamps are positions)"])
    if "monetary" in p and len(p):
        rows.append(["median monetary", f"{float(p['monetary'].median()):,.2f}"])
    return _table(["", ""], rows)


def _ordered_counts(col: pd.Series, order: tuple[str, ...]) -> pd.Series:
    counts = col.astype(str).value_counts()
    first = [k for k in order if k in counts.index]
    return counts.reindex(first + sorted(set(counts.index) - set(first)))


def _bar(counts: pd.Series, title: str, ylabel: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = np.arange(len(counts))
    ax.bar(x, counts.to_numpy(), color="#4C72B0")
    ax.set_xticks(x, [str(k) for k in counts.index])  # positions, not category units: labels may look numeric
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    return _png(fig)


def _score_grid(p: pd.DataFrame) -> bytes:
    """Histograms of F and M scores and, with a clock, the R x FM grid the groups come from."""
    import matplotlib.pyplot as plt

    has_r = "r_score" in p and p["r_score"].notna().any()
    fig, axes = plt.subplots(1, 3 if has_r else 2, figsize=(10, 3.2))
    for ax, col in zip(axes, ("f_score", "m_score")):
        counts = p[col].value_counts().reindex(range(1, 6), fill_value=0)
        ax.bar(np.arange(1, 6), counts.to_numpy(), color="#55A868")
        ax.set_xticks(np.arange(1, 6))
        ax.set_title(col.replace("_", " "))
        ax.set_xlabel("score")
    if has_r:
        r = p["r_score"].astype("float").to_numpy()
        fm = np.floor((p["f_score"].to_numpy() + p["m_score"].to_numpy()) / 2 + 0.5)
        grid = np.zeros((5, 5))
        ok = ~np.isnan(r)
        np.add.at(grid, (r[ok].astype(int) - 1, fm[ok].astype(int) - 1), 1)
        im = axes[2].imshow(grid, origin="lower", cmap="Blues")
        axes[2].set_xticks(range(5), [str(i) for i in range(1, 6)])
        axes[2].set_yticks(range(5), [str(i) for i in range(1, 6)])
        axes[2].set_xlabel("FM score")
        axes[2].set_ylabel("R score")
        axes[2].set_title("users by R x FM")
        fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes) -> str:
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}img{{max-width:100%}}</style></head>
<body>
{body}
</body></html>
"""
