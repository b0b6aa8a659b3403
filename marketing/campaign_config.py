"""Campaign definitions: typed frozen dataclasses loaded from ``configs/campaigns/*.yaml``.

A campaign is *when* (trigger), *who* (eligibility, channels, holdout), *what* (content) and *at
what price* (offer). The YAML is parsed by ``towerline.config.from_dict``, like every other config,
so an unknown or misspelt key is an error that suggests the nearest valid name, and each
``__post_init__`` rejects an impossible value with a ``ConfigError`` naming the field
(``campaign 'welcome' field 'trigger.days': ...``). Below ``load_campaign`` no code reads a dict.

Scores that other models produce (churn probability, predicted LTV, predicted uplift) are named
here by *column*: the trigger or offer reads that column from the profiles table or from a
``--scores`` Parquet, so the campaign engine and the models that write the scores meet in data,
not in code.

Example (``configs/campaigns/related-after-purchase.yaml``)::

    name: related-after-purchase
    trigger: {kind: purchase, days: 3}
    content: {kind: similar_to_purchased, k: 4}
    channels: [email, push]
    holdout: 0.1
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from towerline.config import from_dict, read_yaml_mapping
from towerline.errors import ConfigError

log = logging.getLogger(__name__)

TriggerKind = Literal["signup", "purchase", "view_without_purchase", "churn_risk", "item_launch"]
ContentKind = Literal["recommendations", "similar_to_purchased", "viewed_item", "item_audience"]
OfferKind = Literal["none", "fixed", "ltv_tiers", "uplift_budget"]
Channel = Literal["push", "email", "sms", "on-site"]
CHANNELS: tuple[str, ...] = get_args(Channel)
DEFAULT_CAMPAIGN_DIR = Path("configs/campaigns")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"campaign field '{where}': {msg}")


@dataclass(frozen=True)
class TriggerConfig:
    """When a user qualifies. Day-based triggers count calendar days in the campaign's timezone."""

    kind: TriggerKind = "signup"
    days: int = 0  # signup / purchase / view_without_purchase: the message is due this many calendar days after
    # the event (0 = the same day; "on the 3rd day after a purchase" = 3)
    window_days: int = 1  # a due message is still sent by runs up to this many days late (1 = on its day only)
    threshold: float = 0.5  # churn_risk: users whose score is above this, (0, 1)
    score_column: str = "churn_probability"  # churn_risk: per-user score column (profiles or --scores)
    item_id: str | None = None  # item_launch: the launched item
    launch_at: str | None = None  # item_launch: ISO date or time of the launch (the trigger moment)
    audience_size: int = 1000  # item_launch: users the model ranks most likely to buy the item

    def __post_init__(self) -> None:
        _check(self.days >= 0, "trigger.days", f"must be >= 0, got {self.days}")
        _check(self.window_days >= 1, "trigger.window_days", f"must be >= 1, got {self.window_days}")
        _check(0 < self.threshold < 1, "trigger.threshold", f"must be in (0, 1), got {self.threshold}")
        _check(self.audience_size >= 1, "trigger.audience_size", "must be >= 1")
        if self.kind == "item_launch":
            _check(bool(self.item_id), "trigger.item_id", "an item_launch trigger needs the launched item_id")
            _check(bool(self.launch_at), "trigger.launch_at", "an item_launch trigger needs launch_at (ISO date)")
            _check(_parses(self.launch_at), "trigger.launch_at", f"{self.launch_at!r} is not an ISO date or time")


def _parses(value: str | None) -> bool:
    try:
        datetime.fromisoformat(str(value))
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class FrequencyCapConfig:
    """At most ``per_user`` messages to a user from all campaigns in ``per_user_days``, and at most
    ``per_campaign`` from this campaign in ``per_campaign_days`` (counted from the outbox)."""

    per_user: int = 3  # messages per user from every campaign within per_user_days; 0 = no cap
    per_user_days: float = 7.0
    per_campaign: int = 1  # messages per user from this campaign within per_campaign_days; 0 = no cap
    per_campaign_days: float = 30.0

    def __post_init__(self) -> None:
        _check(self.per_user >= 0, "eligibility.frequency_cap.per_user", "must be >= 0 (0 = no cap)")
        _check(self.per_campaign >= 0, "eligibility.frequency_cap.per_campaign", "must be >= 0 (0 = no cap)")
        _check(self.per_user_days > 0, "eligibility.frequency_cap.per_user_days", "must be > 0")
        _check(self.per_campaign_days > 0, "eligibility.frequency_cap.per_campaign_days", "must be > 0")


@dataclass(frozen=True)
class QuietHoursConfig:
    """Hours (campaign timezone) when ``channels`` must not ring: a message due then is scheduled
    (``send_at``) for the end of the quiet hours instead of being dropped."""

    start: str | None = "21:00"  # HH:MM; None = no quiet hours
    end: str = "08:00"  # HH:MM, may be earlier than start (the quiet hours span midnight)
    channels: tuple[Channel, ...] = ("push", "sms")  # email and on-site wait for the user anyway

    def __post_init__(self) -> None:
        _check(self.start is None or bool(_HHMM.match(self.start)), "eligibility.quiet_hours.start",
               f"{self.start!r} is not HH:MM (24-hour clock)")
        _check(bool(_HHMM.match(self.end)), "eligibility.quiet_hours.end", f"{self.end!r} is not HH:MM (24-hour clock)")


@dataclass(frozen=True)
class EligibilityConfig:
    segments: tuple[str, ...] = ()  # lifecycle segments or RFM groups (profiles) that may receive it; () = all
    frequency_cap: FrequencyCapConfig = field(default_factory=FrequencyCapConfig)
    quiet_hours: QuietHoursConfig = field(default_factory=QuietHoursConfig)


@dataclass(frozen=True)
class ContentConfig:
    kind: ContentKind = "recommendations"  # recommendations: the served model (rules, consent, fallback);
    # similar_to_purchased: nearest items to the purchased one; viewed_item: the viewed item;
    # item_audience: the launched item (with an item_launch trigger)
    k: int = 4  # items per message

    def __post_init__(self) -> None:
        _check(1 <= self.k <= 100, "content.k", f"must be in [1, 100], got {self.k}")


@dataclass(frozen=True)
class TierConfig:
    min_score: float = 0.0  # users whose score is at least this get `value` (the highest tier that fits)
    value: float = 0.0  # the offer: percent off (unit percent) or money (unit amount)


@dataclass(frozen=True)
class OfferConfig:
    kind: OfferKind = "none"  # none; fixed: everyone gets `value`; ltv_tiers: by predicted LTV;
    # uplift_budget: `value` to the users with the highest predicted uplift until `budget` is spent
    unit: Literal["percent", "amount"] = "percent"
    value: float = 0.0  # fixed and uplift_budget: the offer
    tiers: tuple[TierConfig, ...] = ()  # ltv_tiers
    score_column: str | None = None  # default: predicted_ltv (ltv_tiers) or predicted_uplift (uplift_budget)
    budget: float = 0.0  # uplift_budget: total expected cost of the offers per run (money)
    cost_per_offer: float | None = None  # uplift_budget: cost of one offer; default `value` (money offers)
    # uplift_budget without a score column in --scores/profiles: the uplift model is learnt from an
    # earlier campaign's messages and holdout in the outbox (its randomised experiment)
    uplift_from: str | None = None  # that campaign's name; default: this campaign
    uplift_outcome: Literal["conversion", "revenue"] = "conversion"  # the effect to maximise; with revenue,
    # an offer goes only to users whose predicted extra revenue exceeds its cost
    uplift_window_days: float = 7.0  # days after a message (or holdout row) whose orders count as its outcome

    def __post_init__(self) -> None:
        if self.kind in ("fixed", "uplift_budget"):
            _check(self.value > 0, "offer.value", f"a {self.kind} offer needs value > 0")
        if self.unit == "percent":
            _check(0 <= self.value <= 100, "offer.value", "a percent offer must be in [0, 100]")
            _check(all(0 <= t.value <= 100 for t in self.tiers), "offer.tiers", "percent values must be in [0, 100]")
        if self.kind == "ltv_tiers":
            _check(len(self.tiers) >= 1, "offer.tiers", "an ltv_tiers offer needs at least one tier")
            mins = [t.min_score for t in self.tiers]
            _check(len(set(mins)) == len(mins), "offer.tiers", "two tiers share a min_score")
        _check(self.uplift_window_days > 0, "offer.uplift_window_days", "must be > 0")
        if self.kind == "uplift_budget":
            _check(self.budget > 0, "offer.budget", "an uplift_budget offer needs budget > 0")
            _check(self.unit == "amount" or (self.cost_per_offer or 0) > 0, "offer.cost_per_offer",
                   "a percent uplift_budget offer needs cost_per_offer > 0 (its expected cost in money)")

    @property
    def column(self) -> str | None:
        """The per-user score column this offer reads."""
        if self.kind == "ltv_tiers":
            return self.score_column or "predicted_ltv"
        if self.kind == "uplift_budget":
            return self.score_column or "predicted_uplift"
        return None


@dataclass(frozen=True)
class CampaignConfig:
    name: str = ""
    description: str = ""
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    offer: OfferConfig = field(default_factory=OfferConfig)
    channels: tuple[Channel, ...] = ("email",)  # in order of preference (see channel_policy)
    channel_policy: Literal["first", "all"] = "first"  # first: one message on the first channel the user
    # consents to; all: one message on every consented channel
    holdout: float = 0.1  # share of users who never receive this campaign (stable hash), [0, 1)
    timezone: str = "UTC"  # IANA zone for calendar days and quiet hours

    def __post_init__(self) -> None:
        _check(bool(_NAME.match(self.name)), "name",
               f"{self.name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names messages and files)")
        _check(len(self.channels) >= 1, "channels", f"give at least one of {list(CHANNELS)}")
        _check(len(set(self.channels)) == len(self.channels), "channels", "a channel is listed twice")
        _check(0 <= self.holdout < 1, "holdout", f"must be in [0, 1), got {self.holdout}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"campaign field 'timezone': {self.timezone!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
        kind, content = self.trigger.kind, self.content.kind
        _check(content != "similar_to_purchased" or kind == "purchase", "content.kind",
               "similar_to_purchased needs a purchase trigger (it is the purchased item's neighbours)")
        _check(content != "viewed_item" or kind == "view_without_purchase", "content.kind",
               "viewed_item needs a view_without_purchase trigger")
        _check(content != "item_audience" or kind == "item_launch", "content.kind",
               "item_audience needs an item_launch trigger")


def campaign_from_dict(data: dict) -> CampaignConfig:
    """A mapping (one YAML document) -> ``CampaignConfig``; ``ConfigError`` names the bad key or field."""
    return from_dict(CampaignConfig, _yaml_scalars(data), "")


def _yaml_scalars(data: dict) -> dict:
    """Undo YAML 1.1's guesses on unquoted values: ``21:00`` is read as the integer 1260 (base 60)
    and ``2025-06-01`` as a date; both are meant as the strings they look like."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    trig = out.get("trigger")
    if isinstance(trig, dict) and isinstance(trig.get("launch_at"), (date, datetime)):
        out["trigger"] = {**trig, "launch_at": trig["launch_at"].isoformat()}
    elig = out.get("eligibility")
    quiet = elig.get("quiet_hours") if isinstance(elig, dict) else None
    if isinstance(quiet, dict):
        fixed = {k: (f"{v // 60:02d}:{v % 60:02d}" if k in ("start", "end") and isinstance(v, int)
                     and not isinstance(v, bool) and 0 <= v < 24 * 60 else v) for k, v in quiet.items()}
        out["eligibility"] = {**elig, "quiet_hours": fixed}
    return out


def load_campaign(path: str | Path) -> CampaignConfig:
    """One ``configs/campaigns/*.yaml`` file -> ``CampaignConfig``; errors name the file and field."""
    p = Path(path)
    data = read_yaml_mapping(p, "campaign", "name, trigger, eligibility, content, offer, channels")
    data.setdefault("name", p.stem)
    try:
        return campaign_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def load_campaigns(directory: str | Path = DEFAULT_CAMPAIGN_DIR) -> list[CampaignConfig]:
    """Every ``*.yaml`` in ``directory``, sorted by name; two files with one name is an error."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"campaign folder not found: {d}; pass --campaigns DIR")
    out = [load_campaign(p) for p in sorted(d.glob("*.y*ml"))]
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{d}: campaign names {dup} are defined in more than one file")
    return sorted(out, key=lambda c: c.name)


def find_campaign(name: str, directory: str | Path = DEFAULT_CAMPAIGN_DIR) -> CampaignConfig:
    """The campaign called ``name`` in ``directory`` (or the YAML file ``name`` itself)."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return load_campaign(name)
    campaigns = load_campaigns(directory)
    for c in campaigns:
        if c.name == name:
            return c
    names = [c.name for c in campaigns]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known campaigns: {', '.join(names) or 'none'}"
    raise ConfigError(f"no campaign named '{name}' in {directory}{hint}")
