"""Who should get the offer: the incremental effect of a campaign per user, learnt from its holdout.

A response model ("who is likely to buy after the mail?") sends offers to the customers who would
have bought anyway — *sure things* — and to *sleeping dogs* whom contact puts off. What a budget
should buy is the difference the offer makes: ``tau(x) = P(buy | x, sent) - P(buy | x, not sent)``,
which a randomised holdout lets us learn.

Method. Meta-learners over scikit-learn's ``HistGradientBoosting*`` (fast on a few cores, native
NaN handling for users who never ordered), no uplift library: causalml would add a large
dependency for two dozen lines.

* ``"t"`` — T-learner: one classifier per group, ``tau = mu1(x) - mu0(x)``.
* ``"x"`` — X-learner (Künzel, Sekhon, Bickel & Yu 2019, *PNAS* 116(10)): imputes each treated
  user's effect as ``y - mu0(x)`` and each holdout user's as ``mu1(x) - y``, regresses both, and
  blends the two effect models with the propensity ``g``: ``tau = g tau0 + (1 - g) tau1``. It
  shines when the groups are unbalanced (a 10 % holdout), because each effect model borrows the
  larger group's outcome model. Assignment is randomised, so ``g`` is the treated share.

The default is ``"x"``; ``bench/campaigns.py`` measures both. Evaluation on held-out users is the
Qini coefficient (Radcliffe 2007), and ``select_by_uplift`` spends a fixed budget on the largest
predicted effects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

from towerline.errors import ConfigError, DataValidationError
from towerline.features.contracts import Dataset
from towerline.marketing.model_inputs import DAY, feature_frame, profiles_at, window_outcomes

log = logging.getLogger(__name__)

Learner = Literal["t", "x"]
Outcome = Literal["conversion", "revenue"]


@dataclass(frozen=True)
class UpliftConfig:
    """The meta-learner and its base models (scikit-learn histogram gradient boosting)."""

    learner: Learner = "x"        # "t" (two models) or "x" (Künzel et al. 2019)
    max_iter: int = 150           # boosting rounds of each base model
    learning_rate: float = 0.05   # shrinkage
    max_leaf_nodes: int = 15      # leaves per tree
    min_samples_leaf: int = 40    # users per leaf: effects are small, leaves must be large
    l2_regularization: float = 1.0
    seed: int = 0                 # random_state of every base model

    def __post_init__(self) -> None:
        if self.learner not in ("t", "x"):
            raise ConfigError(f"uplift.learner must be 't' or 'x', got {self.learner!r}")
        if self.max_iter < 1 or not 0 < self.learning_rate <= 1:
            raise ConfigError("uplift.max_iter must be >= 1 and learning_rate in (0, 1]")


@dataclass
class UpliftModel:
    """A fitted meta-learner; ``predict(X)`` gives the (N,) effect on the conversion probability."""

    cfg: UpliftConfig
    feature_names: list[str]
    propensity: float
    mu0: HistGradientBoostingClassifier | HistGradientBoostingRegressor
    mu1: HistGradientBoostingClassifier | HistGradientBoostingRegressor
    tau0: HistGradientBoostingRegressor | None = None
    tau1: HistGradientBoostingRegressor | None = None
    outcome: Outcome = "conversion"  # what the effect is measured in: probability, or revenue per user

    def outcome_model(self, group: int, x: np.ndarray) -> np.ndarray:
        """(N,) expected outcome of rows ``x`` without (group 0) or with (1) the offer."""
        mu = self.mu1 if group else self.mu0
        return mu.predict_proba(x)[:, 1] if self.outcome == "conversion" else mu.predict(x)

    def predict(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        x = _matrix(X, self.feature_names)
        if self.cfg.learner == "t" or self.tau0 is None or self.tau1 is None:
            return self.outcome_model(1, x) - self.outcome_model(0, x)
        g = self.propensity
        return g * self.tau0.predict(x) + (1.0 - g) * self.tau1.predict(x)


def fit_uplift(
    X: pd.DataFrame | np.ndarray, treated: np.ndarray, converted: np.ndarray, cfg: UpliftConfig | None = None,
    outcome: Outcome = "conversion",
) -> UpliftModel:
    """Fit a T- or X-learner on a randomised campaign's outcome data.

    Args:
        X: (N, F) features of each user at send time (``model_inputs.feature_frame``).
        treated: (N,) bool, True for users who were sent the offer, False for the holdout.
        converted: (N,) outcome in the campaign window: bool/0-1 conversions, or (``outcome=
            "revenue"``) money, for an effect in revenue per user rather than in probability.
        outcome: ``"conversion"`` (classifiers as outcome models) or ``"revenue"`` (Poisson
            regressors: revenue is non-negative, mostly zero and heavy-tailed, as for the LTV model).

    Raises:
        DataValidationError: lengths differ, or a group is empty or has a single outcome value.
    """
    cfg = cfg or UpliftConfig()
    names = list(X.columns) if isinstance(X, pd.DataFrame) else [f"x{j}" for j in range(np.shape(X)[1])]
    x = _matrix(X, names)
    t = np.asarray(treated, dtype=bool)
    y = np.asarray(converted, dtype=np.float64)
    if not (len(x) == len(t) == len(y)):
        raise DataValidationError(f"fit_uplift: X has {len(x)} rows, treated {len(t)}, converted {len(y)}")
    if outcome not in ("conversion", "revenue"):
        raise ConfigError(f"fit_uplift: outcome must be 'conversion' or 'revenue', got {outcome!r}")
    if outcome == "revenue" and (y < 0).any():
        raise DataValidationError("fit_uplift: revenue outcomes must be >= 0")
    for name, grp in (("treated", t), ("holdout", ~t)):
        if grp.sum() < 2 or len(np.unique(y[grp])) < 2:
            raise DataValidationError(f"fit_uplift: the {name} group needs users who converted and users who did not")
    base = _classifier if outcome == "conversion" else lambda c: _regressor(c, loss="poisson")
    mu0 = base(cfg).fit(x[~t], y[~t])
    mu1 = base(cfg).fit(x[t], y[t])
    model = UpliftModel(cfg, names, float(t.mean()), mu0, mu1, outcome=outcome)
    if cfg.learner == "x":
        d1 = y[t] - model.outcome_model(0, x[t])  # imputed effects of the treated
        d0 = model.outcome_model(1, x[~t]) - y[~t]  # ... and of the holdout
        model.tau1 = _regressor(cfg).fit(x[t], d1)
        model.tau0 = _regressor(cfg).fit(x[~t], d0)
    log.info("uplift %s-learner: %d treated, %d holdout, %d features", cfg.learner, int(t.sum()), int((~t).sum()),
             len(names))
    return model


def contact_examples(
    dataset: Dataset, sent: pd.DataFrame, held: pd.DataFrame, window_days: float
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """A past campaign's contacts as uplift training rows: each user's first message (``sent``) or
    holdout row (``held``; both outbox rows with ``user_id``, ``created_at``), with features at
    that moment (``feature_frame`` of the profiles then: no later event) and the orders and revenue
    of the ``window_days`` after it (``window_outcomes``).

    Returns:
        (features indexed by user_id, treated (N,) bool, outcomes with ``orders``, ``revenue``).
    """
    both = pd.concat([sent.assign(treated=True), held.assign(treated=False)], ignore_index=True)
    both = both.sort_values("created_at", kind="stable").drop_duplicates("user_id")
    X, treated, outcomes = [], [], []
    for at, group in both.groupby("created_at", sort=True):
        ids = group["user_id"].astype(str).to_numpy()
        X.append(feature_frame(profiles_at(dataset, int(at)), dataset.users).reindex(ids))
        treated.append(group["treated"].to_numpy(dtype=bool))
        outcomes.append(window_outcomes(dataset, int(at), window_days, ids))
    if not X:
        raise DataValidationError("uplift: no contacts to learn from")
    return pd.concat(X), np.concatenate(treated), pd.concat(outcomes)


def learn_uplift_scores(
    dataset: Dataset, sent: pd.DataFrame, held: pd.DataFrame, at: int, *, window_days: float = 7.0,
    outcome: Outcome = "conversion", column: str = "predicted_uplift", cfg: UpliftConfig | None = None,
) -> pd.DataFrame:
    """``user_id`` and ``column``: every user's predicted effect of the offer at ``at``, learnt from a
    past campaign's messages and holdout (``contact_examples``) whose windows ended by ``at``.

    This is how ``towerline campaign run`` prices an ``uplift_budget`` offer without ``--scores``:
    the campaign's own (or ``offer.uplift_from``'s) outbox is its randomised experiment.

    Raises:
        DataValidationError: no window has ended yet, or a group lacks both outcomes.
    """
    done = lambda f: f.loc[f["created_at"].to_numpy(dtype=np.int64) + int(window_days * DAY) <= int(at)]  # noqa: E731
    sent, held = done(sent), done(held)
    if not len(sent) or not len(held):
        raise DataValidationError(
            f"uplift: {len(sent)} messages and {len(held)} holdout users whose {window_days:g}-day window ended by "
            f"{int(at)}; the uplift model needs both"
        )
    X, treated, outcomes = contact_examples(dataset, sent, held, window_days)
    y = (outcomes["orders"] > 0).to_numpy() if outcome == "conversion" else outcomes["revenue"].to_numpy()
    model = fit_uplift(X, treated, y, cfg, outcome)
    now = feature_frame(profiles_at(dataset, int(at)), dataset.users)
    log.info("uplift: learnt from %d messages and %d holdout users, scored %d users", int(treated.sum()),
             int((~treated).sum()), len(now))
    return pd.DataFrame({"user_id": now.index.astype(str), column: model.predict(now)})


def fit_response(X: pd.DataFrame | np.ndarray, converted: np.ndarray, cfg: UpliftConfig | None = None) -> HistGradientBoostingClassifier:
    """The classic response model P(convert | x) on treated users: the baseline uplift targeting beats."""
    x = _matrix(X, None)
    return _classifier(cfg or UpliftConfig()).fit(x, np.asarray(converted, dtype=np.float64))


def arm_outcomes(outcomes: pd.DataFrame, channel: str, offer: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """One arm of a (possibly multi-arm) campaign against its holdout: the rows an uplift model of
    that (channel, offer) learns from.

    Args:
        outcomes: a campaign's outcome data (``simulator.run_campaign`` or the same columns from a
            real one): ``user_id``, ``group`` (``"treated"`` / ``"holdout"``), ``channel``,
            ``offer``, ``converted``.

    Returns:
        (the holdout rows and the rows sent this arm, treated (N,) bool, converted (N,) bool).

    Raises:
        DataValidationError: the campaign has no holdout or nobody was sent this arm.
    """
    holdout = outcomes["group"] == "holdout"
    sent = (outcomes["group"] == "treated") & (outcomes["channel"] == channel) & (outcomes["offer"] == offer)
    if not holdout.any() or not sent.any():
        raise DataValidationError(
            f"uplift: {int(holdout.sum())} holdout users and {int(sent.sum())} sent {channel} + {offer}; both are needed"
        )
    rows = outcomes[holdout | sent].reset_index(drop=True)
    return rows, (rows["group"] == "treated").to_numpy(dtype=bool), rows["converted"].to_numpy(dtype=bool)


# ----------------------------------------------------------------------------------------------
# evaluation and targeting


def qini_curve(converted: np.ndarray, treated: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radcliffe's Qini curve: incremental conversions when the top-k users by ``score`` are targeted.

    ``Q(k) = Y_t(k) - Y_c(k) * N_t(k) / N_c(k)``, where ``Y_t(k)`` and ``N_t(k)`` are the treated
    conversions and users among the top k (likewise ``c`` for the holdout); ``Q = 0`` while the
    top k hold no holdout user. Users are sorted by descending score, ties broken by position.

    Returns:
        (fraction of users targeted (N+1,), incremental conversions as a fraction of N (N+1,)),
        both starting at 0.
    """
    y = np.asarray(converted, dtype=np.float64)
    t = np.asarray(treated, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if not (len(y) == len(t) == len(s)):
        raise DataValidationError(f"qini: converted has {len(y)} rows, treated {len(t)}, score {len(s)}")
    order = np.argsort(-s, kind="stable")
    y, t = y[order], t[order]
    n_t, n_c = np.cumsum(t), np.cumsum(~t)
    y_t, y_c = np.cumsum(y * t), np.cumsum(y * ~t)
    q = y_t - np.divide(y_c * n_t, n_c, out=np.zeros(len(y)), where=n_c > 0)
    n = max(len(y), 1)
    return np.arange(len(y) + 1) / n, np.concatenate([[0.0], q]) / n


def qini_coefficient(converted: np.ndarray, treated: np.ndarray, score: np.ndarray) -> float:
    """Area between the Qini curve and the random-targeting diagonal (Radcliffe 2007).

    Both axes are fractions of the users (x: share targeted, y: incremental conversions per user),
    so the figure is comparable across sample sizes: about 0 for a random ranking, positive when
    the score puts the users the offer moves first, negative when it puts them last.
    """
    x, q = qini_curve(converted, treated, score)
    area = float(np.sum((q[1:] + q[:-1]) * np.diff(x)) / 2.0)
    return area - float(q[-1]) / 2.0  # the diagonal from (0, 0) to (1, Q(N)) has area Q(N) / 2


def select_by_uplift(scores: pd.Series | np.ndarray, budget: int, *, only_positive: bool = True) -> np.ndarray:
    """Who gets the offer: the ``budget`` users with the highest predicted uplift.

    Args:
        scores: predicted effect per user, a Series indexed by ``user_id`` or an (N,) array.
        budget: number of offers that can be sent.
        only_positive: leave out users whose predicted effect is not above 0 even when budget
            remains: contacting a sleeping dog costs the offer *and* a sale.

    Returns:
        user ids (for a Series) or positions (for an array) of the chosen users, best first.
    """
    if budget < 0:
        raise ConfigError(f"select_by_uplift: budget must be >= 0, got {budget}")
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-values, kind="stable")[: int(budget)]
    if only_positive:
        order = order[values[order] > 0]
    if isinstance(scores, pd.Series):
        return scores.index.to_numpy()[order]
    return order


# ----------------------------------------------------------------------------------------------
# helpers


def _matrix(X: pd.DataFrame | np.ndarray, names: list[str] | None) -> np.ndarray:
    if isinstance(X, pd.DataFrame):
        if names is not None:
            missing = [c for c in names if c not in X.columns]
            if missing:
                raise DataValidationError(f"uplift: features {missing[:5]} missing from the input")
            X = X[names]
        return X.to_numpy(dtype=np.float64)
    x = np.asarray(X, dtype=np.float64)
    if names is not None and x.shape[1] != len(names):
        raise DataValidationError(f"uplift: expected {len(names)} feature columns, got {x.shape[1]}")
    return x


def _classifier(cfg: UpliftConfig) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(
        max_iter=cfg.max_iter, learning_rate=cfg.learning_rate, max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf, l2_regularization=cfg.l2_regularization, random_state=cfg.seed,
        early_stopping=False,
    )


def _regressor(cfg: UpliftConfig, loss: str = "squared_error") -> HistGradientBoostingRegressor:
    return HistGradientBoostingRegressor(
        loss=loss, max_iter=cfg.max_iter, learning_rate=cfg.learning_rate, max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf, l2_regularization=cfg.l2_regularization, random_state=cfg.seed,
        early_stopping=False,
    )
