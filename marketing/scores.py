"""The campaign models' scores in the profiles: ``churn_probability`` and ``predicted_ltv`` per customer.

``towerline profile`` adds them to the profiles it exports, and ``towerline campaign run`` to the
profiles it builds at ``--as-of`` when its campaign reads one of them (a churn-risk trigger, an
LTV-tiered offer) and neither ``--profiles`` nor ``--scores`` carries it: one function for both.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import pandas as pd

from towerline.config import ProfileConfig
from towerline.errors import DataValidationError
from towerline.marketing.churn import CHURN_COLUMN, ChurnConfig, add_churn_probability, train_churn
from towerline.marketing.ltv import LTV_COLUMN, LtvConfig, add_predicted_ltv, train_ltv

log = logging.getLogger(__name__)

SCORE_COLUMNS: tuple[str, ...] = (CHURN_COLUMN, LTV_COLUMN)


def add_campaign_scores(
    profiles: pd.DataFrame, dataset: Any, profile_cfg: ProfileConfig,
    churn_cfg: ChurnConfig = ChurnConfig(), ltv_cfg: LtvConfig = LtvConfig(),
    columns: Sequence[str] = SCORE_COLUMNS,
) -> pd.DataFrame:
    """``churn_probability`` and ``predicted_ltv`` per customer, as of the profiles' reference time.

    The two models are trained here, on a time split of the same events (snapshots ``t - h`` and
    ``t - 2h`` with the ``h`` days after each as labels), then applied at ``t``. Trained rather than
    loaded because they are scikit-learn estimators, which persist only by pickling (Towerline never
    loads a pickle), they fit in seconds on the profile columns, and the profile job is where their
    features are built anyway: a model from another run would be as stale as its data. Without the
    user tower's vectors: the bundle's histories run to the end of its training data, so at the
    training snapshots they would carry the very future the labels measure.

    A log too short for the horizons (or without a clock) leaves the columns out, with a warning.
    """
    at = int(profiles.attrs.get("reference_time", dataset.events["timestamp"].max()))
    if not profiles.attrs.get("has_clock", True):
        log.warning("profile: timestamps are not a clock; no churn_probability or predicted_ltv")
        return profiles
    if CHURN_COLUMN in columns:
        try:
            churn = train_churn(dataset, at, churn_cfg, profile_cfg=profile_cfg)
            profiles = add_churn_probability(profiles, churn, dataset, at=at, profile_cfg=profile_cfg)
        except DataValidationError as e:
            log.warning("profile: no churn_probability (%s)", e)
    if LTV_COLUMN in columns:
        try:
            ltv = train_ltv(dataset, at, ltv_cfg, profile_cfg=profile_cfg)
            profiles = add_predicted_ltv(profiles, ltv, dataset, at=at, profile_cfg=profile_cfg)
        except DataValidationError as e:
            log.warning("profile: no predicted_ltv (%s)", e)
    return profiles
