"""Predicted customer value: revenue per customer over the next ``horizon_days``.

Two families were measured on the simulated shop's time split (``bench/campaigns.py``; figures
in the README's Benchmarks table), each against the naive forecast "next period = last period":

* **Buy-till-you-die** — BG/NBD for the number of repeat orders (Fader, Hardie & Lee 2005,
  *Marketing Science* 24(2)) times Gamma-Gamma for the spend per order (Fader, Hardie & Lee 2005,
  *JMR* 42(4); Colombo & Jiang 1999), fitted by MAP with ``pymc-marketing`` (the maintained
  library; ``lifetimes`` has had no release since 2020 and ``btyd`` is a 2022 beta). It reads
  only (frequency, recency, age, mean spend) and assumes stationary purchase rates and a single
  "death" per customer.
* **A learnt regressor** — scikit-learn's ``HistGradientBoostingRegressor`` with a Poisson loss
  (revenue is non-negative, mostly zero, heavy-tailed: the log link fits that shape) over the
  same profile columns the churn model reads (``model_inputs.feature_frame``), trained on earlier
  windows of the same log.

The regressor is the one Towerline uses. On the simulated shop (20,000 users, 30-day horizon,
9,748 customers) it ranks customers better and errs less: Spearman 0.411 vs 0.293 for BG/NBD +
Gamma-Gamma and 0.274 for last period, MAE 44.2 vs 50.2 and 63.8. It also uses signals BTYD cannot
(days since the last *visit*, not only the last order; lifecycle segment; age band; the user
tower's vectors when a bundle is given), it needs only scikit-learn (``pymc-marketing`` pulls
PyMC, PyTensor, ArviZ and numba, and compiles its graph on first use), and it fits in seconds.
``predict_btyd`` stays as the measured reference (``pip install -e '.[btyd]'``).

Population and time split as in ``towerline.marketing.churn``: customers with at least one order
by the snapshot, features at ``t - h, t - 2h, ...`` with the revenue of the ``h`` days after each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingRegressor

from towerline.config import ProfileConfig
from towerline.errors import ConfigError, DataValidationError
from towerline.features.contracts import Dataset
from towerline.marketing.model_inputs import (
    DAY,
    PURCHASE,
    bundle_user_vectors,
    customer_snapshot,
    training_snapshots,
    window_outcomes,
)

log = logging.getLogger(__name__)

LTV_COLUMN = "predicted_ltv"


@dataclass(frozen=True)
class LtvConfig:
    """The forecast horizon and the regressor's settings."""

    horizon_days: float = 30.0    # value = revenue in this many days after the snapshot
    min_orders: int = 1           # customers only
    train_snapshots: int = 2      # training windows ending at t, t-h, ...
    max_iter: int = 200
    learning_rate: float = 0.05
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 20
    l2_regularization: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.horizon_days <= 0:
            raise ConfigError(f"ltv.horizon_days must be > 0, got {self.horizon_days}")
        if self.train_snapshots < 1:
            raise ConfigError(f"ltv.train_snapshots must be >= 1, got {self.train_snapshots}")


@dataclass
class LtvModel:
    """A fitted value regressor."""

    cfg: LtvConfig
    regressor: HistGradientBoostingRegressor
    feature_names: list[str]
    trained_at: int  # no event after this time was used

    def predict(self, features: pd.DataFrame) -> pd.Series:
        """(N,) expected revenue in the next ``horizon_days`` per row of ``features``, same index."""
        missing = [c for c in self.feature_names if c not in features.columns]
        if missing:
            raise DataValidationError(
                f"ltv model: features {missing[:3]} are missing (of {len(missing)}); a model trained with a "
                "bundle's user vectors needs the same bundle when it scores"
            )
        x = features[self.feature_names].to_numpy(dtype=np.float64)
        return pd.Series(self.regressor.predict(x), index=features.index, name=LTV_COLUMN)


def ltv_examples(
    dataset: Dataset, at: int, cfg: LtvConfig, vectors: tuple[np.ndarray, np.ndarray] | None = None,
    profile_cfg: ProfileConfig | None = None,
) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Customers at ``at``: (features, revenue in ``(at, at + h]``, revenue in ``(at - h, at]``)."""
    X, _ = customer_snapshot(dataset, at, cfg.min_orders, vectors, profile_cfg)
    nxt = window_outcomes(dataset, at, cfg.horizon_days, X.index)["revenue"]
    last = window_outcomes(dataset, at - int(cfg.horizon_days * DAY), cfg.horizon_days, X.index)["revenue"]
    return X, nxt.rename("revenue"), last.rename("last_period")


def train_ltv(
    dataset: Dataset, at: int | None = None, cfg: LtvConfig | None = None, bundle: Any = None,
    profile_cfg: ProfileConfig | None = None, *, vectors: tuple[np.ndarray, np.ndarray] | None = None,
) -> LtvModel:
    """Fit the value regressor on windows that end by ``at`` (default: the newest event)."""
    cfg = cfg or LtvConfig()
    at = int(dataset.events["timestamp"].max()) if at is None else int(at)
    if vectors is None and bundle is not None:
        vectors = bundle_user_vectors(bundle)
    snapshots = training_snapshots(dataset, at, cfg.horizon_days, cfg.train_snapshots, "ltv")
    parts = [ltv_examples(dataset, t, cfg, vectors, profile_cfg)[:2] for t in snapshots]
    X = pd.concat([p[0] for p in parts])
    y = pd.concat([p[1] for p in parts]).to_numpy(dtype=np.float64)
    if len(X) == 0 or not (y > 0).any():
        raise DataValidationError(f"ltv: {len(X)} training customers and none bought in a {cfg.horizon_days:g}-day window")
    reg = HistGradientBoostingRegressor(
        loss="poisson", max_iter=cfg.max_iter, learning_rate=cfg.learning_rate, max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf, l2_regularization=cfg.l2_regularization, random_state=cfg.seed,
        early_stopping=False,
    ).fit(X.to_numpy(dtype=np.float64), y)
    log.info("ltv: trained on %d customer windows (mean revenue %.2f), %d features", len(X), y.mean(), X.shape[1])
    return LtvModel(cfg, reg, list(X.columns), at)


def add_predicted_ltv(
    profiles: pd.DataFrame, model: LtvModel, dataset: Dataset, bundle: Any = None, at: int | None = None,
    profile_cfg: ProfileConfig | None = None,
) -> pd.DataFrame:
    """``profiles`` with a ``predicted_ltv`` column for every customer (NaN for non-customers)."""
    at = model.trained_at if at is None else int(at)
    vectors = bundle_user_vectors(bundle) if bundle is not None else None
    X, _, _ = ltv_examples(dataset, at, model.cfg, vectors, profile_cfg)
    out = profiles.copy()
    out[LTV_COLUMN] = model.predict(X).reindex(out["user_id"].astype(str)).to_numpy(dtype=np.float64)
    return out


# ----------------------------------------------------------------------------------------------
# the buy-till-you-die reference


def btyd_summary(dataset: Dataset, at: int, user_ids: Any) -> pd.DataFrame:
    """BG/NBD inputs per customer at ``at``, in days, purchases folded to one per day (the convention
    of Fader et al. 2005): ``frequency`` (repeat purchase days), ``recency`` (first to last purchase
    day), ``T`` (first purchase to ``at``), ``monetary_value`` (mean value of the repeat days, 0
    without repeats)."""
    ev = dataset.events
    ts = ev["timestamp"].to_numpy(dtype=np.int64)
    keep = (ts <= int(at)) & (ev["event_type"] == PURCHASE).to_numpy(dtype=bool)
    buys = pd.DataFrame({"customer_id": ev["user_id"].astype(str).to_numpy()[keep], "day": ts[keep] // DAY,
                         "value": np.nan_to_num(ev["value"].to_numpy(dtype=np.float64)[keep])})
    days = buys.groupby(["customer_id", "day"], as_index=False)["value"].sum()
    g = days.groupby("customer_id")
    first, last, n = g["day"].min(), g["day"].max(), g.size()
    total, first_value = g["value"].sum(), days.sort_values("day").groupby("customer_id")["value"].first()
    ids = pd.Index(np.asarray(user_ids, dtype=object).astype(str))
    out = pd.DataFrame({
        "customer_id": ids,
        "frequency": (n - 1).reindex(ids).to_numpy(dtype=np.float64),
        "recency": (last - first).reindex(ids).to_numpy(dtype=np.float64),
        "T": (at / DAY - first).reindex(ids).to_numpy(dtype=np.float64),
    })
    repeat_value = ((total - first_value) / (n - 1).where(n > 1)).reindex(ids).to_numpy(dtype=np.float64)
    out["monetary_value"] = np.nan_to_num(repeat_value, nan=0.0)
    if out[["frequency", "recency", "T"]].isna().any().any():
        raise DataValidationError("btyd: every customer needs a purchase at or before the snapshot")
    return out


def predict_btyd(dataset: Dataset, at: int, user_ids: Any, horizon_days: float, seed: int = 0) -> pd.Series:
    """BG/NBD x Gamma-Gamma expected revenue in ``(at, at + horizon]`` per customer (MAP fit).

    Needs ``pymc-marketing`` (the ``btyd`` extra); imported here so that the rest of Towerline
    does not pull in PyMC.
    """
    try:
        from pymc_marketing.clv import BetaGeoModel, GammaGammaModel  # optional: the btyd extra
    except ImportError:
        raise ConfigError("the BG/NBD reference needs pymc-marketing: pip install -e '.[btyd]'") from None

    data = btyd_summary(dataset, at, user_ids)
    bg = BetaGeoModel(data=data[["customer_id", "frequency", "recency", "T"]])
    bg.fit(method="map", progressbar=False)
    purchases = bg.expected_purchases(future_t=horizon_days).mean(("chain", "draw")).to_numpy()
    repeat = data[data["frequency"] > 0]
    gg = GammaGammaModel(data=repeat[["customer_id", "monetary_value", "frequency"]])
    gg.fit(method="map", progressbar=False)
    spend = gg.expected_customer_spend(data=data[["customer_id", "monetary_value", "frequency"]])
    spend = spend.mean(("chain", "draw")).to_numpy()
    return pd.Series(np.asarray(purchases) * np.asarray(spend), index=data["customer_id"].to_numpy(), name="btyd")


# ----------------------------------------------------------------------------------------------
# back-test


def value_errors(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Spearman rank correlation and mean absolute error of a value forecast."""
    a, p = np.asarray(actual, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    rho = spearmanr(a, p).statistic if np.ptp(p) > 0 and np.ptp(a) > 0 else 0.0
    return {"spearman": float(rho), "mae": float(np.mean(np.abs(a - p)))}


def evaluate_ltv(
    dataset: Dataset, cfg: LtvConfig | None = None, bundle: Any = None, *, btyd: bool = False
) -> dict[str, Any]:
    """Back-test on the last horizon of the log: fit by ``T - h``, forecast ``(T - h, T]``.

    Returns ``{"customers", "mean_revenue", "model": {spearman, mae}, "last_period": {...},
    "btyd": {...} (when ``btyd``)}``.
    """
    cfg = cfg or LtvConfig()
    T = int(dataset.events["timestamp"].max())
    at = T - int(cfg.horizon_days * DAY)
    vectors = bundle_user_vectors(bundle) if bundle is not None else None
    model = train_ltv(dataset, at, cfg, vectors=vectors)
    X, actual, last = ltv_examples(dataset, at, cfg, vectors)
    out: dict[str, Any] = {
        "customers": int(len(X)), "mean_revenue": float(actual.mean()), "horizon_days": cfg.horizon_days,
        "model": value_errors(actual, model.predict(X)),
        "last_period": value_errors(actual, last),
    }
    if btyd:
        out["btyd"] = value_errors(actual, predict_btyd(dataset, at, X.index, cfg.horizon_days, cfg.seed).reindex(X.index))
    log.info("ltv back-test: %s", out)
    return out
