"""The ranking stage: leak-free candidate lists, real training, pipeline metrics, the served ranker."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import torch

from support import RANKER_OVERRIDES, REPO, tiny_overrides
from towerline.bundle import verify_bundle, write_manifest
from towerline.training.bundle import load_bundle
from towerline.cli import main
from towerline.config import TwoTowerConfig, load_config
from towerline.features.sequences import Sequences
from towerline.features.splits import split_leave_one_out
from towerline.features.vocab import N_RESERVED, PAD_IDX
from towerline.training.candidates import (
    CandidateSet,
    build_ranker_data,
    eval_positions,
    retrieve_candidates,
    training_positions,
)
from towerline.training.model import TwoTowerNet
from towerline.features.vocab import UNK_IDX
from towerline.training import inference
from towerline.training.inference import rank_candidates
from towerline.training.ranker_model import Ranker, item_categories
from towerline.training.ranker_system import listwise_loss, pipeline_ranks
from towerline.training.ranker_train import build_ranker_for, paired_bootstrap_lift, pipeline_report, score_candidates

def hand_made_sequences() -> Sequences:
    """Three users over items 2..11. Items 10 and 11 appear only as user 0's valid/test steps."""
    rows = [[2, 3, 4, 5, 10, 11], [3, 4, 5, 6, 7], [6, 7, 8, 9]]
    items = np.concatenate([np.array(r) for r in rows]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return Sequences(
        offsets=offsets,
        user_idx=np.arange(len(rows), dtype=np.int64) + N_RESERVED,
        item_idx=items,
        event_type_idx=np.full(len(items), 2, dtype=np.int64),
        timestamp=np.concatenate([np.arange(len(r)) for r in rows]).astype(np.int64),
        value=np.full(len(items), np.nan),
    )


def tiny_net(n_items: int = 12) -> TwoTowerNet:
    torch.manual_seed(0)
    cfg = TwoTowerConfig(dim=8, max_len=5, n_layers=1, n_heads=1, dropout=0.0, use_attributes=False)
    return TwoTowerNet(n_items, n_attributes=2, n_event_types=4, cfg=cfg)


# ----------------------------------------------------------------------------- candidates


def test_training_candidates_never_show_the_users_held_out_items():
    split = split_leave_one_out(hand_made_sequences())
    net = tiny_net()
    with torch.no_grad():
        net.item_tower.id_emb.weight[10:12] *= 50.0  # make the held-out items the retriever's favourites
    n_all = 12 - N_RESERVED
    pos = training_positions(split, max_positions_per_user=10)
    train = retrieve_candidates(net, split.full, pos, n_candidates=n_all, history_len=8)
    user0 = train.rows == 0
    assert user0.sum() == 3  # steps 1..3 of the training prefix [2, 3, 4, 5]
    for i in np.flatnonzero(user0):
        assert not np.isin([10, 11], train.hist[i]).any(), "history holds a held-out item"
        assert not np.isin([10, 11], train.cand[i]).any(), "candidate list holds a held-out item"
        # everything else that is not history is a candidate, so the absence above is the mask's doing
        history = set(train.hist[i][train.hist[i] != PAD_IDX])
        expected = set(range(N_RESERVED, 10)) - history | {int(pos.target[i])}
        assert set(train.cand[i][train.cand[i] != PAD_IDX]) == expected
        assert train.cand[i, train.target_pos[i]] == pos.target[i]
    # other users may see items 10 and 11 (they are not *their* held-out items)
    assert np.isin([10, 11], train.cand[train.rows == 2]).any()
    # at test time the held-out item is the positive and is retrieved
    test = retrieve_candidates(net, split.full, eval_positions(split.full, split.test), n_all, 8)
    assert test.cand[0, test.target_pos[0]] == 11 and 10 in test.hist[0]


def test_training_positions_the_retriever_misses_are_dropped():
    split = split_leave_one_out(hand_made_sequences())
    net = tiny_net()
    pos = training_positions(split, 10)
    ranks = retrieve_candidates(net, split.full, pos, n_candidates=10, history_len=8).retrieval_rank
    assert ranks.min() < ranks.max()
    n = int(ranks.max())  # a list length that misses at least the worst-ranked positive
    data = build_ranker_data(net, split, n_candidates=n, history_len=8, max_positions_per_user=10)
    np.testing.assert_array_equal(data.train.retrieval_rank, ranks[ranks < n])  # exactly the hits, in order
    assert (data.train.cand[np.arange(len(data.train)), data.train.target_pos] == pos.target[ranks < n]).all()
    assert data.train_recall == pytest.approx((ranks < n).mean())


def test_item_categories_prefer_category_tokens_and_fall_back_to_the_commonest_attribute():
    from towerline.features.vocab import Vocab

    vocab = Vocab(np.array(["brand:a", "category:x", "category:y"], dtype=object))  # indices 2, 3, 4
    table = np.array([[0, 0], [0, 0], [2, 3], [4, 2], [2, 0]])
    np.testing.assert_array_equal(item_categories(table, vocab), [PAD_IDX, PAD_IDX, 3, 4, PAD_IDX])
    plain = Vocab(np.array(["attr:1", "attr:2", "attr:3"], dtype=object))
    table = np.array([[0, 0], [0, 0], [2, 3], [4, 3], [3, 0]])  # attr:2 (index 3) is the commonest
    np.testing.assert_array_equal(item_categories(table, plain), [PAD_IDX, PAD_IDX, 3, 3, 3])


# ----------------------------------------------------------------------------- metrics


def test_pipeline_rank_is_the_ranker_position_inside_the_list_and_the_retrieval_rank_outside():
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    target_pos = torch.tensor([0, -1, 1])
    retrieval_rank = torch.tensor([0, 57, 1])
    # user 0: the retriever's best is now last; user 1: missed, keeps rank 57; user 2: a tie counts against it
    assert pipeline_ranks(scores, target_pos, retrieval_rank).tolist() == [2, 57, 1]


def test_pipeline_report_compares_both_systems_on_the_same_users():
    n = 4
    data = CandidateSet(
        hist=np.zeros((3, 2), dtype=np.int64), hist_types=np.zeros((3, 2), dtype=np.int64),
        hist_ts=np.zeros((3, 2), dtype=np.int64), cand=np.tile(np.arange(2, 2 + n), (3, 1)),
        cand_scores=np.tile(np.linspace(1, 0, n, dtype=np.float32), (3, 1)),
        target_pos=np.array([2, 0, -1]), retrieval_rank=np.array([2, 0, 30]), rows=np.arange(3), users=np.arange(3) + 2,
    )
    scores = np.array([[0, 0, 5, 0], [9, 0, 0, 0], [1, 2, 3, 4]], dtype=np.float32)  # lifts user 0 to the top
    m = pipeline_report(scores, data, bootstrap_samples=200)
    assert m["test/retrieval_ndcg_10"] == pytest.approx((1 / np.log2(4) + 1.0 + 0.0) / 3)
    assert m["test/pipeline_ndcg_10"] == pytest.approx(2 / 3)
    assert m["test/pipeline_hr_10"] == m["test/retrieval_hr_10"] == pytest.approx(2 / 3)
    assert m["test/pipeline_mrr"] == pytest.approx((1 + 1 + 1 / 31) / 3)
    assert m["test/pipeline_lift_ndcg_10"] == pytest.approx((2 / 3) / m["test/retrieval_ndcg_10"])
    assert m[f"test/retrieval_recall_{n}"] == pytest.approx(2 / 3)


def test_paired_bootstrap_interval_brackets_the_lift_and_excludes_one_only_for_a_consistent_gain():
    rng = np.random.default_rng(0)
    base = rng.random(2000)
    assert paired_bootstrap_lift(base, base, 200) == pytest.approx((1.0, 1.0, 1.0))
    better = base * 1.1 + rng.normal(0, 0.01, 2000)  # every user gains about 10%
    lift, lo, hi = paired_bootstrap_lift(better, base, 500, seed=1)
    assert lo < lift < hi and lo > 1.05 and hi < 1.15
    noisy = base + rng.normal(0, 0.3, 2000)  # no gain on average, much noise
    lift, lo, hi = paired_bootstrap_lift(noisy, base, 500, seed=1)
    assert lo < 1.0 < hi
    assert paired_bootstrap_lift(better, base, 300, seed=3) == paired_bootstrap_lift(better, base, 300, seed=3)


# ----------------------------------------------------------------------------- training and serving


def test_untrained_ranker_keeps_the_retrieval_order_and_training_steps_lower_the_loss(ranked_run):
    bundle = load_bundle(ranked_run.bundle_dir)
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides() + RANKER_OVERRIDES)
    split = split_leave_one_out(bundle.histories)
    data = build_ranker_data(bundle.net, split, 20, 12, max_positions_per_user=3)
    ranker = build_ranker_for(bundle.net, bundle.vocabs, split, cfg)
    scores = score_candidates(ranker, data.valid)
    np.testing.assert_array_equal(np.argsort(-scores, axis=1, kind="stable"), np.tile(np.arange(20), (len(scores), 1)))

    torch.manual_seed(0)
    opt = torch.optim.AdamW(ranker.parameters(), lr=5e-3)
    batch = [t[:128] for t in data.train.tensors()]

    def loss() -> torch.Tensor:
        hist, types, ts, cand, cs, target_pos, _, users = batch
        return listwise_loss(ranker(cand, cs, hist, types, ts, ranker.profile_of(users)), target_pos)

    ranker.train()
    before = loss().item()
    for _ in range(15):
        opt.zero_grad()
        step = loss()
        step.backward()
        opt.step()
    ranker.eval()
    with torch.no_grad():
        assert loss().item() < before - 0.05


def test_train_with_the_ranker_logs_pipeline_metrics_into_the_same_run_and_version(ranked_run):
    client = mlflow.MlflowClient(ranked_run.tracking_uri)
    run = client.get_run(ranked_run.run_id)
    m = run.data.metrics
    for key in ("test/pipeline_ndcg_10", "test/pipeline_hr_10", "test/pipeline_mrr", "test/retrieval_ndcg_10",
                "test/pipeline_lift_ndcg_10", "test/pipeline_lift_ndcg_10_ci_low", "test/pipeline_lift_ndcg_10_ci_high",
                "test/retrieval_recall_20"):
        assert key in m, key
    # retrieval-only on the ranker's users is the retriever's own masked test metric
    assert m["test/retrieval_ndcg_10"] == pytest.approx(m["test/ndcg_10"], abs=1e-6)
    assert m["test/pipeline_lift_ndcg_10_ci_low"] <= m["test/pipeline_lift_ndcg_10"] <= m["test/pipeline_lift_ndcg_10_ci_high"]
    assert len(client.get_metric_history(ranked_run.run_id, "ranker/train_loss")) == 2
    assert len(client.get_metric_history(ranked_run.run_id, "valid/pipeline_ndcg_10")) == 2
    assert run.data.params["ranker/n_candidates"] == "20"
    assert {f.path for f in client.list_artifacts(ranked_run.run_id, "bundle/ranker")} == {
        "bundle/ranker/config.json", "bundle/ranker/weights.safetensors"}
    manifest = verify_bundle(ranked_run.bundle_dir)
    assert manifest["run_id"] == ranked_run.run_id and manifest["model_name"] == "tiny-retriever"
    assert "ranker/weights.safetensors" in manifest["files"]
    mlflow.set_tracking_uri(ranked_run.tracking_uri)
    try:
        served = load_bundle(f"models:/tiny-retriever/{ranked_run.model_version}")
    finally:
        mlflow.set_tracking_uri(None)
    assert served.ranker is not None


def test_served_ranker_changes_the_order_of_the_retrievers_candidates(ranked_run):
    bundle = load_bundle(ranked_run.bundle_dir)
    assert isinstance(bundle.ranker, Ranker) and not bundle.ranker.training
    split = split_leave_one_out(bundle.histories)
    test = retrieve_candidates(bundle.net, split.full, eval_positions(split.full, split.test), 20, 12)
    changed = 0
    for u in range(50):
        row = test.rows[u]
        lo, hi = split.full.offsets[row], split.test.history_end[u]
        scores = rank_candidates(
            bundle.ranker, split.full.item_idx[lo:hi], split.full.event_type_idx[lo:hi], split.full.timestamp[lo:hi],
            test.cand[u], test.cand_scores[u],
        )
        assert scores.shape == (20,) and scores.dtype == np.float32
        changed += not np.array_equal(np.argsort(-scores, kind="stable"), np.arange(20))
    assert changed > 0
    # FAISS's -1 ("not enough results") and batches are handled
    two = inference.Histories.from_rows([split.full.item_idx[:3], np.zeros(0)], [np.full(3, 2), np.zeros(0)],
                                        [np.arange(3), np.zeros(0)], [UNK_IDX, UNK_IDX])
    batch = inference.score_lists(bundle.ranker, two, np.array([[2, 3, -1], [4, 5, 6]]), np.array([[3.0, 2.0, 1.0], [1.0, 0.5, 0.1]]))
    assert batch.shape == (2, 3) and np.isneginf(batch[0, 2]) and np.isfinite(batch[1]).all()
    with pytest.raises(ValueError, match="exactly"):  # serving's entry point refuses a list of another length
        inference.rank(bundle.ranker, two, np.array([[2, 3, 4], [4, 5, 6]]), np.zeros((2, 3)))


def test_train_ranker_command_adds_a_ranker_to_a_bundle_and_registers_a_version(ranked_run, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(ranked_run.bundle_dir, copy)
    shutil.rmtree(copy / "ranker")  # a retriever-only bundle of the same run
    old = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {"model_name": old["model_name"], "run_id": old["run_id"]})
    assert load_bundle(copy).ranker is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ranked_run.tracking_uri)
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["train-ranker", "--model", str(copy), "--no-progress", "--set", "ranker.max_epochs=1"]) == 0
    finally:
        mlflow.set_tracking_uri(None)
    out = capsys.readouterr().out
    assert "lift" in out and "95% CI" in out and "registered: models:/tiny-retriever/" in out
    assert load_bundle(copy).ranker is not None
    client = mlflow.MlflowClient(ranked_run.tracking_uri)
    versions = client.search_model_versions("name = 'tiny-retriever'")
    assert len(versions) >= 2
    assert json.loads((copy / "metrics.json").read_text())["ranker/epochs"] == 1.0


def test_serving_rank_stage_uses_the_bundles_ranker(ranked_run):
    from towerline.serving import recommender as rec
    from towerline.serving.settings import ServeSettings

    settings = ServeSettings(n_candidates=7)  # the retrieval depth without a ranker: not the ranker's list length
    state = rec.load_model(str(ranked_run.bundle_dir), settings)
    assert state.has_ranker and state.ranker is not None and state.rank_hop
    assert state.n_candidates == inference.list_length(state.ranker) == 20  # read from ranker/config.json
    b = state.bundle
    rows = np.flatnonzero(b.histories.lengths >= 3)[:20]
    histories = rec.training_histories(b, rows)
    candidates = rec.retrieve(state, settings, histories)
    assert all(len(i) == 20 for i, _ in candidates)
    ranked = rec.rank(state, histories, candidates)
    assert all(np.array_equal(i, ci) for (i, _), (ci, _) in zip(ranked, candidates))  # same items, new scores
    assert any(not np.allclose(s, cs) for (_, s), (_, cs) in zip(ranked, candidates))
    never = rec.load_model(str(ranked_run.bundle_dir), settings.model_copy(update={"rank_stage": "never"}))
    assert never.ranker is None and not never.rank_hop and never.n_candidates == 7
    plain = rec.rank(never, histories, candidates)
    assert plain[0][1].tolist() == pytest.approx(candidates[0][1].tolist())


def test_rank_stage_never_serves_retrieval_order_even_with_a_ranker(ranked_run, tmp_path):
    from towerline.serving import recommender as rec
    from towerline.serving.history import SQLiteHistoryStore
    from towerline.serving.settings import ServeSettings

    ranked_settings = ServeSettings(n_candidates=20, exclude_seen=False)
    never_settings = ranked_settings.model_copy(update={"rank_stage": "never"})
    state = rec.load_model(str(ranked_run.bundle_dir), ranked_settings)
    never = rec.load_model(str(ranked_run.bundle_dir), never_settings)
    b = state.bundle
    user = str(b.vocabs.users.decode(b.histories.user_idx[np.flatnonzero(b.histories.lengths >= 3)[:1]])[0])
    store = SQLiteHistoryStore(tmp_path / "h.sqlite")
    by_ranker = rec.Recommender(state, ranked_settings, store).recommend(user, k=20)
    by_retrieval = rec.Recommender(never, never_settings, store).recommend(user, k=20)
    prep = rec.prepare(state, never_settings, user, ())
    (cands,) = rec.retrieve(never, never_settings, [prep.history])
    (rank_scores,) = rec.rank(state, [prep.history], rec.retrieve(state, ranked_settings, [prep.history]))
    retrieval_scores = dict(zip(b.vocabs.items.decode(cands[0]).tolist(), cands[1].tolist()))
    ranker_scores = dict(zip(b.vocabs.items.decode(rank_scores[0]).tolist(), rank_scores[1].tolist()))
    personal = [(i, s) for i, s in by_retrieval.items if i in retrieval_scores]
    assert personal and [s for _, s in personal] == pytest.approx([retrieval_scores[i] for i, _ in personal])
    personal = [(i, s) for i, s in by_ranker.items if i in ranker_scores]
    assert personal and [s for _, s in personal] == pytest.approx([ranker_scores[i] for i, _ in personal])
    store.close()


def test_ranker_learns_from_validation_positions_of_other_users_than_those_that_select_it(ranked_run):
    bundle = load_bundle(ranked_run.bundle_dir)
    split = split_leave_one_out(bundle.histories)
    data = build_ranker_data(bundle.net, split, 20, 12, 3, train_on="validation", holdout_share=0.3, seed=0)
    train_users, valid_users = set(data.train.rows.tolist()), set(data.valid.rows.tolist())
    assert train_users and valid_users and not (train_users & valid_users)
    # every training example is a validation target the retriever found: never a test item
    valid_target = dict(zip(split.valid.rows.tolist(), split.valid.targets.tolist()))
    valid_end = dict(zip(split.valid.rows.tolist(), split.valid.history_end.tolist()))
    for row, hist, cand, pos in zip(data.train.rows, data.train.hist, data.train.cand, data.train.target_pos):
        assert pos >= 0 and cand[pos] == valid_target[row]
        assert hist[-1] == split.full.item_idx[valid_end[row] - 1]  # the history stops before the target
    assert len(data.test) == len(split.test)


def test_ranker_carries_training_prefix_profiles_of_the_marketing_layer(ranked_run):
    from towerline.features.user_features import PROFILE_FEATURE_NAMES
    bundle = load_bundle(ranked_run.bundle_dir)
    ranker = bundle.ranker
    assert ranker.n_profile_features == len(PROFILE_FEATURE_NAMES)
    assert ranker.user_profiles.shape == (len(bundle.vocabs.users), len(PROFILE_FEATURE_NAMES))
    table = ranker.user_profiles.numpy()
    assert (table[:2] == 0).all()  # PAD / UNK rows
    assert (table[2:, 3:].sum(1) <= 1).all()  # at most one lifecycle segment per user
    assert table[2:, :3].max() <= 1.0 and (table[2:, :3] > 0).any()  # RFM scores scaled into (0, 1]
    users = torch.tensor([2, 3, 10_000_000])  # the last is outside the table: zeros, not an error
    prof = ranker.profile_of(users)
    assert prof.shape == (3, len(PROFILE_FEATURE_NAMES)) and (prof[2] == 0).all()


def test_ranker_keeps_a_frozen_item_table_without_gradients_and_rebuilds_it_when_weights_change(ranked_run):
    ranker = load_bundle(ranked_run.bundle_dir).ranker.eval()
    cand = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 9]])
    hist = torch.tensor([[PAD_IDX, 2, 3], [4, 5, 6]])
    types = torch.ones_like(hist)
    ts = torch.arange(3).expand(2, 3).contiguous()
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [2.0, 1.5, 1.0, 0.5]])
    with torch.enable_grad():  # the per-request path: no table kept
        fresh = ranker(cand, scores, hist, types, ts).detach()
    assert ranker._frozen_items is None
    with torch.no_grad():
        frozen = ranker(cand, scores, hist, types, ts)
        assert ranker._frozen_items is not None
        assert torch.allclose(frozen, fresh, atol=1e-6)
        state = {k: v.clone() for k, v in ranker.state_dict().items()}
        state["item_proj.weight"] *= 2.0
        ranker.load_state_dict(state)  # new weights: the kept table must not be served
        changed = ranker(cand, scores, hist, types, ts)
    with torch.enable_grad():
        expected = ranker(cand, scores, hist, types, ts).detach()
    assert torch.allclose(changed, expected, atol=1e-6) and not torch.allclose(changed, frozen)
