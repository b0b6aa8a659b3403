"""Marketer heuristics for audiences on a hand-built log whose answers can be read off."""

from __future__ import annotations

import numpy as np
import pytest
from towerline.marketing.audience_baselines import (
    affinity_scores,
    attribute_matrix,
    covisitation_matrix,
    covisitation_scores,
    recency_matrix,
    top_users,
)

# items: 0 lipstick (category:lips, brand:a), 1 gloss (category:lips, brand:b), 2 shampoo (category:hair, brand:a),
#        3 conditioner (category:hair, brand:c), 4 comb (no attributes)
ATTRS = [["category:lips", "brand:a"], ["category:lips", "brand:b"], ["category:hair", "brand:a"],
         ["category:hair", "brand:c"], []]
# users (time order):  u0: 2 3 2     u1: 0 1       u2: 3 4 4 4 4     u3: 1 (long ago) then 2 3 3 3
HIST = [[2, 3, 2], [0, 1], [3, 4, 4, 4, 4], [1, 2, 3, 3, 3]]


def _csr(hist):
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hist])])
    return offsets, np.concatenate(hist)


def test_recency_weights_halve_every_half_life_and_stop_at_recent():
    offsets, items = _csr(HIST)
    W = recency_matrix(offsets, items, 5, recent=3, half_life=1.0).toarray()
    assert W[1, 1] == 1.0 and W[1, 0] == 0.5  # newest = 1, one step back = 0.5
    assert W[0, 2] == pytest.approx(1.0 + 0.25)  # item 2 at the newest and two steps back
    assert W[3, 1] == 0.0 and W[3, 2] == 0.0  # older than the last 3 steps


def test_affinity_ranks_users_by_recent_interest_in_the_category_or_brand():
    offsets, items = _csr(HIST)
    W = recency_matrix(offsets, items, 5, recent=20, half_life=2.0)
    A, tokens = attribute_matrix(ATTRS)
    assert tokens == ["category:lips", "brand:a", "brand:b", "category:hair", "brand:c"]
    s = affinity_scores(W, A, item=0)  # lipstick: lips or brand a
    assert s[1] > s[0] > 0 and s[2] == 0  # u1 bought lips twice just now; u0 only brand a (shampoo); u2 neither
    weighted, _ = attribute_matrix(ATTRS, idf=True)
    assert weighted[0, 0] == pytest.approx(np.log(5 / 2))  # 2 of 5 items are lips
    hair_only, _ = attribute_matrix(ATTRS, prefixes=["category:"])
    assert affinity_scores(W, hair_only, item=0)[0] == 0  # brand a no longer counts


def test_covisitation_counts_pairs_within_the_window_and_normalises_by_popularity():
    offsets, items = _csr(HIST)
    raw = covisitation_matrix(offsets, items, 5, window=1, normalise=False).toarray()
    assert raw[2, 3] == 3 and raw[3, 2] == 3  # u0: 2-3 and 3-2; u3: 2-3
    assert raw[0, 1] == 1 and raw[1, 2] == 1 and raw[0, 2] == 0 and np.all(np.diag(raw) == 0)
    wide = covisitation_matrix(offsets, items, 5, window=2, normalise=False).toarray()
    assert wide[0, 2] == 0 and wide[3, 4] == 2  # u2: 3-4 at distance 1 and 2
    cos = covisitation_matrix(offsets, items, 5, window=1).toarray()
    n = np.bincount(items, minlength=5)
    assert cos[2, 3] == pytest.approx(3 / np.sqrt(n[2] * n[3]))


def test_covisitation_audience_finds_users_whose_items_go_with_the_target():
    offsets, items = _csr(HIST)
    W = recency_matrix(offsets, items, 5)
    C = covisitation_matrix(offsets, items, 5, window=1)
    s = covisitation_scores(W, C, item=0)  # lipstick goes with gloss (u1's and u3's item)
    assert s[1] > 0 and s[3] > 0 and s[0] == 0 and s[2] == 0
    picked = top_users(s, 2, exclude=np.array([False, True, False, False]), activity=np.diff(offsets))
    assert picked[0] == 3 and 1 not in picked  # u1 already has the lipstick: excluded


def test_top_users_breaks_ties_by_activity():
    picked = top_users(np.array([0.0, 0.0, 1.0, 0.0]), 3, activity=np.array([5, 9, 1, 2]))
    assert picked.tolist() == [2, 1, 0]
