"""Synthetic users with known true rates replayed into a feedback store: the report checked end to end."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from towerline.config import ExperimentConfig
from towerline.errors import ConfigError
from towerline.marketing.assignment import assign_arms
from towerline.marketing.feedback import FeedbackStore

log = logging.getLogger(__name__)


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
