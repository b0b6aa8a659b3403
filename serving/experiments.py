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
import hashlib
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from towerline.config import ExperimentConfig
from towerline.errors import ConfigError, DataValidationError
from towerline.serving.sqlite import open_sqlite

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # two-sided 95% normal quantile
FEEDBACK_KINDS = ("impression", "click", "purchase")


# ----------------------------------------------------------------------------------------------
# assignment


def assignment_unit(experiment_name: str, user_id: str) -> float:
    """sha256 of (experiment, user) -> a number in [0, 1), uniform over users."""
    digest = hashlib.sha256(f"{experiment_name}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(experiment: ExperimentConfig, user_id: str) -> str:
    """The arm ``user_id`` gets in ``experiment``: same user and experiment -> same arm, always."""
    return assign_arms(experiment, [user_id])[0]


def assign_arms(experiment: ExperimentConfig, user_ids: Sequence[str]) -> list[str]:
    """``assign_arm`` for many users at once."""
    units = np.fromiter((assignment_unit(experiment.name, str(u)) for u in user_ids), np.float64, len(user_ids))
    edges = np.cumsum([a.share for a in experiment.arms])
    edges[-1] = 1.0  # shares sum to 1 up to rounding; make the last interval reach 1
    pick = np.minimum(np.searchsorted(edges, units, side="right"), len(edges) - 1)
    names = [a.name for a in experiment.arms]
    return [names[i] for i in pick]


def find_experiment(experiments: Sequence[ExperimentConfig], name: str) -> ExperimentConfig:
    """The experiment called ``name``; ``ConfigError`` listing the known ones otherwise."""
    for e in experiments:
        if e.name == name:
            return e
    known = ", ".join(e.name for e in experiments) or "none (add an 'experiments:' list to the config)"
    raise ConfigError(f"no experiment named '{name}' in the config; known experiments: {known}")


# ----------------------------------------------------------------------------------------------
# feedback


class Feedback(BaseModel):
    """One impression, click or purchase, as ``POST /feedback`` receives it."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(min_length=1, max_length=128)
    arm: str | None = Field(default=None, max_length=128, description="the arm that served it; derived from the user when absent")
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str | None = Field(default=None, max_length=256)
    kind: Literal["impression", "click", "purchase"]
    value: float | None = Field(default=None, ge=0, description="money, for purchases")
    timestamp: int | None = Field(default=None, ge=0, description="epoch seconds; the server's clock when absent")
    event_id: str | None = Field(default=None, max_length=256, description="deduplication key")


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int = 0
    duplicate: int = 0
    rejected: list[str] = field(default_factory=list)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    event_id   TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    arm        TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    item_id    TEXT,
    kind       TEXT NOT NULL CHECK (kind IN ('impression', 'click', 'purchase')),
    value      REAL,
    timestamp  INTEGER NOT NULL,
    received   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_experiment ON feedback(experiment, arm, user_id);
"""


class FeedbackStore:
    """Impressions, clicks and purchases per experiment arm in one SQLite file (WAL mode).

    Example::

        store = FeedbackStore("feedback.db")
        store.record([Feedback(experiment="home", arm="treatment", user_id="u1", kind="click")])
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._conn, self._lock = open_sqlite(self.path, _SCHEMA, busy_timeout_s)

    def record(self, events: Sequence[Feedback]) -> FeedbackResult:
        """Store events that carry an ``arm``; a repeated ``event_id`` is a duplicate, not an error.

        The same ``event_id`` with different content is rejected (two clients disagree). Events
        without ``arm`` are rejected: use ``record_feedback`` to derive it from the config.
        """
        now = int(time.time())
        rows, rejected = [], []
        for e in events:
            if e.arm is None:
                rejected.append(f"feedback for user {e.user_id!r}: no arm; send the arm /recommend returned")
                continue
            ts = e.timestamp if e.timestamp is not None else now
            eid = e.event_id or "sha256:" + _digest(e.experiment, e.arm, e.user_id, e.item_id, e.kind, e.value, ts)
            rows.append((eid, e.experiment, e.arm, e.user_id, e.item_id, e.kind, e.value, ts, now))
        accepted, duplicate, conflicts = self._insert(rows)
        return FeedbackResult(accepted=accepted, duplicate=duplicate, rejected=rejected + conflicts)

    def _insert(self, rows: list[tuple[Any, ...]]) -> tuple[int, int, list[str]]:
        accepted = duplicate = 0
        conflicts: list[str] = []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = self._conn.execute(
                        "INSERT OR IGNORE INTO feedback (event_id, experiment, arm, user_id, item_id, kind, value, "
                        "timestamp, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row,
                    )
                    if cur.rowcount == 1:
                        accepted += 1
                        continue
                    stored = self._conn.execute(
                        "SELECT experiment, arm, user_id, item_id, kind, value FROM feedback WHERE event_id = ?", (row[0],)
                    ).fetchone()
                    if tuple(stored) == tuple(row[1:7]):
                        duplicate += 1
                    else:
                        conflicts.append(f"event_id {row[0]!r} was already used for different feedback; give each event its own id")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return accepted, duplicate, conflicts

    def _insert_many(self, rows: list[tuple[Any, ...]]) -> int:
        """Bulk ``INSERT OR IGNORE`` (no conflict check): for trusted writers such as ``simulate``."""
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO feedback (event_id, experiment, arm, user_id, item_id, kind, value, "
                    "timestamp, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    def per_user(self, experiment: str) -> pd.DataFrame:
        """One row per (user, arm) of ``experiment``: impressions, clicks, purchases, revenue."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT user_id, arm, SUM(kind = 'impression'), SUM(kind = 'click'), SUM(kind = 'purchase'), "
                "COALESCE(SUM(CASE WHEN kind = 'purchase' THEN value END), 0.0) "
                "FROM feedback WHERE experiment = ? GROUP BY user_id, arm",
                (experiment,),
            ).fetchall()
        frame = pd.DataFrame(rows, columns=["user_id", "arm", "impressions", "clicks", "purchases", "revenue"])
        return frame.astype({"impressions": np.int64, "clicks": np.int64, "purchases": np.int64, "revenue": np.float64})

    def count(self, experiment: str | None = None) -> int:
        with self._lock:
            if experiment is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])
            return int(self._conn.execute("SELECT COUNT(*) FROM feedback WHERE experiment = ?", (experiment,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def record_feedback(store: FeedbackStore, events: Sequence[Feedback], experiments: Sequence[ExperimentConfig]) -> FeedbackResult:
    """``POST /feedback`` in one call: check experiment and arm names, derive missing arms, store.

    An event naming an unknown experiment or an arm that experiment lacks is rejected with a
    reason; the others are stored.
    """
    by_name = {e.name: e for e in experiments}
    ok: list[Feedback] = []
    rejected: list[str] = []
    for i, e in enumerate(events):
        exp = by_name.get(e.experiment)
        if exp is None:
            rejected.append(f"feedback[{i}]: unknown experiment {e.experiment!r}; known: {', '.join(by_name) or 'none'}")
            continue
        arms = [a.name for a in exp.arms]
        if e.arm is None:
            e = e.model_copy(update={"arm": assign_arm(exp, e.user_id)})
        elif e.arm not in arms:
            rejected.append(f"feedback[{i}]: experiment {e.experiment!r} has no arm {e.arm!r}; arms: {', '.join(arms)}")
            continue
        ok.append(e)
    result = store.record(ok)
    return FeedbackResult(result.accepted, result.duplicate, rejected + result.rejected)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson, JASA 1927)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def ratio_interval(numer: np.ndarray, denom: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(ratio of sums, lo, hi): delta-method interval of ``sum(numer)/sum(denom)`` over units.

    Var(R) ~ (s_x^2 - 2 R s_xy + R^2 s_y^2) / (n mean_y^2) for per-unit x = numer, y = denom
    (Deng, Knoblich & Lu, KDD 2018).
    """
    x, y = np.asarray(numer, np.float64), np.asarray(denom, np.float64)
    n = len(x)
    if n == 0 or y.sum() == 0:
        return (float("nan"), float("nan"), float("nan"))
    r = x.sum() / y.sum()
    if n < 2:
        return (float(r), float("nan"), float("nan"))
    cov = np.cov(np.vstack([x, y]), ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * y.mean() ** 2)
    half = z * np.sqrt(max(var, 0.0))
    return (float(r), float(r - half), float(r + half))


def mean_interval(values: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(mean, lo, hi) by the normal approximation, mean +- z s / sqrt(n)."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"), float("nan"))
    m = float(v.mean())
    if len(v) < 2:
        return (m, float("nan"), float("nan"))
    half = z * float(v.std(ddof=1)) / np.sqrt(len(v))
    return (m, m - half, m + half)


def _bootstrap_metrics(frame: pd.DataFrame, n_boot: int, rng: np.random.Generator, chunk: int = 100) -> np.ndarray:
    """(n_boot, 3) replicates of (ctr, conversion, revenue per user) under a Poisson bootstrap."""
    x = np.column_stack([
        frame["impressions"].to_numpy(np.float64), frame["clicks"].to_numpy(np.float64),
        (frame["purchases"].to_numpy() > 0).astype(np.float64), frame["revenue"].to_numpy(np.float64),
        np.ones(len(frame)),
    ])  # (n, 5)
    out = np.empty((n_boot, 3))
    for lo in range(0, n_boot, chunk):
        b = min(chunk, n_boot - lo)
        w = rng.poisson(1.0, size=(b, len(frame))).astype(np.float64)  # (b, n)
        s = w @ x  # (b, 5) weighted sums
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + b] = np.column_stack([s[:, 1] / s[:, 0], s[:, 2] / s[:, 4], s[:, 3] / s[:, 4]])
    return out


# ----------------------------------------------------------------------------------------------
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
            boots[arm.name] = _bootstrap_metrics(f, n_boot, rng)
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
# simulation


def simulate(
    store: FeedbackStore,
    experiment: ExperimentConfig,
    n_users: int,
    true_rates: dict[str, tuple[float, float, float]],
    seed: int = 0,
    impressions_per_user: float = 5.0,
    start_ts: int = 1_735_689_600,  # 2025-01-01 UTC
) -> int:
    """Replay synthetic users' responses with known rates into ``store``; returns events written.

    Each user ``sim<seed>-<i>`` is assigned by ``assign_arm`` (the real hash), sees
    ``1 + Poisson(impressions_per_user - 1)`` impressions, clicks each with probability ``ctr``,
    and purchases with probability ``conversion`` (one order, value ~ Gamma(2, mean/2), so its
    mean is ``mean_value``). True revenue per user is ``conversion * mean_value``. Event ids are
    deterministic, so running the same simulation twice adds nothing.

    Args:
        true_rates: ``{arm: (ctr, conversion, mean_value)}`` for every arm of the experiment.
    """
    names = [a.name for a in experiment.arms]
    missing = [n for n in names if n not in true_rates]
    if missing:
        raise ConfigError(f"simulate: no true rates for arm(s) {missing} of experiment '{experiment.name}'")
    for arm, (ctr, conv, value) in true_rates.items():
        if not (0 <= ctr <= 1 and 0 <= conv <= 1 and value >= 0):
            raise ConfigError(f"simulate: arm '{arm}' rates must be ctr, conversion in [0, 1] and mean value >= 0")
    rng = np.random.default_rng(seed)
    user_ids = [f"sim{seed}-{i:07d}" for i in range(n_users)]
    arm_of = np.array(assign_arms(experiment, user_ids), dtype=object)
    rates = np.array([true_rates[a] for a in arm_of], dtype=np.float64).reshape(n_users, 3)  # (U, 3)
    n_imp = 1 + rng.poisson(max(impressions_per_user - 1, 0), n_users)  # (U,)
    imp_user = np.repeat(np.arange(n_users), n_imp)  # (I,)
    clicked = rng.random(len(imp_user)) < rates[imp_user, 0]
    bought = rng.random(n_users) < rates[:, 1]
    value = rng.gamma(2.0, np.maximum(rates[:, 2], 1e-12) / 2.0)
    item = rng.integers(0, 50, len(imp_user))
    ts = start_ts + rng.integers(0, 14 * 86_400, len(imp_user))
    now = int(time.time())
    prefix = f"sim{seed}:{experiment.name}"
    rows: list[tuple[Any, ...]] = []
    for k, (u, it, t) in enumerate(zip(imp_user.tolist(), item.tolist(), ts.tolist())):
        base = (experiment.name, arm_of[u], user_ids[u], f"sim-item-{it:02d}")
        rows.append((f"{prefix}:imp:{k}", *base, "impression", None, t, now))
        if clicked[k]:
            rows.append((f"{prefix}:click:{k}", *base, "click", None, t + 5, now))
    first_imp = np.concatenate([[0], np.cumsum(n_imp)[:-1]])
    for u in np.flatnonzero(bought).tolist():
        k = int(first_imp[u])
        rows.append((f"{prefix}:buy:{u}", experiment.name, arm_of[u], user_ids[u], f"sim-item-{item[k]:02d}",
                     "purchase", float(round(value[u], 2)), int(ts[k]) + 60, now))
    accepted = store._insert_many(rows)
    log.info("simulate %s: %d users, %d events written (%d already there)", experiment.name, n_users, accepted,
             len(rows) - accepted)
    return accepted
