"""serving/rules.py: banning, category caps and popular fill, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd

from towerline.features.vocab import PAD_IDX, UNK_IDX, Vocab
from towerline.serving.rules import banned_mask, category_of, fill_popular, item_facts, select

V = 10  # item indices 0..9; 0/1 reserved


def test_reserved_items_are_always_banned():
    banned = banned_mask(V)
    assert banned[PAD_IDX] and banned[UNK_IDX]
    assert not banned[2:].any()


def test_seen_blocked_excluded_and_out_of_stock_are_banned():
    in_stock = np.ones(V, dtype=bool)
    in_stock[7] = False
    banned = banned_mask(V, in_stock=in_stock, blocked=[3], seen=[4, 4], exclude=[5, 99, -1])
    assert np.flatnonzero(banned).tolist() == [0, 1, 3, 4, 5, 7]


def test_select_drops_banned_missing_and_duplicate_candidates_and_sorts_by_score():
    banned = banned_mask(V, seen=[2])
    idx, scores = select(np.array([2, 5, -1, 4, 5, 0, 6]), np.array([9, 1, 8, 3, 1, 7, 2]), k=5, banned=banned)
    assert idx.tolist() == [4, 6, 5]
    assert scores.tolist() == [3, 2, 1]


def test_select_returns_at_most_k():
    idx, _ = select(np.arange(2, 10), np.arange(8, 0, -1), k=3, banned=banned_mask(V))
    assert idx.tolist() == [2, 3, 4]


def test_category_cap_keeps_best_item_of_each_category_in_order():
    category = np.array([-1, -1, 0, 0, 0, 1, 1, -1, 0, 1])
    idx, _ = select(np.array([2, 3, 5, 4, 7, 6]), np.array([6, 5, 4, 3, 2, 1]), k=5, banned=banned_mask(V),
                    category=category, max_per_category=1)
    assert idx.tolist() == [2, 5, 7]  # item 7 has no category, so no cap applies to it


def test_fill_from_popular_tops_up_with_allowed_items_scored_below_the_list():
    banned = banned_mask(V, seen=[9])
    popular = np.array([9, 2, 8, 3, 4])
    idx, scores, n_filled = fill_popular(np.array([3]), np.array([0.5], dtype=np.float32), 4, popular, banned)
    assert idx.tolist() == [3, 2, 8, 4]
    assert n_filled == 3
    assert (np.diff(scores) < 0).all()


def test_fill_relaxes_the_category_cap_rather_than_return_a_short_list():
    category = np.array([-1, -1, 0, 0, 0, 0, 0, 0, 0, 0])
    idx, _, _ = fill_popular(np.array([2]), np.array([1.0]), 3, np.arange(2, 10), banned_mask(V), category, 1)
    assert idx.tolist() == [2, 3, 4]


def test_fill_never_serves_reserved_items_even_when_short():
    idx, _, n = fill_popular(np.zeros(0, dtype=np.int64), np.zeros(0), 5, np.array([0, 1, 2]), banned_mask(V))
    assert idx.tolist() == [2] and n == 1


def test_item_facts_reads_stock_and_category_tokens_by_vocabulary_index():
    vocab = Vocab(np.array(["a", "b", "c"], dtype=object))  # indices 2, 3, 4
    items = pd.DataFrame({
        "item_id": ["c", "a", "zzz"],
        "attributes": [["brand:x", "category:shoes"], ["category:hats"], ["category:shoes"]],
        "in_stock": [False, True, True],
    })
    facts = item_facts(vocab, items, np.array([0, 0, 5, 9, 1]))
    assert facts.in_stock.tolist() == [True, True, True, True, False]
    assert facts.categories[facts.category[4]] == "shoes"
    assert facts.categories[facts.category[2]] == "hats"
    assert facts.category[3] == -1
    assert facts.popular.tolist() == [3, 2, 4]


def test_category_of_takes_the_category_token():
    assert category_of(["brand:b1", "category:c7"]) == "c7"
    assert category_of(["brand:b1"]) is None
    assert category_of(None) is None
