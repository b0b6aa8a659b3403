"""What the campaign models (churn, LTV, uplift) read: a user's profile as of a moment, and what
that user bought in the window after it.

Why one module: the three models are trained and judged on *time splits* — features from the
events up to a cut-off, labels from the window after it — and the only way to keep the future out
of the features is to build every snapshot the same way, here. A snapshot is simply
``build_profiles`` over the events at or before the cut-off with ``reference_time`` set to it, so a
model sees exactly the RFM scores, recency, frequency, monetary value and lifecycle segment that
``towerline profile`` would have shown that day (Hughes 1994 for RFM). Optional extras: the
user's age band (when the users table has one) and the user tower's vectors from a bundle.

User vectors come from ``user_vectors(bundle)``, called in ``bundle_user_vectors`` only (the
function is moving to the training inference module; this is the one place to change). The
bundle's histories end where its training data ended: for a back-test, use a bundle trained on
events up to the snapshot, or the vectors carry the future into the features.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from towerline.config import ProfileConfig
from towerline.errors import DataValidationError
from towerline.features.contracts import Dataset
from towerline.features.synthetic import AGE_BANDS  # ordinal code 0..5
from towerline.features.user_features import LIFECYCLE_SEGMENTS, build_profiles
from towerline.marketing.audience import user_vectors

log = logging.getLogger(__name__)

DAY = 86_400  # seconds
PURCHASE = "purchase"
# The numeric profile columns every model reads; NaN (no order yet: no recency) is kept as NaN,
# which scikit-learn's histogram gradient boosting routes to its own branch.
PROFILE_NUMERIC: tuple[str, ...] = (
    "recency_days", "last_seen_days", "first_seen_days", "frequency", "monetary", "n_events",
    "r_score", "f_score", "m_score",
)


def profiles_at(dataset: Dataset, at: int, cfg: ProfileConfig | None = None) -> pd.DataFrame:
    """Profiles of every user with an event at or before ``at`` (epoch seconds), as seen at ``at``.

    Returns ``build_profiles``'s frame (one row per user, sorted by ``user_id``); the events after
    ``at`` play no part.
    """
    ev = dataset.events
    past = ev[ev["timestamp"].to_numpy(dtype=np.int64) <= int(at)]
    snap = Dataset(name=f"{dataset.name}@{int(at)}", events=past, items=dataset.items, users=dataset.users)
    return build_profiles(snap, cfg or ProfileConfig(), reference_time=int(at), has_clock=True)


def customer_snapshot(
    dataset: Dataset, at: int, min_orders: int, vectors: tuple[np.ndarray, np.ndarray] | None = None,
    profile_cfg: ProfileConfig | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The customers at ``at`` (users with at least ``min_orders`` orders by then) as model rows.

    Returns (``feature_frame`` indexed by user_id, the customers' profiles at ``at``): what the
    churn and LTV models read at every snapshot, training and scoring alike.
    """
    prof = profiles_at(dataset, at, profile_cfg)
    prof = prof[prof["frequency"].to_numpy(dtype=np.float64) >= min_orders].reset_index(drop=True)
    return feature_frame(prof, dataset.users, vectors), prof


def training_snapshots(dataset: Dataset, at: int, horizon_days: float, n: int, what: str) -> list[int]:
    """The ``n`` snapshot times ``at - h, at - 2h, ...`` (``h = horizon_days``) a model trained at
    ``at`` learns from: each one's label window ``(t, t + h]`` ends by ``at``, so no label peeks past it.

    Raises:
        DataValidationError: the earliest snapshot is not after the log's first event.
    """
    h = int(horizon_days * DAY)
    first = int(dataset.events["timestamp"].min())
    if at - n * h <= first:
        raise DataValidationError(
            f"{what}: {n} training snapshot(s) of a {horizon_days:g}-day horizon before {at} start "
            f"before the log's first event ({first}); shorten horizon_days or train_snapshots"
        )
    return [at - k * h for k in range(1, n + 1)]


def window_outcomes(dataset: Dataset, start: int, days: float, user_ids: Any) -> pd.DataFrame:
    """Orders and revenue of each of ``user_ids`` in ``(start, start + days]``.

    An order is one checkout (a user's purchase lines at the same second), as in the profiles.

    Returns:
        DataFrame indexed by ``user_id`` (the given order) with ``orders`` (int) and ``revenue``
        (float, 0 when nothing was bought).
    """
    ev = dataset.events
    ts = ev["timestamp"].to_numpy(dtype=np.int64)
    keep = (ts > int(start)) & (ts <= int(start + days * DAY))
    if "event_type" in ev:
        keep &= (ev["event_type"] == PURCHASE).to_numpy(dtype=bool)
    buys = pd.DataFrame({
        "user_id": ev["user_id"].astype(str).to_numpy()[keep],
        "timestamp": ts[keep],
        "value": np.nan_to_num(ev["value"].to_numpy(dtype=np.float64)[keep]) if "value" in ev else 0.0,
    })
    users = pd.Index(np.asarray(user_ids, dtype=object).astype(str), name="user_id")
    orders = buys.drop_duplicates(["user_id", "timestamp"]).groupby("user_id").size()
    revenue = buys.groupby("user_id")["value"].sum()
    return pd.DataFrame({
        "orders": orders.reindex(users).fillna(0).astype(np.int64).to_numpy(),
        "revenue": revenue.reindex(users).fillna(0.0).to_numpy(dtype=np.float64),
    }, index=users)


def feature_frame(
    profiles: pd.DataFrame,
    users: pd.DataFrame | None = None,
    vectors: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Model inputs, one float row per profile, indexed by ``user_id`` (the profiles' order).

    Columns: ``PROFILE_NUMERIC``, a one-hot lifecycle ``segment=...``, ``age_band`` (ordinal,
    NaN when unknown) when ``users`` has that column, and ``vec_0 .. vec_{D-1}`` when ``vectors``
    (user ids (U,), vectors (U, D)) is given; users without a vector get NaN there.
    """
    idx = pd.Index(profiles["user_id"].astype(str).to_numpy(), name="user_id")
    cols: dict[str, np.ndarray] = {
        c: pd.to_numeric(profiles[c], errors="coerce").to_numpy(dtype=np.float64) for c in PROFILE_NUMERIC
    }
    seg = profiles["segment"].astype(str).to_numpy()
    for name in LIFECYCLE_SEGMENTS:
        cols[f"segment={name}"] = (seg == name).astype(np.float64)
    if users is not None and "age_band" in users:
        band = pd.Series(users["age_band"].astype(str).to_numpy(), index=users["user_id"].astype(str).to_numpy())
        band = band[~band.index.duplicated()]
        code = pd.Series(np.arange(len(AGE_BANDS), dtype=np.float64), index=list(AGE_BANDS))
        cols["age_band"] = code.reindex(band.reindex(idx).to_numpy()).to_numpy(dtype=np.float64)
    frame = pd.DataFrame(cols, index=idx)
    if vectors is not None:
        ids, vecs = vectors
        v = pd.DataFrame(np.asarray(vecs, dtype=np.float64), index=pd.Index(np.asarray(ids).astype(str)))
        v = v[~v.index.duplicated()].reindex(idx)
        v.columns = [f"vec_{j}" for j in range(v.shape[1])]
        frame = pd.concat([frame, v], axis=1)
    return frame


def bundle_user_vectors(bundle: Any) -> tuple[np.ndarray, np.ndarray]:
    """(user ids (U,), vectors (U, D) float32) from the bundle's user tower: the one call site."""
    return user_vectors(bundle)
