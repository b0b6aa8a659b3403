"""Id dropout (DropoutNet) and the attribute-only vectors cold-start items get."""

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


def test_id_dropout_must_be_a_probability_below_one():
    with pytest.raises(ConfigError, match="id_dropout"):
        TwoTowerConfig(id_dropout=1.0)
