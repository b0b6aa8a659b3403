"""training/inference.py: one path, and no answer depends on the other rows of its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towerline.features.splits import split_leave_one_out
from towerline.features.vocab import PAD_IDX, UNK_IDX
from towerline.training import inference
from towerline.training.bundle import load_bundle
from towerline.training.candidates import eval_positions, retrieve_candidates
from towerline.training.evaluate import evaluate_pipeline, evaluate_targets
from towerline.training.ranker_train import score_candidates


@pytest.fixture(scope="module")
def ranked(ranked_run):
    torch.set_num_threads(1)
    bundle = load_bundle(ranked_run.bundle_dir)
    return bundle, split_leave_one_out(bundle.histories)


def in_batches(fn, n: int, size: int) -> np.ndarray:
    return np.concatenate([fn(slice(lo, lo + size)) for lo in range(0, n, size)])


def test_window_widths_double_up_to_max_len_and_depend_on_the_row_alone():
    assert inference.window_widths(50) == (8, 16, 32, 50)
    assert inference.window_widths(12) == (8, 12)
    items = torch.tensor([[0, 0, 0, 5], [4, 5, 6, 7]])
    assert inference.row_widths(items, 50).tolist() == [8, 8]
    long = torch.cat([torch.zeros(1, 40, dtype=torch.long), torch.full((1, 10), 3)], dim=1)
    assert inference.row_widths(long, 50).tolist() == [16]


def test_user_vectors_and_scores_are_bitwise_the_same_in_any_batch(ranked):
    bundle, split = ranked
    hist = inference.Histories.from_sequences(split.full, np.arange(200), split.test.history_end[:200])
    table = torch.from_numpy(bundle.item_embeddings)
    whole = inference.history_scores(bundle.net, table, hist).numpy()  # (200, V)
    for size in (1, 7, 32):
        parts = in_batches(lambda sl: inference.history_scores(bundle.net, table, hist.take(sl)).numpy(), 200, size)
        np.testing.assert_array_equal(parts, whole)


def test_ranker_scores_are_bitwise_the_same_in_any_batch(ranked):
    bundle, split = ranked
    hist = inference.Histories.from_sequences(split.full, np.arange(200), split.test.history_end[:200])
    n = inference.list_length(bundle.ranker)
    cand, cs = inference.retrieve(bundle.net, torch.from_numpy(bundle.item_embeddings), hist, n)
    assert cand.shape == (200, n)
    whole = inference.rank(bundle.ranker, hist, cand, cs)
    for size in (1, 7, 32):
        parts = in_batches(lambda sl: inference.rank(bundle.ranker, hist.take(sl), cand[sl], cs[sl]), 200, size)
        np.testing.assert_array_equal(parts, whole)


def test_candidate_lists_mask_the_history_and_have_the_rankers_length(ranked):
    bundle, split = ranked
    hist = inference.Histories.from_sequences(split.full, np.arange(50))
    cand, _ = inference.retrieve(bundle.net, torch.from_numpy(bundle.item_embeddings), hist, inference.list_length(bundle.ranker))
    for b in range(50):
        seen = set(split.full.items_of(b).tolist())
        real = cand[b][cand[b] != PAD_IDX]
        assert not seen & set(real.tolist()) and real.min() >= 2


def test_unknown_items_are_dropped_from_model_input():
    h = inference.Histories.from_rows([np.array([5, UNK_IDX, 7])], [np.array([2, 2, 3])], [np.array([10, 11, 12])], [UNK_IDX])
    items, types, ts = h.windows(4)
    assert items.tolist() == [[PAD_IDX, PAD_IDX, 5, 7]] and types.tolist() == [[PAD_IDX, PAD_IDX, 2, 3]]
    assert ts.tolist() == [[0, 0, 10, 12]]  # real timestamps travel with their steps


def test_evaluation_metrics_do_not_depend_on_eval_batch_size(ranked):
    bundle, split = ranked
    small = evaluate_targets(bundle.net, split.full, split.test, "test", batch_size=7, progress=False)
    large = evaluate_targets(bundle.net, split.full, split.test, "test", batch_size=512, progress=False)
    assert small == large
    small = evaluate_pipeline(bundle, split.full, split.test, "test", batch_size=7)
    large = evaluate_pipeline(bundle, split.full, split.test, "test", batch_size=512)
    assert small == large


def test_ranker_training_inputs_are_the_served_inputs(ranked):
    """The candidate set the ranker trains and is tested on holds what serving computes per request."""
    bundle, split = ranked
    n = inference.list_length(bundle.ranker)
    data = retrieve_candidates(bundle.net, split.full, eval_positions(split.full, split.test), n, bundle.ranker.cfg.history_len)
    rows = np.arange(30)
    hist = inference.Histories.from_sequences(split.full, split.test.rows[rows], split.test.history_end[rows])
    items, types, ts = inference.ranker_windows(bundle.ranker, hist)
    np.testing.assert_array_equal(data.hist[rows], items)
    np.testing.assert_array_equal(data.hist_ts[rows], ts)
    served = inference.rank(bundle.ranker, hist, data.cand[rows], data.cand_scores[rows])
    np.testing.assert_array_equal(score_candidates(bundle.ranker, data.subset(rows)), served)
