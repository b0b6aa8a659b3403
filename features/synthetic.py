"""The embedded default data set: a seeded, synthetic e-commerce shop.

Why synthetic: every capability (training, indexing, serving, profiles) needs data with the shape of a
real shop, on a fresh clone, without a download. Uniform noise would not do: a sequence model must
have something to learn, and recency/frequency/monetary profiles need months of timestamps and
order values. So the generator plants structure a model can find and a test can check:

* **Catalogue.** Items fall into a department -> category hierarchy (up to 8 x 6 = 48 categories)
  and brands that sell in one category; popularity is Zipf-like (weight ``rank ** -0.9``, as in
  observed product catalogues); prices are log-normal per category with a brand premium.
* **Users.** Each has a taste over four categories (Dirichlet weights) that drifts linearly from a
  start mix to an end mix over the user's active life; some users exist before the period starts,
  the rest sign up throughout it, and most churn (stop being active) after an exponential lifetime.
  Activity is heavy-tailed (log-normal), so a few users produce many events.
* **Sessions and the funnel.** A user's touches (one item looked at) are grouped into sessions
  spread over their active window; every touch is a ``view`` and may continue to ``click`` ->
  ``cart`` -> ``purchase`` with decreasing probability; purchases carry ``value = price * quantity``.
  All events of a session share a ``channel``.
* **Sequential signal.** Every item has three successors (complements, mostly in its own category,
  otherwise in its department). The next item a user touches follows one of the previous item's
  successors with probability 0.65 inside a session (0.3 across sessions); otherwise it is drawn from
  the user's current taste (or, 15 % of the time, from global popularity). A first-order Markov
  predictor therefore beats "most popular" by a wide margin (tests/features/test_synthetic.py
  checks this), and a sequence model can do better still by also reading the taste.

Everything is vectorised numpy: the Markov chain is resolved by "run position" (how many follows
since the last independent draw, a few dozen at most) rather than per event or per user, so 10
million events take seconds. Id columns are pandas ``Categorical`` built from integer codes and
``event_id`` is an Arrow-backed string column, which keeps 10 million rows around 1 GiB.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from towerline.errors import ConfigError
from towerline.features.contracts import EVENT_COLUMNS, ITEM_COLUMNS, Dataset
from towerline.features.contracts import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA
from towerline.features.writers import SUFFIX, shard_path, to_arrow, write_table

log = logging.getLogger(__name__)

DEPARTMENTS: dict[str, tuple[str, ...]] = {
    "electronics": ("headphones", "speakers", "phones", "laptops", "cameras", "chargers"),
    "home": ("cookware", "bedding", "lighting", "storage", "furniture", "decor"),
    "fashion": ("shoes", "jackets", "jeans", "t-shirts", "bags", "watches"),
    "beauty": ("skincare", "makeup", "fragrance", "haircare", "nail-care", "shaving"),
    "sports": ("running", "cycling", "yoga", "camping", "fitness", "swimming"),
    "grocery": ("coffee", "tea", "snacks", "pasta", "spices", "chocolate"),
    "toys": ("puzzles", "board-games", "building-sets", "dolls", "plush", "outdoor-toys"),
    "books": ("fiction", "cookbooks", "travel", "science", "comics", "kids-books"),
}
SYNTHETIC_EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase")  # funnel order
CHANNELS: tuple[str, ...] = ("web", "app", "email")
COUNTRIES: tuple[str, ...] = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "PL", "SE", "JP")
AGE_BANDS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
_BRAND_HEADS = ("Nor", "Vel", "Zan", "Kor", "Lum", "Bri", "Ast", "Oro", "Fen", "Tal", "Mir", "Quo",
                "Sel", "Dra", "Hal", "Pen")
_BRAND_TAILS = ("vik", "ora", "tex", "well", "io", "ane", "ux", "ix", "ford", "mont", "ly", "sen",
                "gard", "ton", "ara", "os")

DAY = 86_400  # seconds


@dataclass(frozen=True)
class SyntheticParams:
    """The knobs of the generated shop; defaults give realistic-looking rates, not fitted ones."""

    events_per_user: int = 20          # default n_events = this * n_users
    zipf_exponent: float = 0.9         # item popularity weight = rank ** -exponent
    n_successors: int = 3              # "next items" per item (the learnable sequential signal)
    successor_weights: tuple[float, ...] = (0.55, 0.3, 0.15)  # which successor is followed
    successor_same_category: float = 0.75  # else another item of the same department
    follow_in_session: float = 0.65    # P(next touch follows a successor) inside a session
    follow_new_session: float = 0.3    # ... at the start of a new session
    global_jump: float = 0.15          # P(an independent draw ignores taste, uses global popularity)
    taste_categories: int = 4          # categories in a user's taste
    session_touches: float = 4.0       # mean touches (items looked at) per session
    p_click: float = 0.35              # P(click | view)
    p_cart: float = 0.35               # P(cart | click)
    p_purchase: float = 0.5            # P(purchase | cart)
    preexisting_users: float = 0.35    # share of users signed up before the period starts
    never_churn: float = 0.35          # share of users active until the period ends
    mean_lifetime: float = 0.7         # mean active life of churning users, as a share of the period
    consent: float = 0.95              # P(consent to personalisation)
    in_stock: float = 0.95             # P(item in stock)


def generate_dataset(
    n_users: int,
    n_items: int,
    seed: int = 0,
    *,
    n_events: int | None = None,
    start: str = "2025-01-01",
    months: int = 6,
    progress: bool = False,
) -> Dataset:
    """Generate a seeded synthetic shop: events, items and users in the canonical columns.

    Args:
        n_users: users in the ``users`` table (a few may have no events when ``n_events`` is small).
        n_items: items in the catalogue; every ``item_id`` in events is one of them.
        seed: the same seed gives identical frames; a different seed gives different ones.
        n_events: exact number of event rows; default ``20 * n_users``.
        start: first day of the period (ISO date, UTC).
        months: length of the period in calendar months.
        progress: show a progress bar over the generation stages (for the CLI and the benchmark).

    Returns:
        ``Dataset(name="synthetic")``. ``events`` is sorted by (user, timestamp); ``user_id``,
        ``item_id``, ``event_type`` and ``channel`` are ``Categorical``; ``timestamp`` is int64
        epoch seconds; ``value`` is NaN except on purchases. ``users`` has ``user_id``, ``consent``,
        ``signup_ts``, ``country`` and ``age_band``.

    Raises:
        ConfigError: a size or the period is impossible (the message names the argument).

    Example:
        >>> ds = generate_dataset(n_users=200, n_items=50, seed=1)
        >>> len(ds.events)
        4000
    """
    p = SyntheticParams()
    n_events, t0, t1 = _check_sizes(n_users, n_items, n_events, start, months, p)

    rng = np.random.default_rng(seed)
    bar = _progress(progress, total=5)
    with bar:
        items, cat_of_item, dept_of_cat, pop, price = _make_items(rng, n_items, p)
        _step(bar, "catalogue")
        users, user_codes, active_lo, active_hi, activity = _make_users(rng, n_users, t0, t1, p)
        _step(bar, "users")
        depth = _funnel_depths(rng, n_events, p)
        touch_user, touch_ts, session_id, channel_of_session, offsets = _make_touches(
            rng, depth, activity, active_lo, active_hi, p
        )
        _step(bar, "sessions")
        sampler, successors = _item_structure(rng, cat_of_item, dept_of_cat, pop, p)
        touch_item = _choose_items(
            rng, touch_user, touch_ts, session_id, active_lo, active_hi, cat_of_item, dept_of_cat,
            pop, p, sampler, successors,
        )
        _step(bar, "items")
        events = _make_events(
            rng, depth, touch_user, touch_item, touch_ts, session_id, channel_of_session,
            offsets, price, user_codes, items["item_id"], t0,
        )
        _step(bar, "events")
    log.info(
        "synthetic: %d events, %d users, %d items (seed %d)", len(events), n_users, n_items, seed
    )
    return Dataset(name="synthetic", events=events, items=items, users=users)


def generate_sharded(
    out_dir: str | Path,
    n_users: int,
    n_items: int,
    seed: int = 0,
    *,
    n_events: int | None = None,
    rows_per_shard: int = 1_000_000,
    format: Literal["parquet", "csv"] = "parquet",
    start: str = "2025-01-01",
    months: int = 6,
    progress: bool = False,
) -> dict[str, Any]:
    """Stream a synthetic shop of any size to disk: ``events/part-*.{parquet,csv}``, ``items.*``, ``users.*``.

    The same shop as ``generate_dataset`` in kind -- catalogue, users, successors (the sequential
    signal) and popularity are drawn once for the whole shop -- but the events are made for one block
    of about ``rows_per_shard / events_per_user`` users at a time and written as one shard, so memory
    is bounded by a block, not by the log (2M users x 20 events = 40M rows in ~1M-row shards). Users
    are contiguous across shards and each shard is sorted by (user, time), which is the layout
    ``towerline.features.ray_data`` reads. Not row-for-row the frames ``generate_dataset`` returns
    for the same seed (the random draws happen in another order); deterministic for a seed.

    Returns:
        ``{"events": rows written, "users", "items", "shards", "dir"}``.
    """
    p = SyntheticParams()
    n_events, t0, t1 = _check_sizes(n_users, n_items, n_events, start, months, p)
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out = Path(out_dir)
    (out / "events").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items, cat_of_item, dept_of_cat, pop, price = _make_items(rng, n_items, p)
    users, user_codes, active_lo, active_hi, activity = _make_users(rng, n_users, t0, t1, p)
    sampler, successors = _item_structure(rng, cat_of_item, dept_of_cat, pop, p)
    item_index = pd.Index(items["item_id"].array)
    write_table(to_arrow(items, ITEMS_SCHEMA), out / f"items{SUFFIX[format]}", format)
    write_table(to_arrow(users, USERS_SCHEMA), out / f"users{SUFFIX[format]}", format)
    del users

    block = max(1, int(rows_per_shard * n_users / max(n_events, 1)))
    id_width = len(str(max(n_events - 1, 0)))
    written = shards = 0
    bar = _progress(progress, total=-(-n_users // block))
    with bar:
        for lo in range(0, n_users, block):
            hi = min(n_users, lo + block)
            n_block = round(n_events * hi / n_users) - round(n_events * lo / n_users)  # sums to n_events
            if n_block:
                depth = _funnel_depths(rng, n_block, p)
                touch_user, touch_ts, session_id, channel_of_session, offsets = _make_touches(
                    rng, depth, activity[lo:hi], active_lo[lo:hi], active_hi[lo:hi], p
                )
                touch_item = _choose_items(
                    rng, touch_user, touch_ts, session_id, active_lo[lo:hi], active_hi[lo:hi], cat_of_item,
                    dept_of_cat, pop, p, sampler, successors,
                )
                events = _make_events(
                    rng, depth, touch_user, touch_item, touch_ts, session_id, channel_of_session, offsets,
                    price, user_codes[lo:hi], item_index, t0, first_event=written, id_width=id_width,
                )
                write_table(to_arrow(events, EVENTS_SCHEMA), shard_path(out, shards, format), format)
                written += len(events)
                shards += 1
                log.debug("synthetic shard %d: users %d-%d, %d events", shards - 1, lo, hi - 1, len(events))
            _step(bar, f"{written:,} events")
    log.info("synthetic (sharded): %d events in %d shards, %d users, %d items (seed %d) in %s",
             written, shards, n_users, n_items, seed, out)
    return {"events": written, "users": n_users, "items": n_items, "shards": shards, "dir": str(out)}


def _check_sizes(
    n_users: int, n_items: int, n_events: int | None, start: str, months: int, p: SyntheticParams
) -> tuple[int, int, int]:
    """Validated (n_events, period start, period end) of a generator's arguments (both generators check alike)."""
    if n_users < 1:
        raise ConfigError(f"n_users must be >= 1, got {n_users}")
    if n_items < 2:
        raise ConfigError(f"n_items must be >= 2 (items need successors), got {n_items}")
    if months < 1:
        raise ConfigError(f"months must be >= 1, got {months}")
    n_events = p.events_per_user * n_users if n_events is None else int(n_events)
    if n_events < 0:
        raise ConfigError(f"n_events must be >= 0, got {n_events}")
    try:
        t0_ts = pd.Timestamp(start, tz="UTC")
    except ValueError as e:
        raise ConfigError(f"start must be an ISO date such as 2025-01-01, got {start!r}") from e
    return n_events, int(t0_ts.timestamp()), int((t0_ts + pd.DateOffset(months=months)).timestamp())


# ----------------------------------------------------------------------------------------------
# catalogue


def _make_items(
    rng: np.random.Generator, n_items: int, p: SyntheticParams
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items table plus category per item, department per category, popularity and price per item."""
    # Categories interleaved across departments, so a small catalogue still spans departments.
    cats = [(d, c) for j in range(6) for d, cs in DEPARTMENTS.items() for c in cs[j : j + 1]]
    n_cat = int(np.clip(n_items // 5, 1, len(cats)))
    cats = cats[:n_cat]
    dept_names = sorted({d for d, _ in cats})
    dept_of_cat = np.array([dept_names.index(d) for d, _ in cats])

    # Every category gets an item, the rest follow uneven category sizes.
    cat_size = rng.dirichlet(np.full(n_cat, 2.0))
    cat_of_item = np.concatenate(
        [np.arange(n_cat), rng.choice(n_cat, size=n_items - n_cat, p=cat_size)]
    )
    rng.shuffle(cat_of_item)

    # Zipf-like popularity over a random ranking of the catalogue.
    rank = rng.permutation(n_items) + 1
    pop = rank.astype(np.float64) ** -p.zipf_exponent

    # Brands: each sells in one category; a few big brands per category (Zipf over brands).
    per_cat = int(np.clip(n_items // (n_cat * 25), 2, 40))
    brand_rank = np.arange(1, per_cat + 1, dtype=np.float64) ** -1.0
    brand_local = rng.choice(per_cat, size=n_items, p=brand_rank / brand_rank.sum())
    brand_of_item = cat_of_item * per_cat + brand_local
    brand_names = _brand_names(n_cat * per_cat)

    # Log-normal prices: category level, brand premium, item noise; shop-style .99 endings.
    cat_mu = rng.uniform(np.log(4.0), np.log(300.0), size=n_cat)
    brand_premium = rng.normal(0.0, 0.3, size=n_cat * per_cat)
    log_price = cat_mu[cat_of_item] + brand_premium[brand_of_item] + rng.normal(0, 0.4, n_items)
    price = np.floor(np.exp(log_price)) + 0.99
    band = np.searchsorted(np.quantile(price, [0.2, 0.4, 0.6, 0.8]), price, side="right") + 1

    in_stock = rng.random(n_items) < p.in_stock
    item_ids = _ids("i", n_items, width=5)
    cat_names = [c for _, c in cats]
    attributes = [
        [f"department:{dept_names[dept_of_cat[c]]}", f"category:{cat_names[c]}",
         f"brand:{brand_names[b].lower()}", f"price_band:{pb}"]
        for c, b, pb in zip(cat_of_item.tolist(), brand_of_item.tolist(), band.tolist())
    ]
    titles = [
        f"{brand_names[b]} {cat_names[c]} {i:05d}"
        for i, (c, b) in enumerate(zip(cat_of_item.tolist(), brand_of_item.tolist()))
    ]
    items = pd.DataFrame(
        {
            "item_id": pd.array(item_ids, dtype="str"),
            "attributes": attributes,
            "price": price,
            "in_stock": in_stock,
            "title": pd.array(titles, dtype="str"),
        },
        columns=ITEM_COLUMNS,
    )
    return items, cat_of_item, dept_of_cat, pop, price


def _brand_names(n: int) -> list[str]:
    """Pronounceable, deterministic brand names ("Norvik", "Velora", ..., "Norvik 2", ...)."""
    base = [h + t for h in _BRAND_HEADS for t in _BRAND_TAILS]
    return [base[i % len(base)] + ("" if i < len(base) else f" {i // len(base) + 1}") for i in range(n)]


# ----------------------------------------------------------------------------------------------
# users


def _make_users(
    rng: np.random.Generator, n_users: int, t0: int, t1: int, p: SyntheticParams
) -> tuple[pd.DataFrame, pd.Index, np.ndarray, np.ndarray, np.ndarray]:
    """Users table plus (user ids, active-window start, end, activity weight) per user."""
    period = t1 - t0
    pre = rng.random(n_users) < p.preexisting_users
    signup = np.where(
        pre,
        t0 - rng.integers(DAY, 365 * DAY, size=n_users),
        t0 + (rng.random(n_users) * (period - 2 * DAY)).astype(np.int64),
    )
    active_lo = np.maximum(signup, t0)
    lifetime = rng.exponential(p.mean_lifetime * period, size=n_users)
    lifetime[rng.random(n_users) < p.never_churn] = np.inf
    active_hi = np.minimum(active_lo + np.maximum(lifetime, 2 * DAY), t1).astype(np.int64)
    activity = rng.lognormal(0.0, 1.0, size=n_users)

    user_codes = pd.Index(_ids("u", n_users, width=6), dtype="str")
    users = pd.DataFrame(
        {
            "user_id": user_codes.array,
            "consent": rng.random(n_users) < p.consent,
            "signup_ts": signup.astype(np.int64),
            "country": pd.Categorical.from_codes(
                rng.choice(len(COUNTRIES), n_users, p=_normalise(np.arange(len(COUNTRIES), 0, -1))),
                categories=list(COUNTRIES),
            ),
            "age_band": pd.Categorical.from_codes(
                rng.choice(len(AGE_BANDS), n_users, p=_normalise(np.array([3, 6, 5, 4, 2, 1.0]))),
                categories=list(AGE_BANDS),
            ),
        }
    )
    return users, user_codes, active_lo, active_hi, activity


# ----------------------------------------------------------------------------------------------
# touches, sessions, timestamps


def _funnel_depths(rng: np.random.Generator, n_events: int, p: SyntheticParams) -> np.ndarray:
    """Funnel depth (1 = view .. 4 = purchase) per touch, summing to exactly ``n_events``.

    Depths do not depend on the item, so they are drawn first and the last touch is cut short to
    hit the requested row count.
    """
    per_touch = 1 + p.p_click * (1 + p.p_cart * (1 + p.p_purchase))
    chunks: list[np.ndarray] = []
    total = 0
    while total < n_events:
        n = int((n_events - total) / per_touch * 1.05) + 16
        u = rng.random((n, 3))
        d = 1 + (u[:, 0] < p.p_click).astype(np.int8)
        d += (d == 2) & (u[:, 1] < p.p_cart)
        d += (d == 3) & (u[:, 2] < p.p_purchase)
        chunks.append(d)
        total += int(d.sum(dtype=np.int64))
    depth = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int8)
    cum = np.cumsum(depth, dtype=np.int64)
    n_touches = int(np.searchsorted(cum, n_events)) + 1 if n_events else 0
    depth = depth[:n_touches].copy()
    if n_touches:
        depth[-1] -= cum[n_touches - 1] - n_events
    return depth


def _make_touches(
    rng: np.random.Generator,
    depth: np.ndarray,
    activity: np.ndarray,
    active_lo: np.ndarray,
    active_hi: np.ndarray,
    p: SyntheticParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Assign touches to users and sessions and give each a timestamp.

    Returns (user per touch, timestamp per touch, session per touch, channel per session,
    funnel offsets per touch ``(M, 4)`` in seconds after the view).
    """
    n_touches, n_users = len(depth), len(activity)
    # Touches per user: a floor of 3 (so leave-one-out has something to split) when there are
    # enough, the rest in proportion to activity x length of the active window.
    floor = min(3, n_touches // n_users)
    weight = activity * (active_hi - active_lo)
    counts = floor + rng.multinomial(n_touches - floor * n_users, weight / weight.sum())
    touch_user = np.repeat(np.arange(n_users, dtype=np.int32), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(n_touches) - first[touch_user]

    # Sessions: a user's touches split with geometric session lengths.
    new_session = (pos == 0) | (rng.random(n_touches) < 1.0 / p.session_touches)
    session_id = np.cumsum(new_session) - 1
    session_first = np.flatnonzero(new_session)
    session_user = touch_user[session_first]
    n_sessions = len(session_first)
    # Session starts uniform over the user's active window, in order: sorting user + u (u < 1)
    # sorts within each user's contiguous block.
    u = np.sort(session_user + rng.random(n_sessions)) - session_user
    span = np.maximum(active_hi - active_lo - 3 * 3600, 3600)[session_user]
    session_ts = active_lo[session_user] + (u * span).astype(np.int64)
    channel_of_session = rng.choice(len(CHANNELS), n_sessions, p=[0.55, 0.35, 0.10]).astype(np.int8)

    # Funnel offsets after the view: click, cart and purchase follow within minutes.
    gaps = np.stack(
        [
            2 + rng.exponential(10.0, n_touches),
            3 + rng.exponential(20.0, n_touches),
            10 + rng.exponential(60.0, n_touches),
        ],
        axis=1,
    ).astype(np.int32)  # (M, 3)
    offsets = np.zeros((n_touches, 4), dtype=np.int32)  # (M, 4): view at 0
    np.cumsum(gaps, axis=1, out=offsets[:, 1:])
    funnel_span = offsets[np.arange(n_touches), depth.astype(np.intp) - 1]
    # Time spent on a touch = its funnel plus browsing; touches follow each other in a session.
    dur = funnel_span.astype(np.int64) + 5 + rng.exponential(50.0, n_touches).astype(np.int64)
    before = np.cumsum(dur) - dur  # exclusive cumsum over all touches
    touch_ts = session_ts[session_id] + before - before[session_first][session_id]
    return touch_user, touch_ts, session_id, channel_of_session, offsets


# ----------------------------------------------------------------------------------------------
# which item each touch looks at


def _item_structure(
    rng: np.random.Generator, cat_of_item: np.ndarray, dept_of_cat: np.ndarray, pop: np.ndarray, p: SyntheticParams
) -> tuple["_BlockSampler", np.ndarray]:
    """The catalogue's popularity sampler and ``(I, K)`` successors: drawn once per shop, shared by
    every block of users when the shop is generated in blocks (``generate_sharded``)."""
    sampler = _BlockSampler(cat_of_item, dept_of_cat[cat_of_item], pop)
    # Successors lean less on popularity (square root), so chains spread over the catalogue.
    succ_sampler = _BlockSampler(cat_of_item, dept_of_cat[cat_of_item], np.sqrt(pop))
    successors = _make_successors(rng, succ_sampler, cat_of_item, dept_of_cat, p)  # (I, K)
    return sampler, successors


def _choose_items(
    rng: np.random.Generator,
    touch_user: np.ndarray,
    touch_ts: np.ndarray,
    session_id: np.ndarray,
    active_lo: np.ndarray,
    active_hi: np.ndarray,
    cat_of_item: np.ndarray,
    dept_of_cat: np.ndarray,
    pop: np.ndarray,
    p: SyntheticParams,
    sampler: "_BlockSampler",
    successors: np.ndarray,
) -> np.ndarray:
    """Item per touch: follow a successor of the previous item, or draw from (drifting) taste."""
    n_touches, n_users = len(touch_user), len(active_lo)
    n_cat = len(dept_of_cat)

    # Follow or jump. The first touch of a user always jumps.
    new_user = np.ones(n_touches, dtype=bool)
    new_user[1:] = touch_user[1:] != touch_user[:-1]
    new_session = np.ones(n_touches, dtype=bool)
    new_session[1:] = session_id[1:] != session_id[:-1]
    p_follow = np.where(new_session, p.follow_new_session, p.follow_in_session)
    follow = (rng.random(n_touches) < p_follow) & ~new_user

    # Independent draws: global popularity, or a category from the user's current taste.
    jumps = np.flatnonzero(~follow)
    item = np.empty(n_touches, dtype=np.int32)
    cat_pop = np.bincount(cat_of_item, weights=pop, minlength=n_cat)
    fav = rng.choice(n_cat, size=(n_users, p.taste_categories), p=cat_pop / cat_pop.sum())
    alpha = np.full(p.taste_categories, 0.8)
    w_start = rng.dirichlet(alpha, size=n_users).astype(np.float32)  # (U, F)
    w_end = rng.dirichlet(alpha, size=n_users).astype(np.float32)  # (U, F)
    ju = touch_user[jumps]
    life = (touch_ts[jumps] - active_lo[ju]) / np.maximum(active_hi[ju] - active_lo[ju], 1)
    f = np.clip(life, 0.0, 1.0).astype(np.float32)[:, None]  # (J, 1)
    taste = np.cumsum((1 - f) * w_start[ju] + f * w_end[ju], axis=1)  # (J, F)
    pick = (rng.random(len(jumps), dtype=np.float32)[:, None] * taste[:, -1:] > taste).sum(axis=1)
    pick = np.minimum(pick, p.taste_categories - 1)
    cat = fav[ju, pick]
    item[jumps] = sampler.in_category(rng, cat)
    glob = rng.random(len(jumps)) < p.global_jump
    item[jumps[glob]] = sampler.anywhere(rng, int(glob.sum()))

    # Follows: resolve in order of "run position" (follows since the last jump), so each pass
    # reads previous items that are already known.
    if len(jumps) < n_touches:
        idx = np.arange(n_touches)
        last_jump = np.maximum.accumulate(np.where(follow, 0, idx))
        run = (idx - last_jump).astype(np.int32)
        order = np.argsort(run, kind="stable")
        bounds = np.searchsorted(run[order], np.arange(1, int(run.max()) + 2))
        w = np.asarray(p.successor_weights, dtype=np.float64)
        which = rng.choice(p.n_successors, size=n_touches, p=w / w.sum())
        for k in range(1, int(run.max()) + 1):
            at = order[bounds[k - 1] : bounds[k]]
            item[at] = successors[item[at - 1], which[at]]

    # An independent draw can land on the item just looked at; such a repeat (folded away by
    # sequence building anyway) becomes a successor instead, so short histories stay usable.
    # A few passes settle runs such as A A A (A B B, then A B C).
    for attempt in range(8):
        repeat = np.flatnonzero(~new_user[1:] & (item[1:] == item[:-1])) + 1
        if not len(repeat):
            break
        item[repeat] = successors[item[repeat - 1], attempt % p.n_successors]
    return item


class _BlockSampler:
    """Draw items by popularity from the whole catalogue, one category or one department.

    Items are ordered by (department, category) so both groups are contiguous blocks of one
    cumulative-weight array; a draw is one ``searchsorted`` inside the block's weight range.
    """

    def __init__(self, cat_of_item: np.ndarray, dept_of_item: np.ndarray, weight: np.ndarray):
        self.order = np.lexsort((cat_of_item, dept_of_item))
        self.position = np.empty_like(self.order)  # inverse of order: item -> sorted position
        self.position[self.order] = np.arange(len(self.order))
        self.cum = np.cumsum(weight[self.order])  # (I,)
        self.n = len(weight)
        cat_sorted = cat_of_item[self.order]
        dept_sorted = dept_of_item[self.order]
        self.cat_lo, self.cat_hi = _block_bounds(cat_sorted, int(cat_of_item.max()) + 1)
        self.dept_lo, self.dept_hi = _block_bounds(dept_sorted, int(dept_of_item.max()) + 1)

    def anywhere(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self._draw(rng, np.zeros(n, dtype=np.int64), np.full(n, self.n, dtype=np.int64))

    def in_category(self, rng: np.random.Generator, cat: np.ndarray) -> np.ndarray:
        return self._draw(rng, self.cat_lo[cat], self.cat_hi[cat])

    def in_department(self, rng: np.random.Generator, dept: np.ndarray) -> np.ndarray:
        return self._draw(rng, self.dept_lo[dept], self.dept_hi[dept])

    def _draw(self, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """One item per row from sorted positions ``[lo, hi)``, weighted."""
        base = np.where(lo > 0, self.cum[np.maximum(lo - 1, 0)], 0.0)
        top = self.cum[hi - 1]
        target = base + rng.random(len(lo)) * (top - base)
        at = np.clip(np.searchsorted(self.cum, target, side="right"), lo, hi - 1)
        return self.order[at].astype(np.int32)


def _block_bounds(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``[lo, hi)`` positions of each key 0..n-1 in ``keys``, where equal keys are contiguous."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    lo, hi = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    lo[keys[starts]] = starts
    hi[keys[starts]] = np.r_[starts[1:], len(keys)]
    return lo, hi


def _make_successors(
    rng: np.random.Generator,
    sampler: _BlockSampler,
    cat_of_item: np.ndarray,
    dept_of_cat: np.ndarray,
    p: SyntheticParams,
) -> np.ndarray:
    """``(I, K)`` successor items: complements in the same category, else in the department."""
    n_items, k = len(cat_of_item), p.n_successors
    cat = np.repeat(cat_of_item, k)
    same = rng.random(n_items * k) < p.successor_same_category
    succ = np.empty(n_items * k, dtype=np.int32)
    succ[same] = sampler.in_category(rng, cat[same])
    succ[~same] = sampler.in_department(rng, dept_of_cat[cat[~same]])
    # An item is not its own successor: take another item of its category, drawn uniformly
    # (offset 1..size-1 from its own sorted position), or the next item of the catalogue when
    # it is alone in its category.
    own = np.repeat(np.arange(n_items), k)
    self_loop = np.flatnonzero(succ == own)
    lo, hi = sampler.cat_lo[cat[self_loop]], sampler.cat_hi[cat[self_loop]]
    size = hi - lo
    shift = 1 + (rng.random(len(self_loop)) * np.maximum(size - 1, 1)).astype(np.int64)
    at = lo + (sampler.position[own[self_loop]] - lo + shift) % size
    succ[self_loop] = np.where(size > 1, sampler.order[at], (own[self_loop] + 1) % n_items)
    return succ.reshape(n_items, k)


# ----------------------------------------------------------------------------------------------
# events


def _make_events(
    rng: np.random.Generator,
    depth: np.ndarray,
    touch_user: np.ndarray,
    touch_item: np.ndarray,
    touch_ts: np.ndarray,
    session_id: np.ndarray,
    channel_of_session: np.ndarray,
    offsets: np.ndarray,
    price: np.ndarray,
    user_codes: pd.Index,
    item_ids: pd.Series | pd.Index,
    t0: int,
    first_event: int = 0,
    id_width: int | None = None,
) -> pd.DataFrame:
    """Expand touches into funnel events (view, click, cart, purchase) in canonical columns.

    ``first_event``/``id_width``: event ids continue a numbering started by earlier blocks."""
    n_touches = len(depth)
    ev_touch = np.repeat(np.arange(n_touches, dtype=np.int32), depth)  # (E,)
    first = np.cumsum(depth, dtype=np.int64) - depth
    stage = (np.arange(len(ev_touch)) - first[ev_touch]).astype(np.int8)  # 0 view .. 3 purchase
    user = touch_user[ev_touch]
    ts = touch_ts[ev_touch] + offsets[ev_touch, stage]
    # Sessions of one user may overlap; sort by (user, time) only when they do.
    key = (user.astype(np.int64) << 34) | (ts - (t0 - 400 * DAY))
    if len(key) > 1 and bool(np.any(key[1:] < key[:-1])):
        order = np.argsort(key, kind="stable")
        ev_touch, stage, user, ts = ev_touch[order], stage[order], user[order], ts[order]
    del key
    item = touch_item[ev_touch]

    is_purchase = stage == 3
    quantity = np.minimum(rng.geometric(0.75, size=int(is_purchase.sum())), 5)
    value = np.full(len(ev_touch), np.nan)
    value[is_purchase] = np.round(price[item[is_purchase]] * quantity, 2)

    n_events = len(ev_touch)
    width = id_width if id_width is not None else len(str(max(n_events - 1, 0)))
    event_id = _ids("e", n_events, width=width, first=first_event)
    item_index = item_ids if isinstance(item_ids, pd.Index) else pd.Index(item_ids.array)
    return pd.DataFrame(
        {
            "user_id": pd.Categorical.from_codes(user, categories=user_codes),
            "item_id": pd.Categorical.from_codes(item, categories=item_index),
            "timestamp": ts.astype(np.int64),
            "event_type": pd.Categorical.from_codes(stage, categories=list(SYNTHETIC_EVENT_TYPES)),
            "value": value,
            "event_id": pd.array(event_id, dtype="str"),
            "channel": pd.Categorical.from_codes(
                channel_of_session[session_id[ev_touch]], categories=list(CHANNELS)
            ),
        },
        columns=EVENT_COLUMNS,
    )


# ----------------------------------------------------------------------------------------------
# helpers


def _ids(prefix: str, n: int, width: int, first: int = 0) -> pa.ChunkedArray | pa.Array:
    """``prefix`` + zero-padded first..first+n-1 as an Arrow string array (vectorised, no Python strings)."""
    digits = pc.cast(pa.array(np.arange(first, first + n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(digits, width, padding="0"), "")


def _normalise(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def _progress(enabled: bool, total: int):
    if not enabled:
        return nullcontext()
    from tqdm import tqdm  # plain text bar: tqdm.auto warns in kernels without ipywidgets

    return tqdm(total=total, desc="synthetic data", unit="step")


def _step(bar, name: str) -> None:
    log.debug("synthetic: %s done", name)
    if hasattr(bar, "update"):
        bar.set_postfix_str(name)
        bar.update(1)
