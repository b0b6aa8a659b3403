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

Trust checks on top of the numbers:

* **sample-ratio mismatch** (SRM): the observed users per arm against the configured shares, a
  chi-square goodness-of-fit test flagged at p < 0.001 (Fabijan et al., KDD 2019). A mismatch means
  users were lost or double-counted unevenly, so no lift of that report should be believed; the
  verdict says so first.
* **verdict**: one sentence per arm saying on which metrics it differs from control, in which
  direction and with what interval, and which metrics do not differ significantly (relative-lift
  interval containing 0).
* **simulated**: feedback written by ``towerline experiment simulate`` (user ids ``sim<seed>-...``)
  is marked on the page and in the JSON, so a demo is never mistaken for a result.

The intervals' coverage is checked by simulation, not assumed: ``bench/experiment_coverage.py``
runs hundreds of experiments with a known lift through ``report_from_users`` and counts how often
each 95% interval holds the truth (``tests/marketing/test_experiments.py`` runs a small version).

``simulate`` writes synthetic users' responses with known true rates into a store, so the whole
path (assignment -> feedback -> report) can be demonstrated and tested end to end.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerline.config import ExperimentConfig
from towerline.errors import DataValidationError
from towerline.marketing import report_html as H
from towerline.marketing.feedback import FeedbackStore
from towerline.marketing.simulation import is_simulated
from towerline.marketing.statistics import (
    bootstrap_metrics,
    mean_interval,
    ratio_interval,
    sample_ratio_test,
    wilson_interval,
)

log = logging.getLogger(__name__)


# the report

METRICS = ("ctr", "conversion", "revenue_per_user")
METRIC_LABELS = {"ctr": "click-through rate", "conversion": "conversion", "revenue_per_user": "revenue per user"}
SRM_ALPHA = 0.001  # sample-ratio mismatch is flagged below this p-value (Fabijan et al., KDD 2019)
METHODS = {
    "users": "distinct users with any feedback in the arm",
    "ctr": "clicks / impressions; 95% CI by the delta method over users (Deng et al., KDD 2018)",
    "conversion": "purchasing users / users; 95% Wilson score interval",
    "revenue_per_user": "purchase value / users; 95% CI by the normal approximation",
    "lift": "arm / control - 1 (relative) and arm - control (absolute); 95% percentile intervals from a "
            "Poisson bootstrap over users (Chamandy et al., 2012)",
    "sample_ratio": "chi-square test of users per arm against the configured shares; mismatch flagged at "
                    "p < 0.001 (Fabijan et al., KDD 2019)",
}


def experiment_report(
    store: FeedbackStore, experiment: ExperimentConfig, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per arm: users, impressions, CTR, conversion, revenue per user with 95% intervals, and the lift
    of each arm over the control arm with its interval; the sample-ratio check and a verdict.
    JSON-ready (NaN written as null)."""
    users = store.per_user(experiment.name)
    if not len(users):
        raise DataValidationError(
            f"experiment '{experiment.name}': no feedback recorded in {store.path}; send POST /feedback "
            f"or run `towerline experiment simulate {experiment.name}`"
        )
    return report_from_users(users, experiment, n_boot, seed)


def report_from_users(
    users: pd.DataFrame, experiment: ExperimentConfig, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``experiment_report`` over per-user sums (``user_id, arm, impressions, clicks, purchases, revenue``)."""
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
    report: dict[str, Any] = {
        "experiment": experiment.name,
        "control": control,
        "currency": experiment.currency,
        "simulated": is_simulated(users["user_id"]),
        "sample_ratio": sample_ratio_check(arms),
        "arms": arms,
        "methods": METHODS,
        "bootstrap_replicates": n_boot,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    report["verdict"] = verdict(report)
    return report


def sample_ratio_check(arms: dict[str, Any]) -> dict[str, Any]:
    """Observed vs expected users per arm, the chi-square p-value, and ``mismatch`` when p < ``SRM_ALPHA``."""
    observed = np.array([a["users"] for a in arms.values()], dtype=np.float64)
    shares = np.array([a["share"] for a in arms.values()], dtype=np.float64)
    stat, p = sample_ratio_test(observed, shares)
    expected = observed.sum() * shares / shares.sum()
    return {
        "observed": {k: int(a["users"]) for k, a in arms.items()},
        "expected": {k: float(e) for k, e in zip(arms, expected)},
        "chi2": None if not np.isfinite(stat) else stat,
        "p_value": None if not np.isfinite(p) else p,
        "mismatch": bool(np.isfinite(p) and p < SRM_ALPHA),
    }


def verdict(report: dict[str, Any]) -> list[str]:
    """Sentences a reader can act on: SRM warning first, then per arm what differs from control.

    e.g. ``"treatment raises conversion by +4.1% (95% CI +1.2% to +7.0%); revenue per user not
    significantly different"``. A metric differs when its relative-lift interval excludes 0.
    """
    out = []
    srm = report["sample_ratio"]
    if srm["mismatch"]:
        obs = ", ".join(f"{k} {v:,}" for k, v in srm["observed"].items())
        exp = ", ".join(f"{k} {v:,.0f}" for k, v in srm["expected"].items())
        out.append(f"Sample-ratio mismatch (p = {srm['p_value']:.1e}): users per arm {obs}, expected {exp}. "
                   "Assignment or logging lost users unevenly; do not trust the lifts below until it is found.")
    control = report["control"]
    for name, a in report["arms"].items():
        if "lift" not in a:
            continue
        moved, flat = [], []
        for m in METRICS:
            r = a["lift"][m]["relative"]
            if r["value"] is None or None in r["ci"]:
                flat.append(f"{METRIC_LABELS[m]} not measurable")
            elif r.get("excludes_zero"):
                verb = "raises" if r["value"] > 0 else "lowers"
                moved.append(f"{verb} {METRIC_LABELS[m]} by {H.pct(r['value'], True)} "
                             f"(95% CI {H.pct(r['ci'][0], True)} to {H.pct(r['ci'][1], True)})")
            else:
                flat.append(f"{METRIC_LABELS[m]} not significantly different")
        if moved:
            sentence = f"{name} " + "; ".join(moved) + f" over {control}" + ("; " + ", ".join(flat) if flat else "")
        else:
            sentence = f"{name} vs {control}: no significant difference in CTR, conversion or revenue per user"
        out.append(sentence + ".")
    return out


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
    cur = report.get("currency", "")
    lines = [f"experiment {report['experiment']} (control: {report['control']})"
             + (" [SIMULATED DATA]" if report.get("simulated") == "yes" else "")]
    header = f"{'arm':<14}{'users':>8}{'impr.':>9}  {'CTR [95% CI]':<24}{'conversion [95% CI]':<26}{f'revenue/user ({cur}) [95% CI]':<26}"
    lines += [header, "-" * len(header)]
    for name, a in report["arms"].items():
        lines.append(
            f"{name:<14}{a['users']:>8,}{a['impressions']:>9,}  {_fmt(a['ctr'], pct=True):<24}"
            f"{_fmt(a['conversion'], pct=True):<26}{_fmt(a['revenue_per_user']):<26}"
        )
    for name, a in report["arms"].items():
        if "lift" not in a:
            continue
        cells = [f"{METRIC_LABELS[m]} {_fmt(a['lift'][m]['relative'], pct=True, sign=True)}" for m in METRICS]
        lines.append(f"lift of {name} over {report['control']}: " + "  ".join(cells))
    srm = report.get("sample_ratio")
    if srm and srm["p_value"] is not None:
        lines.append(f"sample ratio: chi2 {srm['chi2']:.2f}, p = {srm['p_value']:.3g}"
                     + (" -> MISMATCH" if srm["mismatch"] else " (ok)"))
    lines += [f"verdict: {v}" for v in report.get("verdict", [])]
    return "\n".join(lines)


def _fmt(m: dict[str, Any], pct: bool = False, sign: bool = False) -> str:
    if m["value"] is None:
        return "-"
    f = (lambda x: f"{x * 100:{'+' if sign else ''}.2f}%") if pct else (lambda x: f"{x:{'+' if sign else ''},.2f}")
    lo, hi = m["ci"]
    ci = f"[{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "[-]"
    return f"{f(m['value'])} {ci}"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<experiment>.html`` (verdict, checks, tables and plots, inlined) and ``<experiment>.json``."""
    H.use_agg()
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = report["experiment"]
    cur = report.get("currency", "EUR")
    json_path = d / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2))
    simulated = report.get("simulated", "no")
    parts = [f"<h1>Experiment {H.esc(name)}"
             + (' <span class="badge">simulated data</span>' if simulated != "no" else "") + "</h1>"]
    if simulated != "no":
        parts.append('<p class="warn">' + ("All" if simulated == "yes" else "Some") + " of this feedback was "
                     "generated by <code>towerline experiment simulate</code> with known rates: a demonstration, "
                     "not a measurement of real users.</p>")
    for v in report.get("verdict", []):
        cls = "warn" if v.startswith("Sample-ratio mismatch") else "verdict"
        parts.append(f'<p class="{cls}">{H.esc(v)}</p>')
    parts.append(f"<p class=\"muted\">Control arm: <b>{H.esc(report['control'])}</b>. Money in {H.esc(cur)}. "
                 f"Generated {H.esc(report['generated_at'])}.</p>")
    rows = [[arm, f"{a['users']:,}", H.pct(a["share"], digits=0), f"{a['impressions']:,}", _fmt(a["ctr"], pct=True),
             _fmt(a["conversion"], pct=True), _fmt(a["revenue_per_user"])] for arm, a in report["arms"].items()]
    parts += ["<h2>Arms</h2>", H.table(["arm", "users", "planned share", "impressions", "CTR [95% CI]",
                                         "conversion [95% CI]", f"revenue per user, {cur} [95% CI]"], rows, numeric=[1, 2, 3]),
              H.img(_arms_plot(report, cur), "each arm's CTR, conversion and revenue per user with 95% intervals")]
    treated = [(arm, a) for arm, a in report["arms"].items() if "lift" in a]
    if treated:
        lift_rows = [[arm, *[_fmt(a["lift"][m]["relative"], pct=True, sign=True) for m in METRICS]] for arm, a in treated]
        parts += ["<h2>Lift over control</h2>",
                  H.table(["arm", "CTR", "conversion", "revenue per user"], lift_rows),
                  H.img(_lift_plot(treated, report["control"]), "relative lift of each arm over control with 95% intervals")]
    srm = report.get("sample_ratio")
    if srm:
        srm_rows = [[k, f"{srm['observed'][k]:,}", f"{srm['expected'][k]:,.0f}"] for k in srm["observed"]]
        p_txt = "-" if srm["p_value"] is None else f"{srm['p_value']:.3g}"
        parts += ["<h2>Sample-ratio check</h2>",
                  f"<p>{'<b>Mismatch</b>' if srm['mismatch'] else 'No mismatch'}: chi-square p = {H.esc(p_txt)} "
                  f"(flagged below {SRM_ALPHA:g}).</p>",
                  H.table(["arm", "users observed", "users expected from the shares"], srm_rows, numeric=[1, 2])]
    parts.append("<h2>Methods</h2><ul>" + "".join(
        f"<li><b>{H.esc(k.replace('_', ' '))}</b>: {H.esc(v)}</li>" for k, v in report["methods"].items()) + "</ul>")
    html_path = d / f"{name}.html"
    html_path.write_text(H.page(f"Experiment {name}", "\n".join(parts)))
    return html_path, json_path


def _arms_plot(report: dict[str, Any], cur: str) -> bytes:
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    titles = {"ctr": "Click-through rate", "conversion": "Conversion rate", "revenue_per_user": f"Revenue per user ({cur})"}
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.9 + 0.5 * len(arms) + 0.6))
    for ax, m in zip(axes, METRICS):
        scale = 1.0 if m == "revenue_per_user" else 100.0
        for y, arm in enumerate(arms):
            r = report["arms"][arm][m]
            if r["value"] is None:
                continue
            lo, hi = (r["ci"][0] if r["ci"][0] is not None else r["value"]), (r["ci"][1] if r["ci"][1] is not None else r["value"])
            ax.errorbar([r["value"] * scale], [y], xerr=[[(r["value"] - lo) * scale], [(hi - r["value"]) * scale]],
                        fmt="o", capsize=4, color="#4C72B0" if arm == report["control"] else "#DD8452")
            ax.annotate(f"{r['value'] * scale:,.2f}{'%' if scale == 100 else ''}", (r["value"] * scale, y),
                        textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.set_yticks(range(len(arms)), arms)
        ax.set_ylim(-0.6, len(arms) - 0.4)
        ax.set_title(titles[m])
        ax.set_xlabel("%" if scale == 100 else cur)
        ax.margins(x=0.2)
    fig.tight_layout()
    return H.png(fig)


def _lift_plot(treated: list[tuple[str, dict[str, Any]]], control: str) -> bytes:
    import matplotlib.pyplot as plt

    titles = {"ctr": "Click-through rate", "conversion": "Conversion rate", "revenue_per_user": "Revenue per user"}
    fig, axes = plt.subplots(1, 3, figsize=(11, 1.3 + 0.5 * len(treated) + 0.4))
    for ax, m in zip(axes, METRICS):
        for y, (arm, a) in enumerate(treated):
            r = a["lift"][m]["relative"]
            if r["value"] is None or None in r["ci"]:
                continue
            colour = "#3a7d44" if r.get("excludes_zero") and r["value"] > 0 else (
                "#c0392b" if r.get("excludes_zero") else "#7f7f7f")
            ax.errorbar([r["value"] * 100], [y], xerr=[[(r["value"] - r["ci"][0]) * 100], [(r["ci"][1] - r["value"]) * 100]],
                        fmt="o", capsize=4, color=colour)
            ax.annotate(f"{r['value'] * 100:+.1f}%", (r["value"] * 100, y), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(treated)), [arm for arm, _ in treated])
        ax.set_ylim(-0.6, len(treated) - 0.4)
        ax.set_title(titles[m])
        ax.set_xlabel(f"change vs {control} (%)")
        ax.margins(x=0.2)
    fig.tight_layout()
    return H.png(fig)


# ----------------------------------------------------------------------------------------------
