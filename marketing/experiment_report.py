"""A/B experiments: stable arm assignment, a feedback store, and a lift report with intervals.

Assignment. A user's arm is a pure function of (experiment name, user id): ``sha256`` of the pair
gives a number in [0, 1), and the arms' cumulative traffic shares cut [0, 1) into intervals. No
table of assignments is stored, every replica agrees, a user keeps their arm for the life of the
experiment, and including the experiment name makes different experiments independent splits.

Feedback. ``FeedbackStore`` (SQLite, one file) records impressions, clicks and purchases (with
value) against the experiment and the arm that served them; the ``event_id`` primary key makes a
retried ``POST /feedback`` harmless (``INSERT OR IGNORE``), and an event without an id gets one
derived from its content.

The report, per arm, counts the *users* who were exposed and gives, each with a 95% interval:

* **conversion** = purchasing users / users: a binomial proportion over independent users, so the
  Wilson score interval (Wilson, JASA 1927), which keeps its coverage at small counts and rates
  near 0 where the textbook normal interval does not.
* **CTR** = clicks / impressions. Impressions of one user are not independent (the same person
  clicks or ignores many of them), so a Wilson interval over impressions would be too narrow.
  CTR is a ratio of two per-user sums, and its variance comes from the delta method over users
  (Deng, Knoblich & Lu, "Applying the Delta Method in Metric Analytics", KDD 2018).
* **revenue per user** = mean of per-user revenue, normal approximation (mean +- 1.96 s/sqrt(n));
  with thousands of users per arm the central limit theorem holds even for skewed revenue.
* **lift** of every arm over control, relative (``arm / control - 1``) and absolute, with
  percentile intervals from a Poisson bootstrap over users (each user weighted Poisson(1) per
  replicate; Chamandy et al., "Estimating Uncertainty for Massive Data Streams", Google 2012):
  resampling users keeps each user's impressions together, and the ratio needs no formula.

``simulate`` writes synthetic users' responses with known true rates into a store, so the whole
path (assignment -> feedback -> report) can be demonstrated and tested end to end.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from towerline.config import ExperimentConfig
from towerline.errors import DataValidationError
from towerline.marketing.feedback import FeedbackStore
from towerline.marketing.statistics import bootstrap_metrics, mean_interval, ratio_interval, wilson_interval

log = logging.getLogger(__name__)


# the report

METRICS = ("ctr", "conversion", "revenue_per_user")
METHODS = {
    "users": "distinct users with any feedback in the arm",
    "ctr": "clicks / impressions; 95% CI by the delta method over users (Deng et al., KDD 2018)",
    "conversion": "purchasing users / users; 95% Wilson score interval",
    "revenue_per_user": "purchase value / users; 95% CI by the normal approximation",
    "lift": "arm / control - 1 (relative) and arm - control (absolute); 95% percentile intervals from a "
            "Poisson bootstrap over users (Chamandy et al., 2012)",
}


def experiment_report(
    store: FeedbackStore, experiment: ExperimentConfig, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per arm: users, impressions, CTR, conversion, revenue per user with 95% intervals, and the lift
    of each arm over the control arm with its interval. JSON-ready (NaN written as null)."""
    users = store.per_user(experiment.name)
    if not len(users):
        raise DataValidationError(
            f"experiment '{experiment.name}': no feedback recorded in {store.path}; send POST /feedback "
            f"or run `towerline experiment simulate {experiment.name}`"
        )
    twice = users["user_id"].duplicated(keep=False)
    if twice.any():
        log.warning("experiment %s: %d users have feedback in more than one arm; each arm counts them",
                    experiment.name, int(users.loc[twice, "user_id"].nunique()))
    rng = np.random.default_rng(seed)
    arms: dict[str, Any] = {}
    boots: dict[str, np.ndarray] = {}
    for arm in experiment.arms:
        f = users[users["arm"] == arm.name]
        n = len(f)
        purchasers = int((f["purchases"] > 0).sum())
        ctr, ctr_lo, ctr_hi = ratio_interval(f["clicks"].to_numpy(), f["impressions"].to_numpy())
        conv_lo, conv_hi = wilson_interval(purchasers, n)
        rpu, rpu_lo, rpu_hi = mean_interval(f["revenue"].to_numpy())
        arms[arm.name] = {
            "users": n,
            "impressions": int(f["impressions"].sum()),
            "clicks": int(f["clicks"].sum()),
            "purchasers": purchasers,
            "revenue": float(f["revenue"].sum()),
            "share": arm.share,
            "ctr": _metric(ctr, ctr_lo, ctr_hi),
            "conversion": _metric(purchasers / n if n else float("nan"), conv_lo, conv_hi),
            "revenue_per_user": _metric(rpu, rpu_lo, rpu_hi),
        }
        if n:
            boots[arm.name] = bootstrap_metrics(f, n_boot, rng)
    control = experiment.control
    for arm in experiment.arms:
        if arm.name == control:
            continue
        lift: dict[str, Any] = {}
        for j, metric in enumerate(METRICS):
            a, c = arms[arm.name][metric]["value"], arms[control][metric]["value"]
            if arm.name not in boots or control not in boots or c in (None, 0) or a is None:
                lift[metric] = {"relative": _metric(float("nan"), float("nan"), float("nan")),
                                "absolute": _metric(float("nan"), float("nan"), float("nan"))}
                continue
            ba, bc = boots[arm.name][:, j], boots[control][:, j]
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = ba / bc - 1
            lift[metric] = {
                "relative": _metric(a / c - 1, *np.nanpercentile(rel, [2.5, 97.5])),
                "absolute": _metric(a - c, *np.nanpercentile(ba - bc, [2.5, 97.5])),
            }
        arms[arm.name]["lift"] = lift
    return {
        "experiment": experiment.name,
        "control": control,
        "arms": arms,
        "methods": METHODS,
        "bootstrap_replicates": n_boot,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _metric(value: float, lo: float, hi: float) -> dict[str, Any]:
    def clean(x: float) -> float | None:
        return None if x is None or not np.isfinite(x) else float(x)

    lo_c, hi_c = clean(lo), clean(hi)
    out: dict[str, Any] = {"value": clean(value), "ci": [lo_c, hi_c]}
    if lo_c is not None and hi_c is not None:
        out["excludes_zero"] = bool(lo_c > 0 or hi_c < 0)
    return out


def format_report(report: dict[str, Any]) -> str:
    """Plain-text table of the report for the terminal."""
    lines = [f"experiment {report['experiment']} (control: {report['control']})"]
    header = f"{'arm':<14}{'users':>8}{'impr.':>9}  {'CTR [95% CI]':<24}{'conversion [95% CI]':<26}{'revenue/user [95% CI]':<26}"
    lines += [header, "-" * len(header)]
    for name, a in report["arms"].items():
        lines.append(
            f"{name:<14}{a['users']:>8,}{a['impressions']:>9,}  {_fmt(a['ctr'], pct=True):<24}"
            f"{_fmt(a['conversion'], pct=True):<26}{_fmt(a['revenue_per_user']):<26}"
        )
    for name, a in report["arms"].items():
        if "lift" not in a:
            continue
        cells = [f"{m} {_fmt(a['lift'][m]['relative'], pct=True, sign=True)}" for m in METRICS]
        lines.append(f"lift of {name} over {report['control']}: " + "  ".join(cells))
    return "\n".join(lines)


def _fmt(m: dict[str, Any], pct: bool = False, sign: bool = False) -> str:
    if m["value"] is None:
        return "-"
    f = (lambda x: f"{x * 100:{'+' if sign else ''}.2f}%") if pct else (lambda x: f"{x:{'+' if sign else ''}.2f}")
    lo, hi = m["ci"]
    ci = f"[{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "[-]"
    return f"{f(m['value'])} {ci}"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<experiment>.html`` (tables and a lift plot, inlined) and ``<experiment>.json``."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = report["experiment"]
    json_path = d / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2))

    rows = "".join(
        f"<tr><td>{html.escape(arm)}</td><td>{a['users']:,}</td><td>{a['impressions']:,}</td>"
        f"<td>{_fmt(a['ctr'], pct=True)}</td><td>{_fmt(a['conversion'], pct=True)}</td>"
        f"<td>{_fmt(a['revenue_per_user'])}</td></tr>"
        for arm, a in report["arms"].items()
    )
    lift_rows = "".join(
        f"<tr><td>{html.escape(arm)}</td>" + "".join(
            f"<td>{_fmt(a['lift'][m]['relative'], pct=True, sign=True)}</td>" for m in METRICS) + "</tr>"
        for arm, a in report["arms"].items() if "lift" in a
    )
    img = ""
    treated = [(arm, a) for arm, a in report["arms"].items() if "lift" in a]
    if treated:
        fig, axes = plt.subplots(1, 3, figsize=(11, 1.2 + 0.5 * len(treated)))
        for ax, m in zip(axes, METRICS):
            for y, (arm, a) in enumerate(treated):
                r = a["lift"][m]["relative"]
                if r["value"] is None or None in r["ci"]:
                    continue
                ax.errorbar([r["value"] * 100], [y], xerr=[[(r["value"] - r["ci"][0]) * 100], [(r["ci"][1] - r["value"]) * 100]],
                            fmt="o", capsize=4)
            ax.axvline(0, color="grey", lw=1)
            ax.set_yticks(range(len(treated)), [arm for arm, _ in treated])
            ax.set_title(f"lift in {m} (%)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        img = f'<img alt="lifts" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    methods = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in report["methods"].items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Experiment {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:64em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Experiment {html.escape(name)}</h1>
<p>Control arm: <b>{html.escape(report['control'])}</b>. Generated {html.escape(report['generated_at'])}.</p>
<h2>Arms</h2>
<table><tr><th>arm</th><th>users</th><th>impressions</th><th>CTR [95% CI]</th><th>conversion [95% CI]</th><th>revenue per user [95% CI]</th></tr>{rows}</table>
<h2>Lift over control</h2>
<table><tr><th>arm</th><th>CTR</th><th>conversion</th><th>revenue per user</th></tr>{lift_rows}</table>
{img}
<h2>Methods</h2><ul>{methods}</ul>
</body></html>
"""
    html_path = d / f"{name}.html"
    html_path.write_text(page)
    return html_path, json_path


# ----------------------------------------------------------------------------------------------
