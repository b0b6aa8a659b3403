"""The learned audience scorer: fitted on the validation step, stored beside the bundle, applied by
``find_audience`` (what the CLI and ``POST /audiences`` call) whenever the file is there."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from towerline.errors import DataValidationError


@pytest.fixture(scope="module")
def own_bundle(tiny_run, tmp_path_factory):
    """A copy of the tiny bundle this module may write ``audience_scorer.json`` into."""
    import torch

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("scorer") / "bundle"
    shutil.copytree(tiny_run.bundle_dir, path)
    return path


@pytest.fixture(scope="module")
def fitted(own_bundle):
    from towerline.marketing.audience_scorer import fit_scorer, save_scorer, scorer_path
    from towerline.training.bundle import load_bundle

    bundle = load_bundle(own_bundle)
    scorer = fit_scorer(bundle, max_items=30, size=10, pool=40, negatives=60, hidden=4)
    save_scorer(scorer, scorer_path(bundle))
    return scorer


def _hand_scorer(**weights):
    """A scorer whose standardisation is the identity and whose weights are the given ones."""
    from towerline.marketing.audience_scorer import FEATURES, AudienceScorer

    return AudienceScorer(features=list(FEATURES), mean=[0.0] * len(FEATURES), scale=[1.0] * len(FEATURES),
                          weights=[float(weights.get(f, 0.0)) for f in FEATURES], pool=20)


def test_the_weights_are_fitted_on_the_validation_step_and_never_read_the_test_step(own_bundle, fitted):
    from towerline.marketing.audience_scorer import fit_scorer
    from towerline.training.bundle import load_bundle

    assert fitted.fitted["split"] == "validation" and fitted.fitted["items"] > 5 and len(fitted.output_weights) == 4
    assert np.isfinite(fitted.weights).all() and any(w != 0 for w in fitted.weights)
    # the report on held-out validation items: every size, every method, recall in [0, 1]
    report = fitted.fitted["validation_recall"]
    assert report["items"] == fitted.fitted["holdout_items"] > 0
    for n in ("100", "500", "1000"):
        for k in ("audience", "model", "affinity", "covisit", "buyers_among_candidates"):
            assert 0.0 <= report[n][k]["macro"] <= 1.0 and 0.0 <= report[n][k]["micro"] <= 1.0
        assert report[n]["audience"]["micro"] <= report[n]["buyers_among_candidates"]["micro"]
    # scramble every user's last step (the test item): the fit must not move
    bundle = load_bundle(own_bundle)
    h = bundle.histories
    items = h.item_idx.copy()
    last = h.offsets[1:] - 1
    items[last] = np.random.default_rng(1).permutation(items[last])
    scrambled = dataclasses.replace(bundle, histories=dataclasses.replace(h, item_idx=items))
    again = fit_scorer(scrambled, max_items=30, size=10, pool=40, negatives=60, hidden=4)
    assert again.weights == pytest.approx(fitted.weights, rel=1e-4, abs=1e-5)
    assert np.asarray(again.hidden_weights) == pytest.approx(np.asarray(fitted.hidden_weights), rel=1e-4, abs=1e-5)


def test_find_audience_ranks_with_the_stored_scorer_when_present(own_bundle, fitted):
    from towerline.marketing.audience import find_audience, log_partition, user_vectors
    from towerline.marketing.audience_scorer import Evidence, features
    from towerline.training.bundle import load_bundle

    bundle = load_bundle(own_bundle)  # reads audience_scorer.json
    ids, vectors = user_vectors(bundle)
    item = str(bundle.vocabs.items.ids[7])
    served = find_audience(bundle, vectors, ids, item_id=item, size=15)  # scoring="auto"
    model = find_audience(bundle, vectors, ids, item_id=item, size=15, scoring="probability")
    assert served["score"].is_monotonic_decreasing and len(served) == 15
    # the served scores are the scorer's function of the features, not log p
    row = pd.Index(ids).get_indexer(served["user_id"])
    idx = bundle.vocabs.items.encode_one(item)
    ev = Evidence.from_bundle(bundle).item_evidence(idx, ids)
    x = features(vectors[row] @ bundle.item_embeddings[idx], log_partition(bundle, vectors), ev, row)
    assert served["score"].to_numpy() == pytest.approx(fitted.score(x), rel=1e-4, abs=1e-4)
    assert not np.allclose(served["score"], model["score"])
    # an attribute query (a category campaign) keeps the model's ranking
    token = str(next(a for a in bundle.items["attributes"] if a is not None and len(a))[0])
    auto = find_audience(bundle, vectors, ids, attributes=[token], size=5)
    assert auto["score"].to_numpy() == pytest.approx(
        find_audience(bundle, vectors, ids, attributes=[token], size=5, scoring="probability")["score"].to_numpy())
    with pytest.raises(DataValidationError, match="ranks users for an item"):
        find_audience(bundle, vectors, ids, attributes=[token], scoring="learned")


def test_co_visitation_evidence_moves_a_user_into_the_audience(tiny_run, tmp_path):
    """Hand-built: user U's newest item Y is the item most often seen beside X; the model alone
    ranks U last for X, the scorer with weight on co-visitation puts U in the audience."""
    from towerline.marketing.audience import find_audience, user_vectors
    from towerline.marketing.audience_scorer import Evidence, save_scorer, scorer_path
    from towerline.training.bundle import load_bundle

    shutil.copytree(tiny_run.bundle_dir, tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    ev = Evidence.from_bundle(bundle)
    x = int(np.asarray(ev.C.sum(axis=0)).ravel().argmax())  # an item with co-visitation evidence
    y = int(ev.C[:, x].toarray().ravel().argmax())  # its strongest neighbour
    item_x, item_y = (str(i) for i in bundle.vocabs.items.decode([x, y]))
    ids, vectors = user_vectors(bundle)
    by_model = find_audience(bundle, vectors, ids, item_id=item_x, size=len(ids), scoring="probability")
    touched_y = set(ids[ev.W[:, y].toarray().ravel() > 0])
    user = next(u for u in by_model["user_id"][::-1] if u not in touched_y)  # the model's last choice

    extra = pd.DataFrame({"user_id": [user], "item_id": [item_y], "timestamp": [int(bundle.histories.timestamp.max()) + 60]})
    ids, vectors = user_vectors(bundle, extra)
    ev = Evidence.from_bundle(bundle, extra)  # U's newest item is now y
    close = ev.C[:, x].toarray().ravel()[ev.last_item]
    size = int((close >= ev.C[y, x]).sum())  # U and the users whose newest item is as close to x
    model_only = find_audience(bundle, vectors, ids, item_id=item_x, size=size, scoring="probability", extra_history=extra)
    assert user not in set(model_only["user_id"])
    save_scorer(_hand_scorer(dot=1.0, neg_log_z=1.0, covisit_last=100.0), scorer_path(bundle))
    bundle = load_bundle(tmp_path / "b")
    learned = find_audience(bundle, vectors, ids, item_id=item_x, size=size, extra_history=extra)
    assert user in set(learned["user_id"])


def test_a_scorer_fitted_for_another_model_is_not_applied(tiny_run, tmp_path, caplog):
    from towerline.marketing.audience_scorer import load_scorer, save_scorer, scorer_path
    from towerline.training.bundle import load_bundle

    shutil.copytree(tiny_run.bundle_dir, tmp_path / "b")
    save_scorer(_hand_scorer(dot=1.0).model_copy(update={"item_embeddings_sha256": "0" * 64}), tmp_path / "b" / "audience_scorer.json")
    with caplog.at_level(logging.WARNING):
        assert load_scorer(load_bundle(tmp_path / "b")) is None
    assert "fitted for another model" in caplog.text
    (tmp_path / "b" / "audience_scorer.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataValidationError, match="not a Towerline audience scorer"):
        load_scorer(load_bundle(tmp_path / "b"))
    assert scorer_path(load_bundle(tiny_run.bundle_dir)).name == "audience_scorer.json"


def test_cli_fits_the_scorer_into_the_bundle(tiny_run, tmp_path, capsys):
    from towerline.cli import main

    shutil.copytree(tiny_run.bundle_dir, tmp_path / "b")
    assert main(["audience-scorer", "--model", str(tmp_path / "b"), "--max-items", "10", "--hidden", "0"]) == 0
    stored = json.loads((tmp_path / "b" / "audience_scorer.json").read_text())
    assert stored["fitted"]["split"] == "validation" and len(stored["weights"]) == len(stored["features"])
    assert "audience scorer fitted on" in capsys.readouterr().out
    assert main(["audience-scorer", "--model", str(tmp_path / "missing")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_pool_zero_ranks_every_eligible_user_by_the_learned_score(tiny_run, tmp_path):
    """The default scorer (``pool`` 0) has no candidate step: its audience is the top of the learned
    score over every eligible user, and the fit samples negatives from beyond the evidence candidates."""
    from towerline.marketing.audience import find_audience, log_partition, past_users, user_vectors
    from towerline.marketing.audience_scorer import Evidence, features, fit_scorer, save_scorer, scorer_path
    from towerline.training.bundle import load_bundle

    shutil.copytree(tiny_run.bundle_dir, tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    scorer = fit_scorer(bundle, max_items=20, size=5, hard_pool=10, negatives=20, rest_negatives=20, hidden=2, holdout=0)
    assert scorer.pool == 0 and scorer.fitted["rest_negatives_per_item"] == 20 and "validation_recall" not in scorer.fitted
    save_scorer(scorer, scorer_path(bundle))
    bundle = load_bundle(tmp_path / "b")
    ids, vectors = user_vectors(bundle)
    item = str(bundle.vocabs.items.ids[7])
    idx = bundle.vocabs.items.encode_one(item)
    served = find_audience(bundle, vectors, ids, item_id=item, size=12)
    eligible = np.flatnonzero(~past_users(bundle, idx, ids))
    x = features(vectors[eligible] @ bundle.item_embeddings[idx], log_partition(bundle, vectors),
                 Evidence.from_bundle(bundle).item_evidence(idx, ids), eligible)
    s = scorer.score(x)
    best = eligible[np.lexsort((eligible, -s))[:12]]
    assert served["user_id"].tolist() == [str(u) for u in ids[best]]
