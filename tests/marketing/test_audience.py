"""Item -> audience on the tiny trained bundle: who is ranked, who is never included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from towerline.errors import DataValidationError


@pytest.fixture(scope="module")
def tiny(tiny_run):
    import torch
    from towerline.training.bundle import load_bundle
    from towerline.marketing.audience import log_partition, user_vectors
    torch.set_num_threads(1)
    bundle = load_bundle(tiny_run.bundle_dir)
    ids, vectors = user_vectors(bundle)
    return bundle, ids, vectors, log_partition(bundle, vectors)


def _buyers_and_viewers(bundle):
    """An item some users bought and others only viewed, with both sets of user ids."""
    h = bundle.histories
    purchase = bundle.vocabs.event_types.encode_one("purchase")
    row_of_step = np.repeat(np.arange(len(h)), h.lengths)
    users = bundle.vocabs.users.decode(h.user_idx)
    steps = pd.DataFrame({"user": users[row_of_step], "item": h.item_idx, "bought": h.event_type_idx == purchase})
    per_item = steps.groupby("item")["bought"].agg(["sum", "size"])
    item_idx = int(per_item[(per_item["sum"] >= 2) & (per_item["size"] > per_item["sum"] + 2)].index[0])
    on_item = steps[steps["item"] == item_idx]
    buyers = set(on_item.loc[on_item["bought"], "user"])
    viewers = set(on_item["user"]) - buyers
    return str(bundle.vocabs.items.decode([item_idx])[0]), buyers, viewers


def test_user_vectors_cover_every_user_with_finite_vectors(tiny):
    bundle, ids, vectors, log_z = tiny
    assert vectors.shape == (len(bundle.histories), bundle.dim)
    assert np.isfinite(vectors).all() and np.isfinite(log_z).all()
    assert len(set(ids)) == len(ids) and set(ids) <= set(bundle.vocabs.users.ids)


def test_audience_excludes_past_buyers_but_keeps_viewers(tiny):
    from towerline.marketing.audience import find_audience
    bundle, ids, vectors, log_z = tiny
    item, buyers, viewers = _buyers_and_viewers(bundle)
    everyone = find_audience(bundle, vectors, ids, item_id=item, size=len(ids), log_z=log_z)
    assert not buyers & set(everyone["user_id"])
    assert viewers <= set(everyone["user_id"])  # viewed but did not buy: a prospect, not excluded
    assert len(everyone) == len(ids) - len(buyers)
    assert everyone["score"].is_monotonic_decreasing


def test_audience_excludes_users_without_consent_or_outside_the_segment(tiny):
    from towerline.marketing.audience import find_audience
    bundle, ids, vectors, log_z = tiny
    item, _, _ = _buyers_and_viewers(bundle)
    top = find_audience(bundle, vectors, ids, item_id=item, size=5, log_z=log_z)["user_id"].tolist()
    profiles = pd.DataFrame({
        "user_id": ids.astype(str),
        "consent": ~np.isin(ids, top),  # the five best prospects said no
        "segment": np.where(np.arange(len(ids)) % 2 == 0, "active", "churned"),
        "rfm_group": "Lost",
    })
    got = find_audience(bundle, vectors, ids, item_id=item, size=20, profiles=profiles, log_z=log_z)
    assert len(got) == 20 and not set(top) & set(got["user_id"])
    churned = find_audience(bundle, vectors, ids, item_id=item, size=10, segment="churned", profiles=profiles, log_z=log_z)
    assert set(churned["segment"]) == {"churned"}
    # users missing from the profiles table have unknown consent and are left out too
    partial = find_audience(bundle, vectors, ids, item_id=item, size=len(ids), profiles=profiles.iloc[:50], log_z=log_z)
    assert set(partial["user_id"]) <= set(profiles["user_id"].iloc[:50])


def test_probability_scores_agree_with_a_numpy_softmax(tiny):
    from towerline.marketing.audience import find_audience, past_users
    bundle, ids, vectors, log_z = tiny
    item, _, _ = _buyers_and_viewers(bundle)
    got = find_audience(bundle, vectors, ids, item_id=item, size=10, log_z=log_z)
    idx = bundle.vocabs.items.encode_one(item)
    logits = vectors @ bundle.item_embeddings[2:].T  # real items only
    log_p = vectors @ bundle.item_embeddings[idx] - np.log(np.exp(logits).sum(axis=1))
    log_p[past_users(bundle, idx, ids)] = -np.inf
    expected = ids[np.argsort(-log_p)[:10]]
    assert got["user_id"].tolist() == expected.tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), np.sort(log_p)[::-1][:10], rtol=1e-4, atol=1e-4)


def test_a_purchase_after_training_excludes_its_user(tiny):
    from towerline.marketing.audience import find_audience
    bundle, ids, vectors, log_z = tiny
    item, _, _ = _buyers_and_viewers(bundle)
    first = find_audience(bundle, vectors, ids, item_id=item, size=1, log_z=log_z)["user_id"].iloc[0]
    extra = pd.DataFrame({"user_id": [first], "item_id": [item], "timestamp": [2_000_000_000], "event_type": ["purchase"]})
    after = find_audience(bundle, vectors, ids, item_id=item, size=len(ids), log_z=log_z, extra_history=extra)
    assert first not in set(after["user_id"])


def test_new_users_from_extra_history_get_vectors(tiny):
    from towerline.marketing.audience import user_vectors
    bundle, ids, vectors, _ = tiny
    item = str(bundle.vocabs.items.ids[0])
    extra = pd.DataFrame({"user_id": ["brand-new"], "item_id": [item], "timestamp": [1], "event_type": ["view"]})
    ids2, vectors2 = user_vectors(bundle, extra)
    assert "brand-new" in set(ids2) and len(ids2) == len(ids) + 1
    np.testing.assert_allclose(vectors2[np.isin(ids2, ids)], vectors, atol=1e-5)  # others unchanged


def test_attribute_query_and_bad_requests(tiny):
    from towerline.marketing.audience import (
        AudienceRequest,
        audience_response,
        find_audience,
    )
    bundle, ids, vectors, log_z = tiny
    token = bundle.items["attributes"].iloc[0][0]
    got = find_audience(bundle, vectors, ids, attributes=[token], size=7, log_z=log_z)
    assert len(got) == 7
    with pytest.raises(DataValidationError, match="not in the model's catalogue"):
        find_audience(bundle, vectors, ids, item_id="no-such-item", size=5, log_z=log_z)
    with pytest.raises(DataValidationError, match="no catalogue item carries"):
        find_audience(bundle, vectors, ids, attributes=["brand:nobody"], size=5, log_z=log_z)
    with pytest.raises(DataValidationError, match="needs profiles"):
        find_audience(bundle, vectors, ids, item_id=str(bundle.vocabs.items.ids[0]), size=5, segment="new")
    resp = audience_response(bundle, vectors, ids, AudienceRequest(attributes=[token], size=3), log_z=log_z)
    assert resp.size == 3 and resp.users[0].score >= resp.users[-1].score
    with pytest.raises(ValueError):
        AudienceRequest(size=3)
