"""Cold-start items: added with attributes only, then similar-item and recommendation answers include them.

In process through ``recommender.add_items`` and ``Recommender`` (flat, HNSW and IVF indexes); over
HTTP against a real Serve app with two ingress replicas in ``test_replicas.py``.
"""

from __future__ import annotations

import numpy as np
import pytest


def _twin_rows(state, n: int = 3) -> list[dict]:
    """New items carrying the attributes of the ``n`` most popular trained items."""
    items = state.bundle.items.set_index("item_id")
    out = []
    for i, idx in enumerate(state.facts.popular[:n]):
        source = str(state.bundle.vocabs.items.decode([idx])[0])
        out.append({"item_id": f"cold-{i}", "attributes": list(items.loc[source, "attributes"]), "price": 9.5,
                    "in_stock": True, "title": f"twin of {source}", "_source": source})
    return out


def _best_user(state, item_id: str) -> tuple[str, int]:
    """(user id, rank) of the trained user whose retrieval scores put ``item_id`` highest."""
    from towerline.serving import recommender as rec

    hist = state.bundle.histories
    rows = np.arange(len(hist))
    idx = state.bundle.vocabs.items.encode_one(item_id)
    best = (None, 10**9)
    histories = rec.training_histories(state.bundle, rows)
    for h, cands in zip(histories, rec.retrieve(state, rec.ServeSettings(), histories)):
        where = np.flatnonzero(cands[0] == idx)
        if where.size and where[0] < best[1]:
            best = (str(state.bundle.vocabs.users.decode([h.user_idx])[0]), int(where[0]))
    return best


def test_cold_item_vectors_are_the_attribute_path_of_the_item_tower(tiny_state):
    import torch

    from towerline.training.inference import cold_item_vectors

    net = tiny_state.bundle.net
    idx = int(tiny_state.facts.popular[0])
    attrs = net.item_tower.item_attributes[idx : idx + 1].numpy()  # (1, A)
    cold = cold_item_vectors(net, attrs)  # (1, D)
    with torch.no_grad():
        full = net.item_tower(torch.tensor([idx]))[0].numpy()
        id_part = net.item_tower.id_emb.weight[idx].numpy()
    np.testing.assert_allclose(cold[0], full - id_part, rtol=1e-5, atol=1e-6)
    assert np.abs(cold).sum() > 0


def test_added_items_get_the_vectors_of_the_bundles_fitted_mapper(tiny_state):
    """Training exports a fitted cold-item mapper; ``add_items`` (``POST /admin/items``, catalogue
    reloads) serves exactly its vectors, which the cold-start benchmark measures."""
    from towerline.serving import recommender as rec
    from towerline.training.inference import cold_item_vectors

    mapper = tiny_state.bundle.cold_items
    assert mapper is not None and (tiny_state.bundle.path / "retriever" / "cold_items.safetensors").is_file()
    rows = _twin_rows(tiny_state)
    new, _ = rec.add_items(tiny_state, [{k: v for k, v in r.items() if k != "_source"} for r in rows])
    net = tiny_state.bundle.net
    sources = tiny_state.bundle.vocabs.items.encode(np.asarray([r["_source"] for r in rows], dtype=object))
    attrs = net.item_tower.item_attributes[sources].numpy()  # (3, A): the twins' attribute rows
    expected = mapper.vectors(net.item_tower.item_attributes[sources]).numpy()
    got = new.bundle.item_embeddings[tiny_state.n_items :]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, cold_item_vectors(net, attrs, mapper), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, cold_item_vectors(net, attrs), atol=1e-4), "the mapper, not the tower's path"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_added_item_is_similar_to_its_attribute_twin_and_recommendable(tiny_run, kind):
    from towerline.config import IndexConfig
    from towerline.serving import recommender as rec
    from towerline.serving.history import SQLiteHistoryStore
    from towerline.serving.index import build_index, search

    state = rec.load_model(tiny_run.bundle_dir)
    if kind != "flat":
        cfg = IndexConfig(kind=kind, ivf_nlist=4) if kind == "ivf" else IndexConfig(kind=kind)
        index = build_index(state.bundle.item_embeddings, cfg)
        if kind == "ivf":
            index.nprobe = 4  # every list: the test is about adding, not about IVF recall
        else:
            index.hnsw.efSearch = 256  # the whole tiny graph
        state = rec.dataclasses.replace(state, index=index, index_manifest={**state.index_manifest, "kind": kind},
                                        exact=False)
    rows = _twin_rows(state)
    before_n, before_ntotal = state.n_items, state.index.ntotal
    new, report = rec.add_items(state, [{k: v for k, v in r.items() if k != "_source"} for r in rows]
                                + [{"item_id": rows[0]["_source"], "attributes": []}])
    assert report.added == [r["item_id"] for r in rows] and report.known == [rows[0]["_source"]]
    assert (state.n_items, state.index.ntotal) == (before_n, before_ntotal), "the served state must not change"
    assert new.n_items == before_n + 3 and new.index.ntotal == before_ntotal + 3 and new.key != state.key
    # known rows keep their index and vector
    np.testing.assert_array_equal(new.bundle.item_embeddings[:before_n], state.bundle.item_embeddings)
    assert new.bundle.vocabs.items.encode_one(rows[0]["item_id"]) == before_n

    settings = rec.ServeSettings()
    # the index returns the new rows under their own labels, scored against their own vectors
    vec = new.bundle.item_embeddings[before_n : before_n + 1]  # (1, D)
    scores, labels = search(new.index, vec, new.index.ntotal)
    where = np.flatnonzero(labels[0] == before_n)
    assert where.size == 1
    np.testing.assert_allclose(scores[0, where[0]], float(vec[0] @ vec[0]), rtol=1e-3)
    # the cold item has neighbours, and its twins (same attributes) rank it above most items
    sim = rec.similar_items(new, settings, "cold-0", 5)
    assert len(sim) == 5 and "cold-0" not in [i for i, _ in sim]
    everything = rec.similar_items(new, settings, rows[0]["_source"], new.n_items - 3)
    position = [i for i, _ in everything].index("cold-0")
    assert position < len(everything) // 2, f"cold twin ranked {position} of {len(everything)}"

    # recommendable through the one request path
    user, rank = _best_user(new, "cold-0")
    assert user is not None, "no user retrieves the cold item at all"
    store = SQLiteHistoryStore(tiny_run.bundle_dir.parent / f"cold-{kind}.sqlite")
    k = min(rank + 1 + 10, settings.max_k)
    got = rec.Recommender(new, settings, store).recommend(user, k=k).items
    assert "cold-0" in [i for i, _ in got]


def test_catalogue_reload_adds_only_new_ids_and_an_empty_call_changes_nothing(tiny_state):
    from towerline.serving import recommender as rec

    catalogue = tiny_state.bundle.items[["item_id", "attributes"]].to_dict("records")
    same, report = rec.add_items(tiny_state, catalogue)
    assert same is tiny_state and report.added == [] and len(report.known) == len(catalogue)
    new, report = rec.add_items(tiny_state, catalogue + [{"item_id": "cold-x", "attributes": ["never-seen-token"]}])
    assert report.added == ["cold-x"] and report.without_attributes == ["cold-x"]
    assert new.facts.in_stock[-1] and new.facts.popularity[-1] == 0


# Over HTTP, with two ingress replicas: tests/serving/test_replicas.py
