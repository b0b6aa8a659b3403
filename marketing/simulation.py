"""Synthetic users with known true rates replayed into a feedback store: the report checked end to end.

Simulated users are named ``sim<seed>-<7 digits>`` (``SIMULATED_USER``), so a report can tell
simulated feedback from real and mark its page "simulated". ``simulate_per_user`` draws the same
users' per-user sums without a store: the coverage check of ``bench/experiment_coverage.py`` and
the tests runs hundreds of experiments through the report's statistics that way.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import numpy as np
import pandas as pd

from towerline.config import ExperimentConfig
from towerline.errors import ConfigError
from towerline.marketing.assignment import assign_arms
from towerline.marketing.feedback import FeedbackStore

log = logging.getLogger(__name__)

SIMULATED_USER = re.compile(r"^sim\d+-\d{7}$")  # user ids ``simulate`` writes


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
    user_ids, arm_of, n_imp, imp_user, clicked, bought, value, rng = _draw(
        experiment, n_users, true_rates, seed, impressions_per_user)
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


def simulate_per_user(
    experiment: ExperimentConfig,
    n_users: int,
    true_rates: dict[str, tuple[float, float, float]],
    seed: int = 0,
    impressions_per_user: float = 5.0,
) -> pd.DataFrame:
    """The per-user sums ``FeedbackStore.per_user`` would return after ``simulate`` with the same arguments.

    Same draws as ``simulate`` (one user, one arm by the real hash, one order at most; values
    rounded to cents as stored), without the SQLite round trip: for running hundreds of
    experiments through the report's statistics.
    """
    user_ids, arm_of, n_imp, imp_user, clicked, bought, value, _ = _draw(
        experiment, n_users, true_rates, seed, impressions_per_user)
    clicks = np.bincount(imp_user, weights=clicked, minlength=n_users).astype(np.int64)
    return pd.DataFrame({
        "user_id": user_ids, "arm": arm_of.astype(str), "impressions": n_imp.astype(np.int64), "clicks": clicks,
        "purchases": bought.astype(np.int64), "revenue": np.where(bought, np.round(value, 2), 0.0),
    })


def _draw(
    experiment: ExperimentConfig,
    n_users: int,
    true_rates: dict[str, tuple[float, float, float]],
    seed: int,
    impressions_per_user: float,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
    """Arms, impressions (U,), impression owners (I,), clicks (I,), purchases (U,), order values (U,)."""
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
    return user_ids, arm_of, n_imp, imp_user, clicked, bought, value, rng


def is_simulated(user_ids: pd.Series) -> str:
    """``"yes"`` when every user id is one ``simulate`` writes, ``"partly"`` when some are, else ``"no"``."""
    ids = pd.Series(user_ids, dtype=str)
    sim = ids.str.match(SIMULATED_USER.pattern)
    return "yes" if len(ids) and sim.all() else ("partly" if sim.any() else "no")
