"""Customer profiles as a marketing team reads them: segment sizes and rules, one user's profile,
the Parquet export (consenting users, aggregate columns only) and its reader.

The numbers themselves (RFM scores and groups, lifecycle segments, interest tags) are computed
from events in ``towerline.features.user_features``, because the ranker uses them as features too;
this module is what marketing adds on top. The thresholds a table was built with travel with it
(``export_profiles`` writes them into the Parquet metadata, ``load_profiles`` reads them back), so
``GET /segments`` describes the segments as they were cut, not as today's defaults would cut them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from towerline.config import ProfileConfig, from_dict
from towerline.errors import DataValidationError
from towerline.features.user_features import PROFILE_COLUMNS, RFM_GROUP_DESCRIPTIONS

log = logging.getLogger(__name__)

PROFILE_META_KEY = "towerline.profiles"  # Parquet metadata key of the facts a table was built with
# Model outputs a profiles table may carry (marketing/churn.py, marketing/ltv.py): exported with the
# aggregates when present, since they are per-user aggregates too.
MODEL_COLUMNS: tuple[str, ...] = ("churn_probability", "predicted_ltv")


def segment_definitions(cfg: ProfileConfig) -> list[dict[str, Any]]:
    """The lifecycle segments and RFM groups with their rules in words (``GET /segments``)."""
    lifecycle = [
        {"name": "new", "kind": "lifecycle", "rule": f"first event at most {cfg.new_days:g} days ago"},
        {"name": "loyal", "kind": "lifecycle",
         "rule": f"last event at most {cfg.active_days:g} days ago and at least {cfg.loyal_min_frequency} "
                 "orders (interactions when the data has no orders)"},
        {"name": "active", "kind": "lifecycle", "rule": f"last event at most {cfg.active_days:g} days ago"},
        {"name": "at-risk", "kind": "lifecycle",
         "rule": f"last event {cfg.active_days:g} to {cfg.at_risk_days:g} days ago"},
        {"name": "churned", "kind": "lifecycle", "rule": f"last event more than {cfg.at_risk_days:g} days ago"},
    ]
    rfm = [{"name": name, "kind": "rfm", "rule": text} for name, text in RFM_GROUP_DESCRIPTIONS.items()]
    return lifecycle + rfm


def segment_summary(profiles: pd.DataFrame, cfg: ProfileConfig) -> dict[str, Any]:
    """Sizes of every lifecycle segment, RFM group and cluster plus the definitions (``GET /segments``).

    Only consenting users are counted: the summary is as public as an export.
    """
    p = profiles[profiles["consent"].astype(bool)] if "consent" in profiles else profiles
    out: dict[str, Any] = {
        "users": int(len(p)),
        "segments": {k: int(v) for k, v in p["segment"].value_counts().items()},
        "rfm_groups": {k: int(v) for k, v in p["rfm_group"].value_counts().items()},
        "definitions": segment_definitions(cfg),
        "thresholds": dataclasses.asdict(cfg),
    }
    if "cluster" in p:
        out["clusters"] = {str(k): int(v) for k, v in p["cluster"].value_counts().sort_index().items()}
    return out


class UserProfile(BaseModel):
    """One user's profile as ``GET /users/{user_id}/profile`` returns it."""

    user_id: str
    segment: str
    rfm_group: str
    r_score: int | None
    f_score: int
    m_score: int
    recency_days: float | None
    frequency: float
    monetary: float
    tags: list[str]
    cluster: int | None = None
    churn_probability: float | None = None  # P(no order in the churn model's horizon), customers only
    predicted_ltv: float | None = None  # expected revenue over the LTV model's horizon, customers only


def profile_of(profiles: pd.DataFrame, user_id: str) -> UserProfile | None:
    """The user's profile, or None for an unknown user and for a user without consent."""
    row = profiles.loc[profiles["user_id"] == user_id]
    if not len(row) or ("consent" in row and not bool(row["consent"].iloc[0])):
        return None
    r = row.iloc[0]

    def num(x: Any) -> float | None:
        return None if pd.isna(x) else float(x)

    return UserProfile(
        user_id=str(r["user_id"]), segment=str(r["segment"]), rfm_group=str(r["rfm_group"]),
        r_score=None if pd.isna(r["r_score"]) else int(r["r_score"]), f_score=int(r["f_score"]),
        m_score=int(r["m_score"]), recency_days=num(r["recency_days"]), frequency=float(r["frequency"]),
        monetary=float(r["monetary"]), tags=[str(t) for t in r["tags"]],
        cluster=int(r["cluster"]) if "cluster" in r and not pd.isna(r["cluster"]) else None,
        churn_probability=num(r["churn_probability"]) if "churn_probability" in r else None,
        predicted_ltv=num(r["predicted_ltv"]) if "predicted_ltv" in r else None,
    )


# ----------------------------------------------------------------------------------------------
# export


def export_profiles(profiles: pd.DataFrame, path: str | Path) -> Path:
    """Write consenting users' profiles (``PROFILE_COLUMNS`` + ``MODEL_COLUMNS`` only) as Parquet; returns the path.

    Users whose consent is false are left out entirely, and only aggregate columns are written:
    any other column (an event list someone joined on) is dropped, never exported. The frame's
    facts (reference time, bases, the ``ProfileConfig`` thresholds) go into the file's metadata
    under ``PROFILE_META_KEY``, so whoever loads the file knows how its segments were cut.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    keep = profiles["consent"].astype(bool).to_numpy() if "consent" in profiles else np.ones(len(profiles), bool)
    columns = PROFILE_COLUMNS + MODEL_COLUMNS
    out = profiles.loc[keep, [c for c in columns if c in profiles.columns]].reset_index(drop=True)
    dropped = sorted(set(profiles.columns) - set(columns))
    if dropped:
        log.info("export_profiles: columns %s are not profile columns and were not written", dropped)
    facts = {k: v for k, v in profiles.attrs.items() if isinstance(v, (str, int, float, bool, dict)) or v is None}
    table = pa.Table.from_pandas(out, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PROFILE_META_KEY] = json.dumps(facts, default=str).encode()
    pq.write_table(table.replace_schema_metadata(meta), p)
    log.info("profiles: %d users written to %s (%d without consent left out)", len(out), p, int((~keep).sum()))
    return p


def load_profiles(path: str | Path) -> pd.DataFrame:
    """Read a profiles Parquet written by ``export_profiles``; its recorded facts come back as ``attrs``."""
    p = Path(path)
    if not p.is_file():
        raise DataValidationError(f"{p}: profiles file not found; write one with `towerline profile --out {p.name}`")
    table = pq.read_table(p)
    frame = table.to_pandas()
    raw = (table.schema.metadata or {}).get(PROFILE_META_KEY.encode())
    frame.attrs = json.loads(raw) if raw else {}
    if "tags" in frame:
        frame["tags"] = [list(t) if t is not None else [] for t in frame["tags"]]
    return frame


def profile_thresholds(profiles: pd.DataFrame) -> ProfileConfig:
    """The ``ProfileConfig`` a profiles table was built with (the defaults for a file without it)."""
    recorded = profiles.attrs.get("profile_config")
    if not recorded:
        log.warning("profiles carry no recorded thresholds (written by an older Towerline); assuming the defaults")
        return ProfileConfig()
    return from_dict(ProfileConfig, dict(recorded), "profile")
