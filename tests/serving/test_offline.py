"""serving/offline.py and `towerline evaluate --rules serving`: the serving path run over test users."""

from __future__ import annotations

import json

import numpy as np
import pytest

from towerline.cli import main
from towerline.features.splits import split_leave_one_out
from towerline.serving import recommender as rec
from towerline.serving.history import HistoryEvent
from towerline.serving.offline import (
    evaluate_serving_rules,
    evaluation_settings,
    histories_before,
    ndcg_of_lists,
    offline_top_k,
    served_top_k,
)


@pytest.fixture(scope="module")
def state(ranked_run):
    return rec.load_model(str(ranked_run.bundle_dir), evaluation_settings())


def test_served_answers_under_evaluation_rules_are_the_offline_pipelines(state):
    split = split_leave_one_out(state.bundle.histories)
    histories = histories_before(split.full, split.test)[:100]
    users = [str(u) for u in state.bundle.vocabs.users.decode(split.full.user_idx[split.test.rows[:100]])]
    served = served_top_k(state, evaluation_settings(), users, histories)
    offline = offline_top_k(state, histories)
    consenting = [i for i, u in enumerate(users) if u not in state.no_consent]
    assert consenting
    for i in consenting:
        assert state.bundle.vocabs.items.encode(np.asarray([x for x, _ in served[i].items], dtype=object)).tolist() == offline[i].tolist()


def test_evaluate_rules_serving_prints_both_ndcgs_and_their_difference(ranked_run, capsys):
    assert main(["evaluate", "--model", str(ranked_run.bundle_dir), "--rules", "serving", "--users", "150"]) == 0
    out = capsys.readouterr().out
    assert "NDCG@10 evaluation protocol" in out and "through the serving rules" in out and "serving rules cost" in out
    assert main(["evaluate", "--model", str(ranked_run.bundle_dir), "--rules", "serving", "--users", "150", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["users"] == 150 and r["stage"].endswith("-> rank")
    assert r["difference_ndcg_10"] == pytest.approx(r["serving_rules_ndcg_10"] - r["protocol_ndcg_10"])


def test_evaluation_rules_cost_nothing_beyond_repeats(ranked_run):
    """With the evaluation's rules the served NDCG@10 equals the offline lists' NDCG@10 exactly."""
    r = evaluate_serving_rules(str(ranked_run.bundle_dir), evaluation_settings(), max_users=150, progress=False)
    state = rec.load_model(str(ranked_run.bundle_dir), evaluation_settings())
    split = split_leave_one_out(state.bundle.histories)
    histories = histories_before(split.full, split.test)[:150]
    lists = offline_top_k(state, histories)
    users = state.bundle.vocabs.users.decode(split.full.user_idx[split.test.rows[:150]]).astype(str)
    if not any(u in state.no_consent for u in users):
        assert r["serving_rules_ndcg_10"] == pytest.approx(ndcg_of_lists(lists, split.test.targets[:150]), abs=1e-12)


def test_request_histories_carry_real_event_times(state):
    b = state.bundle
    row = int(np.flatnonzero(b.histories.lengths >= 3)[0])
    user = str(b.vocabs.users.decode([b.histories.user_idx[row]])[0])
    lo, hi = b.histories.offsets[row], b.histories.offsets[row + 1]
    online = [HistoryEvent(item_id=str(b.vocabs.items.ids[0]), event_type="view", timestamp=2_000_000_123)]
    h = rec.user_history(state, user, online)
    assert h.timestamps[-1] == 2_000_000_123
    np.testing.assert_array_equal(h.timestamps[: hi - lo], b.histories.timestamp[lo:hi])
