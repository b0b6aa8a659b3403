"""Id dropout (DropoutNet), the attribute-only vectors and the fitted mapper cold-start items get."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towerline.config import TwoTowerConfig
from towerline.errors import ConfigError
from towerline.training.inference import cold_item_vectors
from towerline.training.model import TwoTowerNet


def _net(**cfg) -> TwoTowerNet:
    torch.manual_seed(0)
    attrs = torch.tensor([[0, 0], [0, 0], [2, 3], [2, 3], [4, 0], [3, 4]])  # (V=6, A=2)
    return TwoTowerNet(6, 5, 4, TwoTowerConfig(dim=8, max_len=4, n_layers=1, n_heads=2, max_attributes=2, **cfg), attrs)


def test_id_dropout_replaces_dropped_items_by_their_attribute_part_and_zero_keeps_them():
    net = _net()
    tower = net.item_tower
    full = tower.all_items()  # (V, D)
    torch.testing.assert_close(tower.all_items(0.0), full)
    torch.manual_seed(1)
    dropped = tower.all_items(0.999)  # every row's id part gone
    attr_only = tower.attribute_vectors(tower.item_attributes)
    torch.testing.assert_close(dropped, attr_only)
    # per occurrence in forward: each entry is either the full vector or the attribute-only one
    idx = torch.tensor([[2, 3, 4, 5]] * 50)
    out = tower(idx, id_dropout=0.5)  # (50, 4, D)
    is_full = torch.isclose(out, full[idx]).all(-1)
    is_attr = torch.isclose(out, attr_only[idx]).all(-1)
    assert (is_full | is_attr).all() and is_full.any() and is_attr.any()


def test_items_with_the_same_attributes_get_the_same_cold_vector_in_the_tower_space():
    net = _net().eval()
    rows = np.array([[2, 3], [2, 3], [4, 0]])
    cold = cold_item_vectors(net, rows)  # (3, D)
    assert cold.shape == (3, 8) and cold.dtype == np.float32
    np.testing.assert_array_equal(cold[0], cold[1])
    expected = (net.item_vectors() - net.item_tower.id_emb.weight).detach().numpy()[[2, 4]]
    np.testing.assert_allclose(cold[[0, 2]], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        cold_item_vectors(net, np.array([[9, 0]]))


def test_fitted_mapper_maps_an_attribute_bag_to_where_its_warm_items_sit(tmp_path):
    from towerline.training import cold_items

    net = _net().eval()
    emb = net.item_vectors().detach().numpy()  # (V, D): what the index holds
    pop = np.array([0, 0, 3, 1, 2, 5])
    mapper = cold_items.fit_from_net(net, emb, pop, l2=1e-6, weighting="uniform", rescale=False)
    rows = np.array([[2, 3], [3, 2], [4, 0], [0, 0]])
    cold = cold_item_vectors(net, rows, mapper)  # (4, D): the one cold-item path, with the bundle's mapper
    np.testing.assert_allclose(cold[0], (emb[2] + emb[3]) / 2, atol=1e-4)  # the two warm items with bag {2, 3}
    np.testing.assert_array_equal(cold[0], cold[1])  # a bag: order does not matter
    np.testing.assert_allclose(cold[2], emb[4], atol=1e-4)
    np.testing.assert_array_equal(cold[3], np.zeros(8, np.float32))  # no attributes: nothing places it
    assert not np.allclose(cold[:3], cold_item_vectors(net, rows[:3]), atol=1e-3), "must differ from the tower path"
    # stored in a bundle directory as safetensors + JSON metadata, loaded back to the same vectors
    mapper.save(tmp_path)
    loaded = cold_items.load_mapper(tmp_path)
    assert loaded.meta == mapper.meta and loaded.scale == mapper.scale
    np.testing.assert_array_equal(cold_item_vectors(net, rows, loaded), cold)
    assert cold_items.load_mapper(tmp_path / "none") is None


def test_mapper_keeps_the_prior_for_unfitted_tokens_and_rescales_to_the_warm_norms():
    from towerline.training import cold_items

    rng = np.random.default_rng(0)
    rows = np.array([[0, 0], [0, 0], [2, 0], [2, 3], [3, 0], [3, 2], [2, 0]])  # (V=7, A=2); token 4 unused
    Y = rng.normal(size=(7, 4))
    prior = rng.normal(size=(5, 4))
    pop = np.array([0, 0, 4, 1, 2, 3, 0])  # item 6 has no training interactions: not fitted on
    m = cold_items.fit_mapper(Y, rows, pop, prior, l2=10.0, weighting="log", rescale=True)
    np.testing.assert_allclose(m.weight[4].numpy(), prior[4], rtol=1e-5)  # no warm item carries it
    assert m.meta["fitted_items"] == 4
    w = np.log1p(pop[2:6])
    pred = m.vectors(torch.from_numpy(rows[2:6])).double().numpy()
    np.testing.assert_allclose(w @ np.linalg.norm(pred, axis=1), w @ np.linalg.norm(Y[2:6], axis=1), rtol=1e-5)
    with pytest.raises(cold_items.NoWarmItems):
        cold_items.fit_mapper(Y, rows, np.zeros(7), prior)


def test_id_dropout_must_be_a_probability_below_one():
    with pytest.raises(ConfigError, match="id_dropout"):
        TwoTowerConfig(id_dropout=1.0)
