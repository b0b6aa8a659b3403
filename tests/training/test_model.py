"""TwoTowerNet: shapes, causality, padding invariance, no NaN, round trip, and that it learns."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from towerline.config import TwoTowerConfig
from towerline.errors import BundleError
from towerline.features.vocab import N_RESERVED, PAD_IDX
from towerline.training.losses import full_softmax_loss
from towerline.training.model import TwoTowerNet, attention_mask, build_two_tower

N_ITEMS = 30  # table size incl. PAD/UNK
N_ATTRS = 9
N_EVENTS = 4
CFG = TwoTowerConfig(dim=16, max_len=10, n_layers=2, n_heads=2, dropout=0.1, max_attributes=3)


def _attributes(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(N_RESERVED, N_ATTRS, (N_ITEMS, 3), generator=g)  # (V, 3)
    table[:, 2] = PAD_IDX  # at most two attributes per item
    table[5] = PAD_IDX  # one item without attributes
    return table


def _net(cfg: TwoTowerConfig = CFG, seed: int = 0) -> TwoTowerNet:
    torch.manual_seed(seed)
    return TwoTowerNet(N_ITEMS, N_ATTRS, N_EVENTS, cfg, item_attributes=_attributes()).eval()


def _history(lengths: list[int], T: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) items and event types."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(N_RESERVED, N_ITEMS, (len(lengths), T), generator=g)
    events = torch.randint(N_RESERVED, N_EVENTS, (len(lengths), T), generator=g)
    for b, n in enumerate(lengths):
        items[b, : T - n] = PAD_IDX
        events[b, : T - n] = PAD_IDX
    return items, events


def test_shapes_of_item_vectors_states_and_user_vector():
    net = _net()
    hist, ev = _history([10, 4, 1], T=10)
    assert net.item_vectors().shape == (N_ITEMS, 16)
    assert net.item_tower(hist).shape == (3, 10, 16)
    assert net.user_states(hist, ev).shape == (3, 10, 16)
    assert net.user_vector(hist, ev).shape == (3, 16)
    assert torch.equal(net(hist, ev), net.user_vector(hist, ev))


def test_item_tower_lookup_matches_all_items_and_pad_is_zero():
    net = _net()
    idx = torch.arange(N_ITEMS)
    assert torch.allclose(net.item_tower(idx), net.item_vectors(), atol=1e-6)
    assert torch.count_nonzero(net.item_vectors()[PAD_IDX]) == 0


def test_attributes_change_item_vectors_and_are_ignored_when_disabled():
    with_attrs = _net()
    no_attr_cfg = dataclasses.replace(CFG, use_attributes=False)
    without = _net(no_attr_cfg)
    # same seed, so same id embeddings: the difference is the pooled attribute vector
    diff = (with_attrs.item_vectors() - with_attrs.item_tower.id_emb.weight).norm(dim=1)
    assert diff[5] == 0  # item 5 has no attributes
    assert bool((diff[N_RESERVED:5] > 0).all())
    assert without.item_tower.attr_emb is None
    assert "item_tower.item_attributes" not in without.state_dict()
    assert torch.equal(without.item_vectors(), without.item_tower.id_emb.weight)


def test_items_sharing_attributes_share_the_attribute_part():
    table = _attributes()
    table[7] = torch.tensor([3, 4, PAD_IDX])
    table[8] = torch.tensor([4, 3, PAD_IDX])
    torch.manual_seed(0)
    net = TwoTowerNet(N_ITEMS, N_ATTRS, N_EVENTS, CFG, item_attributes=table)
    attr_part = net.item_vectors() - net.item_tower.id_emb.weight  # (V, D)
    assert torch.allclose(attr_part[7], attr_part[8], atol=1e-6)
    expected = net.item_tower.attr_emb.weight[[3, 4]].mean(0)
    assert torch.allclose(attr_part[7], expected, atol=1e-6)


def test_changing_a_future_item_does_not_change_earlier_states():
    net = _net()
    hist, ev = _history([10, 7], T=10)
    before = net.user_states(hist, ev)
    changed = hist.clone()
    changed[:, 6] = (changed[:, 6] + 1 - N_RESERVED) % (N_ITEMS - N_RESERVED) + N_RESERVED
    after = net.user_states(changed, ev)
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-6)
    assert not torch.allclose(before[:, 6:], after[:, 6:], atol=1e-4)


def test_more_left_padding_does_not_change_the_last_state():
    net = _net()
    hist, ev = _history([4, 2], T=4)
    short = net.user_vector(hist, ev)
    pad = torch.zeros(2, 6, dtype=torch.long)
    longer = net.user_vector(torch.cat([pad, hist], dim=1), torch.cat([pad, ev], dim=1))
    assert torch.allclose(short, longer, atol=1e-5)


def test_fully_padded_rows_and_prefixes_give_no_nan_in_training_mode():
    net = _net().train()
    hist, ev = _history([0, 1, 10], T=10)
    states = net.user_states(hist, ev)
    assert torch.isfinite(states).all()
    states.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_attention_mask_lets_every_query_see_itself_and_real_queries_no_pads():
    pad = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])  # (B, T)
    allowed = attention_mask(pad)[:, 0]  # (B, T, T)
    assert bool(allowed.any(dim=-1).all())  # no query with nothing to attend to
    assert bool(allowed.diagonal(dim1=1, dim2=2).all())
    expected_row1 = torch.tensor([[True, False, False], [False, True, False], [False, True, True]])
    assert torch.equal(allowed[1], expected_row1)
    assert torch.equal(allowed[2], torch.ones(3, 3, dtype=torch.bool).tril())


def test_event_type_changes_the_state_only_when_enabled():
    hist, ev = _history([5], T=5)
    other = ev.clone()
    other[0, -1] = N_RESERVED if ev[0, -1] != N_RESERVED else N_RESERVED + 1
    net = _net()
    assert not torch.allclose(net.user_vector(hist, ev), net.user_vector(hist, other), atol=1e-5)
    off = _net(dataclasses.replace(CFG, use_event_type=False))
    assert torch.equal(off.user_vector(hist, ev), off.user_vector(hist, other))
    assert torch.equal(off.user_vector(hist, ev), off.user_vector(hist, None))


def test_precomputed_item_table_gives_the_same_states():
    net = _net()
    hist, ev = _history([10, 3], T=10)
    direct = net.user_states(hist, ev)
    via_table = net.user_states(hist, ev, item_table=net.item_vectors())
    assert torch.allclose(direct, via_table, atol=1e-6)


def test_history_longer_than_max_len_is_rejected_naming_the_length():
    net = _net()
    hist, ev = _history([12], T=12)
    with pytest.raises(ValueError, match="history length 12 exceeds max_len=10"):
        net.user_states(hist, ev)


def test_state_dict_round_trips_through_meta_json_and_safetensors(tmp_path):
    net = _net()
    meta = json.loads(json.dumps(net.meta()))  # what a bundle's config.json holds
    save_file(net.state_dict(), tmp_path / "weights.safetensors")
    rebuilt = build_two_tower(meta)
    rebuilt.load_state_dict(load_file(tmp_path / "weights.safetensors"))
    rebuilt.eval()
    hist, ev = _history([10, 5, 1], T=10)
    assert torch.equal(rebuilt.item_tower.item_attributes, net.item_tower.item_attributes)
    assert torch.equal(rebuilt.item_vectors(), net.item_vectors())
    assert torch.equal(rebuilt.user_vector(hist, ev), net.user_vector(hist, ev))


def test_build_two_tower_names_a_missing_key():
    meta = _net().meta()
    del meta["n_event_types"]
    with pytest.raises(BundleError, match="n_event_types"):
        build_two_tower(meta)


def test_build_two_tower_rejects_an_unknown_config_key():
    meta = _net().meta()
    meta["cfg"]["dimm"] = 3
    with pytest.raises(BundleError, match="did you mean 'dim'"):
        build_two_tower(meta)


def test_out_of_range_attribute_is_reported_with_its_row():
    table = _attributes()
    table[4, 0] = N_ATTRS
    with pytest.raises(ValueError, match="row 4"):
        TwoTowerNet(N_ITEMS, N_ATTRS, N_EVENTS, CFG, item_attributes=table)


def test_adam_steps_lower_the_full_softmax_loss_on_a_toy_sequence_task():
    # every sequence walks the catalogue in order (i -> i + 1), from a random start, with left pads
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, dropout=0.0)
    net = TwoTowerNet(N_ITEMS, N_ATTRS, N_EVENTS, cfg, item_attributes=_attributes()).train()
    n_real = N_ITEMS - N_RESERVED
    starts = torch.randint(0, n_real, (32, 1))
    seq = (starts + torch.arange(11)) % n_real + N_RESERVED  # (32, 11)
    lengths = torch.randint(2, 12, (32, 1))
    seq[torch.arange(11) < 11 - lengths] = PAD_IDX
    inputs, targets = seq[:, :-1], seq[:, 1:]  # (32, 10)
    events = torch.where(inputs == PAD_IDX, PAD_IDX, N_RESERVED)
    mask = (inputs != PAD_IDX) & (targets != PAD_IDX)  # (32, 10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def loss_now() -> torch.Tensor:
        table = net.item_vectors()
        states = net.user_states(inputs, events, item_table=table)
        return full_softmax_loss(states[mask], table, targets[mask])

    first = loss_now().item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    last = loss_now().item()
    assert first > 3.0  # about log(28) at initialisation
    assert last < 0.5 * first


def test_catalogue_pooling_backward_is_the_embedding_bag_gradient_and_follows_a_new_table():
    """``all_items`` in training takes its attribute gradient from one sparse product with the
    pooling matrix; outputs are EmbeddingBag's bit for bit, gradients within float rounding, and a
    table loaded later (``load_state_dict``) is the one the gradient follows."""
    net = _net().train()
    tower = net.item_tower
    table = tower.item_attributes.clone()
    table[9] = torch.tensor([4, 4, PAD_IDX])  # an attribute listed twice counts twice, as in the bag
    for attrs in (tower.item_attributes, table):
        tower.load_state_dict({**tower.state_dict(), "item_attributes": attrs})
        upstream = torch.randn(N_ITEMS, 16, generator=torch.Generator().manual_seed(2))
        got = tower.all_items()
        (got * upstream).sum().backward()
        fast = tower.attr_emb.weight.grad.clone()
        tower.attr_emb.weight.grad = None
        want = tower.id_emb.weight + torch.nn.functional.embedding_bag(
            tower.item_attributes, tower.attr_emb.weight, mode="mean", padding_idx=PAD_IDX)
        (want * upstream).sum().backward()
        assert torch.equal(got, want)
        assert torch.allclose(fast, tower.attr_emb.weight.grad, atol=1e-6)
        assert torch.count_nonzero(fast[PAD_IDX]) == 0
        tower.zero_grad(set_to_none=True)
    with torch.no_grad():  # serving's path: the same numbers as the training forward
        assert torch.equal(tower.all_items(), got.detach())
        pooled = tower.attribute_vectors(tower.item_attributes)
        assert torch.equal(tower.id_emb.weight + pooled, got.detach())
