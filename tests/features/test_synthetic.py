"""The synthetic shop: deterministic, in contract, shaped like a shop, and learnable.

Speed is not asserted here; bench/data_scale.py holds it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from towerline.errors import ConfigError
from towerline.features.contracts import (
    EVENT_COLUMNS,
    EVENT_TYPES,
    EVENTS_SCHEMA,
    ITEM_COLUMNS,
    ITEMS_SCHEMA,
    USER_COLUMNS,
)
from towerline.features.synthetic import generate_dataset

N_USERS, N_ITEMS = 2000, 500


@pytest.fixture(scope="module")
def shop():
    return generate_dataset(N_USERS, N_ITEMS, seed=7)


def test_same_seed_gives_identical_frames(shop):
    again = generate_dataset(N_USERS, N_ITEMS, seed=7)
    pd.testing.assert_frame_equal(shop.events, again.events)
    pd.testing.assert_frame_equal(shop.items, again.items)
    pd.testing.assert_frame_equal(shop.users, again.users)


def test_different_seed_gives_different_frames(shop):
    other = generate_dataset(N_USERS, N_ITEMS, seed=8)
    assert not shop.events["item_id"].astype(str).equals(other.events["item_id"].astype(str))
    assert not shop.events["timestamp"].equals(other.events["timestamp"])
    assert not np.array_equal(shop.items["price"].to_numpy(), other.items["price"].to_numpy())


def test_event_count_is_exactly_the_requested_one():
    for n_events in (0, 1, 999, 12_345):
        ds = generate_dataset(300, 40, seed=1, n_events=n_events)
        assert len(ds.events) == n_events
        assert list(ds.events.columns) == EVENT_COLUMNS


def test_default_event_count_is_twenty_per_user(shop):
    assert len(shop.events) == 20 * N_USERS


def test_tables_match_the_contract(shop):
    ev, items, users = shop.events, shop.items, shop.users
    assert shop.name == "synthetic"
    assert list(ev.columns) == EVENT_COLUMNS
    assert list(items.columns) == ITEM_COLUMNS
    assert list(users.columns[: len(USER_COLUMNS)]) == USER_COLUMNS
    for col in ("user_id", "item_id", "event_type", "channel"):
        assert isinstance(ev[col].dtype, pd.CategoricalDtype), col
        assert all(isinstance(c, str) for c in ev[col].cat.categories[:5]), col
    assert ev["timestamp"].dtype == np.int64
    assert ev["value"].dtype == np.float64
    assert set(ev["event_type"].unique()) <= set(EVENT_TYPES)
    assert ev["event_id"].is_unique and ev["event_id"].notna().all()
    assert set(ev["channel"].unique()) == {"web", "app", "email"}
    assert users["consent"].dtype == bool and users["user_id"].is_unique
    assert items["in_stock"].dtype == bool and items["item_id"].is_unique
    # The Arrow schemas the Parquet writer uses accept the frames as they are.
    pa.Table.from_pandas(ev, preserve_index=False).cast(EVENTS_SCHEMA)
    pa.Table.from_pandas(items, preserve_index=False).cast(ITEMS_SCHEMA)


def test_items_carry_category_brand_and_price_tokens(shop):
    items = shop.items
    for attrs in items["attributes"]:
        prefixes = sorted(token.split(":")[0] for token in attrs)
        assert prefixes == ["brand", "category", "department", "price_band"], attrs
    categories = {t for attrs in items["attributes"] for t in attrs if t.startswith("category:")}
    assert 20 <= len(categories) <= 50
    assert (items["price"] > 0).all()
    assert 0.85 < items["in_stock"].mean() < 1.0
    assert items["title"].str.len().min() > 5


def test_every_event_references_a_known_item_and_user(shop):
    ev = shop.events
    assert set(ev["item_id"].astype(str).unique()) <= set(shop.items["item_id"])
    assert set(ev["user_id"].astype(str).unique()) <= set(shop.users["user_id"])


def test_events_are_sorted_by_user_then_time_inside_the_period(shop):
    ev = shop.events
    user = ev["user_id"].cat.codes.to_numpy()
    ts = ev["timestamp"].to_numpy()
    same_user = user[1:] == user[:-1]
    assert (np.diff(user) >= 0).all()
    assert (ts[1:][same_user] >= ts[:-1][same_user]).all()
    start = pd.Timestamp("2025-01-01", tz="UTC").timestamp()
    end = pd.Timestamp("2025-07-01", tz="UTC").timestamp()
    assert ts.min() >= start and ts.max() <= end + 86_400


def test_funnel_rates_decrease_from_views_to_purchases(shop):
    counts = shop.events["event_type"].value_counts()
    assert counts["view"] > counts["click"] > counts["cart"] > counts["purchase"] > 0
    # Per user and item, nobody buys more often than they carted, carts more than clicked...
    per_pair = shop.events.groupby(["user_id", "item_id", "event_type"], observed=True).size()
    wide = per_pair.unstack("event_type", fill_value=0)
    assert (wide["purchase"] <= wide["cart"]).all()
    assert (wide["cart"] <= wide["click"]).all()
    assert (wide["click"] <= wide["view"]).all()


def test_purchases_carry_price_times_quantity_and_others_no_value(shop):
    ev = shop.events
    bought = ev["event_type"] == "purchase"
    assert (ev.loc[bought, "value"] > 0).all()
    assert ev.loc[~bought, "value"].isna().all()
    price = shop.items.set_index("item_id")["price"]
    quantity = ev.loc[bought, "value"].to_numpy() / price[ev.loc[bought, "item_id"].astype(str)].to_numpy()
    np.testing.assert_allclose(quantity, np.round(quantity), atol=1e-6)
    assert set(np.round(quantity).astype(int)) <= {1, 2, 3, 4, 5}


def test_item_popularity_is_heavy_tailed(shop):
    counts = np.sort(shop.events["item_id"].value_counts().to_numpy())[::-1]
    top_tenth = counts[: N_ITEMS // 10].sum() / counts.sum()
    assert top_tenth > 0.3  # uniform would give 0.1
    assert counts[-1] < counts[0] / 20


def test_users_arrive_and_churn_throughout_the_period(shop):
    ev = shop.events
    month = pd.to_datetime(ev["timestamp"], unit="s").dt.month
    per_user = pd.DataFrame({"user": ev["user_id"].cat.codes, "month": month}).groupby("user")["month"]
    first, last = per_user.min(), per_user.max()
    assert set(first.unique()) == {1, 2, 3, 4, 5, 6}  # newcomers arrive every month
    assert (first > 3).mean() > 0.15
    assert (last < 5).mean() > 0.15  # churned: silent for the last two months
    signup = pd.to_datetime(shop.users["signup_ts"], unit="s")
    assert (signup < pd.Timestamp("2025-01-01")).mean() > 0.2  # customers from before the period


def test_most_users_consent(shop):
    assert 0.9 < shop.users["consent"].mean() < 0.99


def test_views_rarely_repeat_the_item_just_viewed(shop):
    """Back-to-back views of one item fold into one sequence step; the generator avoids them so a
    user with three touches keeps three steps (and a leave-one-out target)."""
    views = shop.events[shop.events["event_type"] == "view"]
    user = views["user_id"].cat.codes.to_numpy()
    item = views["item_id"].cat.codes.to_numpy()
    repeats = ((user[1:] == user[:-1]) & (item[1:] == item[:-1])).sum()
    assert repeats <= 0.002 * len(views)
    assert views.groupby("user_id", observed=True).size().min() >= 3


def test_markov_successor_predictor_beats_popularity_on_next_item():
    """The planted sequential signal: "most frequent successor of the previous item" (first-order
    Markov, fitted on all but each user's last view) must beat "most popular" on the last one."""
    ds = generate_dataset(N_USERS, 1000, seed=3)
    views = ds.events[ds.events["event_type"] == "view"]
    user = views["user_id"].cat.codes.to_numpy()
    item = views["item_id"].cat.codes.to_numpy()
    same_user = np.r_[False, user[1:] == user[:-1]]
    is_last = np.r_[user[1:] != user[:-1], True]
    prev = np.r_[-1, item[:-1]]
    train, test = same_user & ~is_last, same_user & is_last

    pairs = pd.DataFrame({"prev": prev[train], "next": item[train]})
    counts = pairs.groupby(["prev", "next"]).size().rename("n").reset_index()
    counts = counts.sort_values(["prev", "n"], ascending=[True, False]).groupby("prev").head(10)
    successors = counts.groupby("prev")["next"].apply(set).to_dict()
    popular = set(pd.Series(item[~is_last]).value_counts().index[:10])

    held_prev, held_next = prev[test], item[test]
    hr_markov = np.mean([n in successors.get(p, ()) for p, n in zip(held_prev, held_next)])
    hr_popular = np.mean([n in popular for n in held_next])
    assert len(held_next) > 1500
    assert hr_markov > 2 * hr_popular and hr_markov > hr_popular + 0.25, (hr_markov, hr_popular)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_users": 0, "n_items": 10}, "n_users"),
        ({"n_users": 10, "n_items": 1}, "n_items"),
        ({"n_users": 10, "n_items": 10, "n_events": -1}, "n_events"),
        ({"n_users": 10, "n_items": 10, "months": 0}, "months"),
        ({"n_users": 10, "n_items": 10, "start": "someday"}, "start"),
    ],
)
def test_impossible_arguments_raise_config_error_naming_them(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        generate_dataset(**kwargs)
