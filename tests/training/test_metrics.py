"""Full-ranking metrics against hand-computed values, masking rules, ties, coverage, streaming."""

from __future__ import annotations

import pytest
import torch

from towerline.features.vocab import N_RESERVED, PAD_IDX, UNK_IDX
from towerline.training.metrics import (
    RankingAccumulator,
    mask_scores,
    ranking_metrics,
    target_ranks,
    top_k_items,
)

# Items 0 (PAD) and 1 (UNK) score highest on purpose: they must never count.
#                          PAD  UNK   2    3    4    5    6    7
SCORES = torch.tensor([[9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.3, 0.8],
                       [9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.3, 0.8],
                       [9.0, 9.0, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]])  # (3, 8)
TARGETS = torch.tensor([5, 6, 4])
HISTORY = [torch.tensor([3, 5]), torch.tensor([2, 6, 3]), torch.tensor([], dtype=torch.long)]


def test_unmasked_ranks_count_real_items_scored_above_the_target():
    ranks = target_ranks(SCORES, TARGETS, HISTORY, mask_history=False)
    # row 0: target 5 (0.7) is beaten by 3 (0.9) and 7 (0.8); row 1: 6 (0.3) by 3, 7, 5, 2
    # row 2: all six real items tie, so the target is ranked behind the five others (pessimistic)
    assert ranks.tolist() == [2, 4, 5]


def test_masked_ranks_drop_history_items_but_keep_a_repeated_target():
    ranks = target_ranks(SCORES, TARGETS, HISTORY, mask_history=True)
    # row 0: 3 is masked, 5 is in the history but is the target, so it stays: beaten by 7 only
    # row 1: 2 and 3 masked, 6 kept: beaten by 7 and 5
    assert ranks.tolist() == [1, 2, 5]


def test_padded_history_tensor_gives_the_same_ranks_as_a_list():
    padded = torch.tensor([[PAD_IDX, 3, 5], [2, 6, 3], [PAD_IDX, PAD_IDX, PAD_IDX]])
    assert torch.equal(target_ranks(SCORES, TARGETS, padded), target_ranks(SCORES, TARGETS, HISTORY))


def test_ranks_agree_with_a_slow_sort_reference_with_ties_and_masking():
    g = torch.Generator().manual_seed(0)
    B, V = 16, 40
    scores = torch.randint(0, 6, (B, V), generator=g).float()  # many ties
    targets = torch.randint(N_RESERVED, V, (B,), generator=g)
    history = torch.randint(N_RESERVED, V, (B, 7), generator=g)
    history[:, :2] = PAD_IDX
    got = target_ranks(scores, targets, history, mask_history=True)
    for b in range(B):
        t = int(targets[b])
        masked = set(history[b].tolist()) - {t}
        candidates = [j for j in range(N_RESERVED, V) if j not in masked and j != t]
        expected = sum(1 for j in candidates if scores[b, j] >= scores[b, t])
        assert int(got[b]) == expected, f"row {b}"


def test_metrics_of_known_ranks_match_hand_computed_values():
    out = ranking_metrics(torch.tensor([0, 3, 7, 15]))
    # NDCG gains: rank 0 -> 1, rank 3 -> 1/log2(5) = 0.430677, rank 7 -> 1/log2(9) = 0.315465,
    # rank 15 -> 1/log2(17) = 0.244651
    assert out["hr_5"] == pytest.approx(2 / 4)
    assert out["ndcg_5"] == pytest.approx((1 + 0.430677) / 4, abs=1e-6)
    assert out["hr_10"] == pytest.approx(3 / 4)
    assert out["ndcg_10"] == pytest.approx((1 + 0.430677 + 0.315465) / 4, abs=1e-6)
    assert out["hr_20"] == pytest.approx(1.0)
    assert out["ndcg_20"] == pytest.approx((1 + 0.430677 + 0.315465 + 0.244651) / 4, abs=1e-6)
    assert out["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 8 + 1 / 16) / 4)
    assert list(out) == ["hr_5", "ndcg_5", "hr_10", "ndcg_10", "hr_20", "ndcg_20", "mrr"]


def test_masked_and_unmasked_metrics_differ_on_the_hand_built_case():
    unmasked = ranking_metrics(target_ranks(SCORES, TARGETS, HISTORY, mask_history=False), ks=(2,))
    masked = ranking_metrics(target_ranks(SCORES, TARGETS, HISTORY, mask_history=True), ks=(2,))
    assert unmasked["hr_2"] == 0.0  # ranks 2, 4, 5
    assert masked["hr_2"] == pytest.approx(1 / 3)  # ranks 1, 2, 5
    assert masked["ndcg_2"] == pytest.approx((1 / 1.5849625) / 3, abs=1e-6)  # 1/log2(3) for rank 1


def test_unknown_target_counts_as_a_miss_ranked_past_every_real_item():
    ranks = target_ranks(SCORES, torch.tensor([5, UNK_IDX, PAD_IDX]), HISTORY)
    assert ranks.tolist() == [1, 6, 6]  # 6 real items: rank 6 is one past the last
    assert ranking_metrics(ranks[1:], ks=(5,)) == {"hr_5": 0.0, "ndcg_5": 0.0, "mrr": pytest.approx(1 / 7)}


def test_top_k_items_never_returns_reserved_items_and_is_best_first():
    top = top_k_items(SCORES[:1], 3)
    assert top.tolist() == [[3, 7, 5]]
    masked = mask_scores(SCORES[:1], [torch.tensor([3])])
    assert top_k_items(masked, 3).tolist() == [[7, 5, 2]]
    assert top_k_items(SCORES[:1], 100).shape == (1, 6)  # capped at the number of real items


def test_mask_scores_does_not_modify_its_input():
    before = SCORES.clone()
    mask_scores(SCORES, HISTORY, keep=TARGETS)
    assert torch.equal(SCORES, before)


def test_accumulator_streams_batches_and_computes_coverage_over_real_items():
    acc = RankingAccumulator()
    acc.update(torch.tensor([0, 3]), torch.tensor([list(range(2, 12)), list(range(2, 12))]))
    acc.update(torch.tensor([7, 15]), torch.tensor([[2, 3, 4, 5, 6, 20, 21, 22, 23, 24, 29, 28]] * 2))
    out = acc.compute(n_items=30)  # 28 real items
    assert out["hr_10"] == pytest.approx(3 / 4)
    assert out["mrr"] == pytest.approx(ranking_metrics(torch.tensor([0, 3, 7, 15]))["mrr"])
    # top-10 lists hold items 2..11 and 20..24 (29 and 28 are 11th and 12th, so they do not count)
    assert out["coverage_10"] == pytest.approx(15 / 28)
    assert acc.n_users == 4
    acc.reset()
    assert acc.n_users == 0 and acc.compute(n_items=30)["hr_10"] == 0.0


def test_accumulator_rejects_top_lists_shorter_than_the_coverage_cut():
    with pytest.raises(ValueError, match="topk_items"):
        RankingAccumulator().update(torch.tensor([0]), torch.tensor([[2, 3, 4]]))


def test_full_catalogue_batch_ranks_without_loops():
    # the Beauty shape: 256 users x 12k items, history of 50; checks shapes and range, not timing
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(256, 12_103, generator=g)
    targets = torch.randint(N_RESERVED, 12_103, (256,), generator=g)
    history = torch.randint(N_RESERVED, 12_103, (256, 50), generator=g)
    ranks = target_ranks(scores, targets, history)
    assert ranks.shape == (256,) and int(ranks.min()) >= 0 and int(ranks.max()) <= 12_100
