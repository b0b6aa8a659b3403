"""Vocabularies, sequences and splits on hand-built event logs whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from towerline.features.contracts import Dataset
from towerline.features.sequences import build_sequences, left_padded_windows
from towerline.features.splits import split_by_time, split_leave_one_out
from towerline.features.vocab import N_RESERVED, PAD_IDX, UNK_IDX, Vocab, Vocabs, build_vocab, build_vocabs, item_attribute_matrix


def _dataset(rows: list[tuple[str, str, int, str]]) -> Dataset:
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "event_type"])
    events["value"] = np.nan
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e"],
            "attributes": [["cat:x", "brand:p"], ["cat:x"], ["cat:y", "brand:q", "brand:r"], [], ["cat:y"]],
        }
    )
    users = pd.DataFrame({"user_id": sorted({r[0] for r in rows}), "consent": True})
    return Dataset("hand", events, items, users)


@pytest.fixture
def hand() -> Dataset:
    return _dataset(
        [
            ("u1", "a", 10, "view"),
            ("u1", "b", 20, "view"),
            ("u1", "b", 21, "purchase"),  # same item right after: folded into one purchase step
            ("u1", "c", 30, "view"),
            ("u1", "d", 40, "view"),
            ("u2", "c", 5, "view"),
            ("u2", "a", 50, "click"),
            ("u2", "e", 15, "cart"),  # out of order in the file: sorted by time
            ("u3", "a", 1, "view"),
            ("u3", "b", 2, "view"),
        ]
    )


def test_vocab_reserves_padding_and_unknown_and_round_trips(tmp_path):
    v = build_vocab(["b", "a", "b", "c"])
    assert list(v.ids) == ["a", "b", "c"]
    assert len(v) == 3 + N_RESERVED
    assert list(v.encode(["a", "c", "zzz"])) == [N_RESERVED, N_RESERVED + 2, UNK_IDX]
    assert list(v.decode([PAD_IDX, UNK_IDX, N_RESERVED])) == ["<pad>", "<unk>", "a"]
    v.save(tmp_path / "v.json")
    assert list(Vocab.load(tmp_path / "v.json").ids) == ["a", "b", "c"]


def test_vocab_encodes_categorical_like_strings():
    v = build_vocab(["x", "y", "z"])
    cat = pd.Series(pd.Categorical(["z", "x", None, "q"]))
    assert list(v.encode(cat)) == list(v.encode(np.array(["z", "x", "nope", "q"], dtype=object)))


def test_event_type_vocab_keeps_funnel_order(hand):
    vocabs = build_vocabs(hand)
    assert list(vocabs.event_types.ids[:5]) == ["interaction", "view", "click", "cart", "purchase"]


def test_vocabs_save_and_load(hand, tmp_path):
    vocabs = build_vocabs(hand)
    vocabs.save(tmp_path / "vocab")
    again = Vocabs.load(tmp_path / "vocab")
    assert list(again.items.ids) == list(vocabs.items.ids)
    assert list(again.attributes.ids) == list(vocabs.attributes.ids)


def test_item_attribute_matrix_pads_and_truncates(hand):
    vocabs = build_vocabs(hand)
    m = item_attribute_matrix(hand.items, vocabs, max_attributes=2)
    c = vocabs.items.encode_one("c")
    assert list(vocabs.attributes.decode(m[c])) == ["cat:y", "brand:q"]  # third token cut
    assert (m[vocabs.items.encode_one("d")] == PAD_IDX).all()  # no attributes
    assert (m[:N_RESERVED] == PAD_IDX).all()


def test_sequences_are_time_ordered_and_fold_repeated_item_steps(hand):
    vocabs = build_vocabs(hand)
    seqs = build_sequences(hand.events, vocabs)
    by_user = {vocabs.users.decode([u])[0]: r for r, u in enumerate(seqs.user_idx)}
    u1 = seqs.items_of(by_user["u1"])
    assert list(vocabs.items.decode(u1)) == ["a", "b", "c", "d"]
    b_step = seqs.offsets[by_user["u1"]] + 1
    assert vocabs.event_types.decode([seqs.event_type_idx[b_step]])[0] == "purchase"
    assert list(vocabs.items.decode(seqs.items_of(by_user["u2"]))) == ["c", "e", "a"]
    assert seqs.n_events == 9


def test_sequences_keep_every_event_when_not_folding(hand):
    seqs = build_sequences(hand.events, build_vocabs(hand), collapse_repeats=False)
    assert seqs.n_events == len(hand.events)


def test_leave_one_out_holds_out_last_two_and_keeps_short_users_for_training(hand):
    vocabs = build_vocabs(hand)
    split = split_leave_one_out(build_sequences(hand.events, vocabs))
    dec = lambda idx: list(vocabs.items.decode(idx))  # noqa: E731
    assert len(split.test) == 2 and len(split.valid) == 2  # u3 has 2 steps: train only
    assert sorted(dec(split.test.targets)) == ["a", "d"]
    assert sorted(dec(split.valid.targets)) == ["c", "e"]
    assert split.train.n_events == 2 + 1 + 2  # u1: a b, u2: c, u3: a b
    for t in (split.valid, split.test):
        assert (split.full.item_idx[t.history_end] == t.targets).all()
    # no held-out target sits in any training prefix of its own user
    train_users = dict(zip(split.train.user_idx, range(len(split.train))))
    for row, target_pos in zip(split.test.rows, split.test.history_end):
        train_row = train_users[split.full.user_idx[row]]
        assert split.train.offsets[train_row + 1] - split.train.offsets[train_row] < target_pos - split.full.offsets[row]


def test_time_split_never_trains_on_events_after_the_cut():
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{rng.integers(20)}", int(t), "view") for u in range(30) for t in rng.integers(0, 1000, 12)]
    ds = _dataset(rows)
    ds.items = pd.DataFrame({"item_id": [f"i{i}" for i in range(20)], "attributes": [[] for _ in range(20)]})
    vocabs = build_vocabs(ds)
    split = split_by_time(build_sequences(ds.events, vocabs, collapse_repeats=False), (0.7, 0.85))
    t_valid, t_test = np.quantile(split.full.timestamp, (0.7, 0.85))
    assert split.train.timestamp.max() < t_valid
    v_ts = split.full.timestamp[split.valid.history_end]
    assert ((v_ts >= t_valid) & (v_ts < t_test)).all()
    assert (split.full.timestamp[split.test.history_end] >= t_test).all()
    assert len(split.valid) > 0 and len(split.test) > 0


def test_left_padded_windows_right_align_the_newest_event():
    values = np.array([5, 6, 7, 8, 9])
    w = left_padded_windows(values, np.array([0, 3]), np.array([3, 5]), width=4)
    assert w.tolist() == [[PAD_IDX, 5, 6, 7], [PAD_IDX, PAD_IDX, 8, 9]]
    w2 = left_padded_windows(values, np.array([0]), np.array([5]), width=2)
    assert w2.tolist() == [[8, 9]]
