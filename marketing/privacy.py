"""Differentially private releases of marketing aggregates, with a ledger that enforces a total budget.

Segment sizes and campaign results by segment are shared outside the team that holds the events
(agencies, partners, a dashboard). Even aggregates leak: two releases that differ by one user's
membership reveal that user. A release made through this module is ``epsilon``-differentially
private with respect to adding or removing one user (Dwork, McSherry, Nissim & Smith, "Calibrating
noise to sensitivity in private data analysis", TCC 2006):

* every user contributes to exactly one cell of a released table (one segment, one arm), so a
  vector of counts has L1 sensitivity 1 and a vector of sums of values clipped to ``[0, cap]``
  has sensitivity ``cap``;
* the noise is the Laplace mechanism from OpenDP (``opendp.measurements.make_laplace``; discrete
  Laplace on integer counts, which the library samples exactly, without the floating-point
  weakness of textbook Laplace samplers, Mironov CCS 2012), with ``scale = sensitivity / epsilon``;
  OpenDP's own privacy map checks that the measurement costs what the ledger charges;
* a release of several tables splits its ``epsilon`` evenly over them (basic sequential composition:
  the costs add up).

The **ledger** is a JSON file (one per data set) holding the total budget and every release with its
epsilon and time. A release that would take the spent total past the budget raises
``PrivacyBudgetError`` naming the budget, what is spent and what was asked, and nothing is released.
The budget of an existing ledger cannot be changed by passing a different one (that would be
a way around it); start a new ledger for a new data set.

No release carries raw events or user ids: the functions take per-user tables and return only
noisy per-cell aggregates.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from towerline.errors import ConfigError
from towerline.features.user_features import RFM_GROUP_DESCRIPTIONS, SEGMENTS, UNKNOWN

log = logging.getLogger(__name__)

EPS_TOLERANCE = 1e-9  # floating-point slack when comparing spent epsilon with the budget


class PrivacyBudgetError(ConfigError):
    """A release would spend more epsilon than the ledger's budget allows."""


@dataclass(frozen=True)
class Release:
    name: str
    epsilon: float
    at: str
    tables: tuple[str, ...]


class PrivacyLedger:
    """Epsilon spent per release in one JSON file; refuses releases past the total budget.

    Example::

        ledger = PrivacyLedger("privacy_ledger.json", budget=1.0)
        sizes = release_segment_sizes(profiles, epsilon=0.1, ledger=ledger)
    """

    def __init__(self, path: str | Path, budget: float | None = None) -> None:
        self.path = Path(path)
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            self.budget = float(data["budget"])
            if budget is not None and not math.isclose(budget, self.budget):
                raise ConfigError(f"privacy ledger {self.path} has budget epsilon = {self.budget:g}; refusing to "
                                  f"change it to {budget:g} (start a new ledger for a new data set)")
            self.releases = [Release(r["name"], float(r["epsilon"]), r["at"], tuple(r.get("tables", ())))
                             for r in data.get("releases", [])]
        else:
            if budget is None:
                raise ConfigError(f"privacy ledger {self.path} does not exist; give its total budget (epsilon) to create it")
            if not (budget > 0 and math.isfinite(budget)):
                raise ConfigError(f"privacy budget must be a positive finite epsilon, got {budget}")
            self.budget = float(budget)
            self.releases = []
            self._save()

    @property
    def spent(self) -> float:
        return float(sum(r.epsilon for r in self.releases))

    @property
    def remaining(self) -> float:
        return max(self.budget - self.spent, 0.0)

    def charge(self, name: str, epsilon: float, tables: Sequence[str] = ()) -> None:
        """Record a release of ``epsilon``; ``PrivacyBudgetError`` (nothing recorded) when past the budget."""
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise ConfigError(f"release '{name}': epsilon must be positive and finite, got {epsilon}")
        if self.spent + epsilon > self.budget + EPS_TOLERANCE:
            raise PrivacyBudgetError(
                f"release '{name}' needs epsilon = {epsilon:g} but the privacy budget of {self.path} is "
                f"epsilon = {self.budget:g}, of which {self.spent:g} is spent ({self.remaining:g} left); "
                "release less, or with a smaller epsilon")
        self.releases.append(Release(name, float(epsilon), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                     tuple(tables)))
        self._save()
        log.info("privacy: released '%s' at epsilon %g (%g of %g spent)", name, epsilon, self.spent, self.budget)

    def _save(self) -> None:
        data = {"budget": self.budget, "spent": self.spent,
                "releases": [{"name": r.name, "epsilon": r.epsilon, "at": r.at, "tables": list(r.tables)}
                             for r in self.releases]}
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written ledger


# mechanisms


def laplace_counts(counts: np.ndarray, epsilon: float) -> np.ndarray:
    """(K,) integer counts, one user in at most one cell -> (K,) discrete-Laplace-noised counts (L1 sensitivity 1)."""
    dp = _opendp()
    meas = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int), scale=1.0 / epsilon)
    assert meas.map(1) <= epsilon + EPS_TOLERANCE  # OpenDP's own accounting agrees with the ledger's charge
    return np.asarray(meas([int(c) for c in np.asarray(counts)]), dtype=np.int64)


def laplace_sums(sums: np.ndarray, epsilon: float, cap: float) -> np.ndarray:
    """(K,) sums of per-user values clipped to ``[0, cap]`` -> Laplace-noised sums (L1 sensitivity ``cap``)."""
    dp = _opendp()
    meas = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float),
                             scale=float(cap) / epsilon)
    assert meas.map(float(cap)) <= epsilon * (1 + 1e-6)
    return np.asarray(meas([float(s) for s in np.asarray(sums, np.float64)]), dtype=np.float64)


def _opendp() -> Any:
    try:
        import opendp.prelude as dp
    except ImportError:
        raise ConfigError("differentially private releases need OpenDP: pip install 'towerline[campaigns]'") from None
    dp.enable_features("contrib")  # the Laplace measurement is in OpenDP's contrib set (vetted, not yet proven)
    return dp


# releases


def release_segment_sizes(
    profiles: pd.DataFrame, epsilon: float, ledger: PrivacyLedger, column: str = "segment",
    name: str | None = None, categories: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Noisy user counts per value of ``column`` (consenting users only): ``column, users``.

    The cells come from the public segment definitions (``categories``; by default the lifecycle
    segments or RFM groups), so every defined value is released, empty ones included: which
    segments are non-empty is not itself leaked. Counts are clamped at 0 after the noise
    (post-processing keeps the guarantee).
    """
    p = profiles[profiles["consent"].astype(bool)] if "consent" in profiles else profiles
    known = {"segment": (*SEGMENTS, UNKNOWN), "rfm_group": (*RFM_GROUP_DESCRIPTIONS, UNKNOWN)}
    cells = list(categories) if categories is not None else list(known.get(column, ()))
    observed = p[column].astype(str).value_counts()
    if not cells:
        log.warning("release of '%s': no public list of its values; the observed values are released as cells", column)
        cells = sorted(observed.index)
    outside = sorted(set(observed.index) - set(cells))
    if outside:
        raise ConfigError(f"release of '{column}': values {outside} are not among the released categories {cells}")
    counts = observed.reindex(cells, fill_value=0)
    name = name or f"{column} sizes"
    ledger.charge(name, epsilon, [f"users per {column}"])
    noisy = np.maximum(laplace_counts(counts.to_numpy(), epsilon), 0)
    return pd.DataFrame({column: counts.index.to_numpy(), "users": noisy})


def release_results_by_segment(
    outcomes: pd.DataFrame, epsilon: float, ledger: PrivacyLedger, revenue_cap: float,
    by: Sequence[str] = ("segment", "holdout"), name: str = "campaign results by segment",
    categories: dict[str, Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """Noisy users, conversions and revenue per cell of ``by`` (e.g. segment x holdout).

    Args:
        outcomes: one row per user: the ``by`` columns, ``converted`` (bool), ``revenue`` (float).
        revenue_cap: each user's revenue is clipped to ``[0, revenue_cap]`` before summing; the cap is
            the sum's sensitivity, so a high cap means more noise, a low one biases big spenders down.
        categories: the public values of each ``by`` column; every combination is released, empty
            ones included, so which cells are empty is not leaked (default: the observed cells).
    Returns:
        ``by..., users, conversions, revenue, conversion_rate``: epsilon split evenly over the three
        tables (users, conversions, revenue); the rate is computed from the noisy counts
        (post-processing).
    """
    if outcomes["user_id"].duplicated().any() if "user_id" in outcomes else False:
        raise ConfigError(f"{name}: a user appears in more than one row; each user must count in exactly one cell")
    if revenue_cap <= 0:
        raise ConfigError(f"{name}: revenue_cap must be > 0, got {revenue_cap}")
    cols = list(by)
    grouped = outcomes.assign(_clipped=outcomes["revenue"].clip(0, revenue_cap), _conv=outcomes["converted"].astype(int))
    agg = grouped.groupby(cols).agg(users=("_conv", "size"), conversions=("_conv", "sum"), revenue=("_clipped", "sum"))
    if categories:
        grid = (pd.MultiIndex.from_product([list(categories[c]) for c in cols], names=cols) if len(cols) > 1
                else pd.Index(list(categories[cols[0]]), name=cols[0]))
        outside = agg.index.difference(grid)
        if len(outside):
            raise ConfigError(f"{name}: cells {list(outside)[:5]} are not among the released categories")
        agg = agg.reindex(grid, fill_value=0)
    tables = ["users", "conversions", "revenue"]
    ledger.charge(name, epsilon, [f"{t} per {' x '.join(cols)}" for t in tables])
    each = epsilon / len(tables)
    out = agg.reset_index()[cols].copy()
    out["users"] = np.maximum(laplace_counts(agg["users"].to_numpy(), each), 0)
    out["conversions"] = np.clip(laplace_counts(agg["conversions"].to_numpy(), each), 0, out["users"].to_numpy())
    out["revenue"] = np.maximum(laplace_sums(agg["revenue"].to_numpy(), each, revenue_cap), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["conversion_rate"] = np.where(out["users"] > 0, out["conversions"] / out["users"], np.nan)
    return out
