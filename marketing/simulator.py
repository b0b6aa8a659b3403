"""A shop whose customers' responses to campaigns are known: every campaign figure checked against the truth.

Why: an uplift model, a churn warning or an LTV forecast can only be *measured* on real data after
the fact, and never per user (a user is either sent the offer or not). In simulation we can write
down each user's probability of buying with and without each (channel, offer), so a test can ask
"did the model find the users the offer actually moves?".

The shop is ``features/synthetic.py``'s generator (called, not changed): its event log is the
history, and a campaign is sent at the end of that log (``SimulatedShop.send_time``). Each user's
response over the campaign window (``SimulatorParams.window_days``) is a known function of what
the log shows about them at send time — the same profile columns the models read — plus a
per-user factor nobody observes (so no model can be perfect):

* **baseline** ``p_control = sigmoid(b0 + b_f log1p(frequency) + b_r exp(-last_seen_days / 14))``:
  recent, frequent customers buy anyway.
* **persuasion** ``(0.3 lapse buyer + 0.15 browser + 0.03 loyal) * price_sensitivity * channel_gain * offer_gain * noise``:
  largest for past buyers who have gone quiet for about six weeks (``lapse``, a bump in
  log-days around ``lapse_peak_days``), then for visitors of the last days who rarely buy
  (``browser = exp(-last_seen / 7) exp(-frequency)``, the cart abandoners), a little for every
  past buyer (``loyal = 1 - exp(-frequency)``), and more for younger age bands
  (``price_sensitivity``); a discount moves more than a reminder, SMS more than e-mail.
* **annoyance** ``(0.10 [age 55+] + 0.05 [heavy buyer seen in the last 10 days]) * channel_annoyance``:
  contact puts these users off (more so by SMS and push than by e-mail).

``p_treated = clip(p_control + persuasion - annoyance)``, ``effect = p_treated - p_control``.
Each (user, channel, offer) falls into one of the four groups of the uplift literature (Radcliffe &
Surry 1999; Kane, Lo & Zheng 2014): **persuadables** (``effect >= +0.03``), **sleeping dogs**
(``effect <= -0.03``), and, among the rest, **sure things** (``p_control >= 0.25``) and **lost
causes**. A conversion's revenue is ``Gamma(2, m/2) * (1 - discount)`` with ``m`` the user's mean
order value so far (the shop's median for users who never bought).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from towerline.config import ProfileConfig
from towerline.errors import ConfigError
from towerline.features.contracts import Dataset
from towerline.features.synthetic import AGE_BANDS, generate_dataset
from towerline.marketing.model_inputs import profiles_at

log = logging.getLogger(__name__)

CAMPAIGN_CHANNELS: tuple[str, ...] = ("email", "push", "sms")
OFFERS: tuple[str, ...] = ("reminder", "discount_10", "discount_20")
OFFER_DISCOUNT: dict[str, float] = {"reminder": 0.0, "discount_10": 0.10, "discount_20": 0.20}
RESPONSE_TYPES: tuple[str, ...] = ("sure thing", "persuadable", "lost cause", "sleeping dog")


@dataclass(frozen=True)
class SimulatorParams:
    """The known response model; defaults give campaign rates of a few percent, not fitted ones."""

    window_days: float = 14.0           # a campaign's conversion window after the send
    base_logit: float = -3.0            # b0: baseline conversion of a dormant non-buyer ~ 5%
    frequency_logit: float = 0.9        # b_f, per log1p(orders)
    recency_logit: float = 2.5          # b_r, times exp(-last_seen_days / 14)
    persuasion: float = 0.30            # largest persuasion effect (probability points)
    lapse_peak_days: float = 45.0       # days since last seen where persuasion peaks
    lapse_width: float = 0.55           # width of that bump, in log-days
    browser_persuasion: float = 0.15    # extra persuasion of recent visitors who rarely buy (cart abandoners)
    loyal_persuasion: float = 0.03      # a small nudge for every past buyer (the offer is still money off)
    persuasion_noise: float = 0.3       # sd of the unobserved log-normal factor on persuasion
    annoyance_senior: float = 0.10      # effect lost by contacting users aged 55+
    annoyance_fatigued: float = 0.05    # ... by contacting heavy buyers seen in the last 10 days
    effect_margin: float = 0.03         # |effect| below this counts as "no effect"
    sure_thing_rate: float = 0.25       # p_control above which a no-effect user is a sure thing
    price_sensitivity: tuple[float, ...] = (1.0, 0.9, 0.7, 0.5, 0.35, 0.3)  # per AGE_BANDS
    channel_gain: dict[str, float] = field(default_factory=lambda: {"email": 0.8, "push": 1.0, "sms": 1.2})
    channel_annoyance: dict[str, float] = field(default_factory=lambda: {"email": 0.5, "push": 1.0, "sms": 1.6})
    offer_gain: dict[str, float] = field(
        default_factory=lambda: {"reminder": 0.35, "discount_10": 1.0, "discount_20": 1.4}
    )

    def __post_init__(self) -> None:
        if self.window_days <= 0:
            raise ConfigError(f"simulator.window_days must be > 0, got {self.window_days}")
        if len(self.price_sensitivity) != len(AGE_BANDS):
            raise ConfigError(f"simulator.price_sensitivity needs one value per age band {AGE_BANDS}")
        for name, table, keys in (("channel_gain", self.channel_gain, CAMPAIGN_CHANNELS),
                                  ("channel_annoyance", self.channel_annoyance, CAMPAIGN_CHANNELS),
                                  ("offer_gain", self.offer_gain, OFFERS)):
            if set(table) != set(keys):
                raise ConfigError(f"simulator.{name} needs exactly the keys {keys}, got {sorted(table)}")


@dataclass
class SimulatedShop:
    """The event log, the profiles at send time and every user's true response.

    ``effects`` has one row per (user, channel, offer): ``user_id``, ``channel``, ``offer``,
    ``p_control``, ``p_treated``, ``effect`` (= p_treated - p_control) and ``response_type``.
    ``order_value`` is each user's mean order value used for revenue.
    """

    dataset: Dataset
    send_time: int
    profiles: pd.DataFrame
    effects: pd.DataFrame
    order_value: pd.Series
    params: SimulatorParams
    seed: int

    def effect_of(self, channel: str, offer: str) -> pd.DataFrame:
        """The ``effects`` rows of one (channel, offer), indexed by ``user_id`` (the profiles' order)."""
        _check_arm(channel, offer)
        e = self.effects
        return e[(e["channel"] == channel) & (e["offer"] == offer)].set_index("user_id")


def simulate_shop(
    n_users: int,
    n_items: int = 500,
    seed: int = 0,
    *,
    events_per_user: int = 40,
    months: int = 6,
    params: SimulatorParams | None = None,
) -> SimulatedShop:
    """Generate a synthetic shop (``generate_dataset``) and every user's known campaign response.

    Args:
        n_users, n_items, seed, months: passed to the generator (the same seed, the same shop).
        events_per_user: events in the log per user (the generator's default is 20; 40 gives
            churn and LTV models enough repeat purchases on a few thousand users).
        params: the response model.

    Returns:
        ``SimulatedShop`` with the campaign sent at the newest event of the log.
    """
    params = params or SimulatorParams()
    ds = generate_dataset(n_users, n_items, seed, n_events=events_per_user * n_users, months=months)
    send_time = int(ds.events["timestamp"].max())
    prof = profiles_at(ds, send_time, ProfileConfig())
    rng = np.random.default_rng([seed, 7_001])
    effects = true_effects(prof, ds.users, params, rng)
    freq = prof["frequency"].to_numpy(dtype=np.float64)
    mean_value = np.where(freq > 0, prof["monetary"].to_numpy(dtype=np.float64) / np.maximum(freq, 1), np.nan)
    fallback = float(np.nanmedian(mean_value)) if np.isfinite(mean_value).any() else 50.0
    order_value = pd.Series(np.nan_to_num(mean_value, nan=fallback), index=prof["user_id"].astype(str).to_numpy())
    shares = effects.groupby("response_type").size() / len(effects)
    log.info("simulated shop: %d users with events, send time %d; response types %s", len(prof), send_time,
             {k: round(float(v), 3) for k, v in shares.items()})
    return SimulatedShop(ds, send_time, prof, effects, order_value, params, seed)


def true_effects(
    profiles: pd.DataFrame, users: pd.DataFrame, params: SimulatorParams, rng: np.random.Generator
) -> pd.DataFrame:
    """Every user's (p_control, p_treated, effect, response type) for each channel and offer (see the module doc)."""
    p = params
    ids = profiles["user_id"].astype(str).to_numpy()
    freq = profiles["frequency"].to_numpy(dtype=np.float64)
    seen = profiles["last_seen_days"].to_numpy(dtype=np.float64)
    band = pd.Series(users["age_band"].astype(str).to_numpy(), index=users["user_id"].astype(str).to_numpy())
    band_code = pd.Series(range(len(AGE_BANDS)), index=list(AGE_BANDS)).reindex(band.reindex(ids).to_numpy())
    band_code = band_code.fillna(2).to_numpy(dtype=np.int64)  # unknown band: the middle one

    p_control = 1.0 / (1.0 + np.exp(-(p.base_logit + p.frequency_logit * np.log1p(freq)
                                      + p.recency_logit * np.exp(-seen / 14.0))))
    lapse = np.exp(-0.5 * ((np.log1p(seen) - np.log1p(p.lapse_peak_days)) / p.lapse_width) ** 2)
    buyer = 0.35 + 0.65 * (1.0 - np.exp(-freq))
    sensitivity = np.asarray(p.price_sensitivity)[band_code]
    noise = rng.lognormal(0.0, p.persuasion_noise, len(ids))
    browser = p.browser_persuasion * np.exp(-seen / 7.0) * np.exp(-freq)  # recent visitors, few orders
    loyal = p.loyal_persuasion * (1.0 - np.exp(-freq))
    persuasion = (p.persuasion * lapse * buyer + browser + loyal) * sensitivity * noise  # (U,)
    heavy = freq >= max(np.quantile(freq[freq > 0], 0.8), 2.0) if (freq > 0).any() else np.zeros(len(ids), bool)
    annoyance = p.annoyance_senior * (band_code >= AGE_BANDS.index("55-64")) + p.annoyance_fatigued * (heavy & (seen < 10))

    frames = []
    for channel in CAMPAIGN_CHANNELS:
        for offer in OFFERS:
            raw = persuasion * p.channel_gain[channel] * p.offer_gain[offer] - annoyance * p.channel_annoyance[channel]
            p_treated = np.clip(p_control + raw, 0.001, 0.999)
            effect = p_treated - p_control
            kind = np.where(effect >= p.effect_margin, "persuadable",
                            np.where(effect <= -p.effect_margin, "sleeping dog",
                                     np.where(p_control >= p.sure_thing_rate, "sure thing", "lost cause")))
            frames.append(pd.DataFrame({"user_id": ids, "channel": channel, "offer": offer, "p_control": p_control,
                                        "p_treated": p_treated, "effect": effect, "response_type": kind}))
    return pd.concat(frames, ignore_index=True)


def run_campaign(
    shop: SimulatedShop,
    arms: Sequence[tuple[str, str]] = (("email", "discount_10"),),
    holdout: float = 0.5,
    seed: int = 0,
    user_ids: Sequence[str] | None = None,
    send_to: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Send a campaign and draw who converted: the outcome data a real campaign would leave.

    Two ways to send. Randomised (default): every user of ``user_ids`` (default all profiled
    users) goes to the holdout with probability ``holdout``, else to one of ``arms`` uniformly —
    the data an uplift model learns from. Targeted: ``send_to`` lists who gets ``arms[0]``; all
    other users of ``user_ids`` are not contacted (group ``"not sent"``). Users who refused
    consent are never contacted: the default ``user_ids`` leaves them out, and naming one raises.

    Returns:
        DataFrame ``user_id``, ``group`` (``"holdout"``, ``"treated"`` or ``"not sent"``),
        ``channel`` and ``offer`` (None when not contacted), ``converted`` (bool) and ``revenue``
        (0 unless converted; discounted when treated). The truth stays in ``shop.effects``.
    """
    if not arms:
        raise ConfigError("run_campaign: give at least one (channel, offer) arm")
    for channel, offer in arms:
        _check_arm(channel, offer)
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"run_campaign: holdout must be in [0, 1), got {holdout}")
    consenting = shop.profiles.loc[shop.profiles["consent"].astype(bool), "user_id"].astype(str)
    ids = consenting.to_numpy() if user_ids is None else np.asarray(user_ids, dtype=object).astype(str)
    named = np.concatenate([ids, np.asarray(send_to if send_to is not None else [], dtype=object).astype(str)])
    refused = np.isin(named, shop.profiles.loc[~shop.profiles["consent"].astype(bool), "user_id"].astype(str).to_numpy())
    if refused.any():
        raise ConfigError(f"run_campaign: users {named[refused][:3].tolist()} refused consent and cannot be contacted")
    rng = np.random.default_rng([shop.seed, seed, 7_002])
    n = len(ids)
    arm_of = np.full(n, -1, dtype=np.int64)  # -1: not contacted
    if send_to is None:
        contacted = rng.random(n) >= holdout
        arm_of[contacted] = rng.integers(0, len(arms), int(contacted.sum()))
        group = np.where(contacted, "treated", "holdout")
    else:
        sent = np.isin(ids, np.asarray(send_to, dtype=object).astype(str))
        arm_of[sent] = 0
        group = np.where(sent, "treated", "not sent")

    base = shop.effect_of(*arms[0]).reindex(ids)
    if base["p_control"].isna().any():
        missing = ids[base["p_control"].isna().to_numpy()][:3].tolist()
        raise ConfigError(f"run_campaign: users {missing} are not in the simulated shop")
    rate = base["p_control"].to_numpy(dtype=np.float64).copy()
    discount = np.zeros(n)
    channel = np.full(n, None, dtype=object)
    offer = np.full(n, None, dtype=object)
    for k, (ch, of) in enumerate(arms):
        at = arm_of == k
        rate[at] = shop.effect_of(ch, of)["p_treated"].reindex(ids[at]).to_numpy(dtype=np.float64)
        discount[at] = OFFER_DISCOUNT[of]
        channel[at], offer[at] = ch, of
    converted = rng.random(n) < rate
    mean_value = shop.order_value.reindex(ids).to_numpy(dtype=np.float64)
    revenue = np.where(converted, rng.gamma(2.0, mean_value / 2.0) * (1.0 - discount), 0.0)
    log.info("campaign %s: %d users, %d contacted, %d conversions", list(arms), n, int((arm_of >= 0).sum()),
             int(converted.sum()))
    return pd.DataFrame({"user_id": ids, "group": group, "channel": channel, "offer": offer,
                         "converted": converted, "revenue": np.round(revenue, 2)})


def incremental_conversions(shop: SimulatedShop, user_ids: Sequence[str], channel: str, offer: str) -> float:
    """Expected extra conversions from sending (channel, offer) to ``user_ids``: the sum of their true effects."""
    eff = shop.effect_of(channel, offer)["effect"]
    ids = pd.Index(np.asarray(user_ids, dtype=object).astype(str))
    unknown = ~ids.isin(eff.index)
    if unknown.any():
        raise ConfigError(f"incremental_conversions: users {ids[unknown][:3].tolist()} are not in the simulated shop")
    return float(eff.reindex(ids).sum())


def _check_arm(channel: str, offer: str) -> None:
    if channel not in CAMPAIGN_CHANNELS:
        raise ConfigError(f"unknown channel {channel!r}; the simulator knows {CAMPAIGN_CHANNELS}")
    if offer not in OFFERS:
        raise ConfigError(f"unknown offer {offer!r}; the simulator knows {OFFERS}")
