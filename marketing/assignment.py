"""A/B arm assignment: a user's arm is a pure function of (experiment name, user id).

See ``towerline.marketing.experiment_report`` for the whole design of the experiments.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import numpy as np

from towerline.config import ExperimentConfig
from towerline.errors import ConfigError

log = logging.getLogger(__name__)


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
