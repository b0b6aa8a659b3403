"""Losses: full softmax against a slow reference, sampled softmax against the full one, logQ, masking."""

from __future__ import annotations

import math

import pytest
import torch

from towerline.features.vocab import N_RESERVED, PAD_IDX, UNK_IDX
from towerline.training.losses import (
    full_softmax_loss,
    log_sampling_prob,
    sample_uniform_negatives,
    sampled_softmax_loss,
)

V, D, N = 12, 4, 6  # table size incl. PAD/UNK, width, rows


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(N, D, generator=g)
    items = torch.randn(V, D, generator=g)
    targets = torch.tensor([2, 5, 5, 11, 7, 3])
    return states, items, targets


def _reference_full_softmax(states, items, targets, temperature=1.0):
    """Row by row: -log softmax over the real items only."""
    losses = []
    for s, t in zip(states, targets):
        logits = torch.tensor([float(s @ items[j]) / temperature for j in range(N_RESERVED, V)])
        losses.append(-(logits[t - N_RESERVED] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


def test_full_softmax_matches_a_row_by_row_reference_and_ignores_reserved_columns():
    states, items, targets = _data()
    got = full_softmax_loss(states, items, targets, temperature=0.5)
    assert torch.allclose(got, _reference_full_softmax(states, items, targets, 0.5), atol=1e-5)
    # making PAD/UNK look like perfect matches changes nothing: they are not candidates
    items2 = items.clone()
    items2[PAD_IDX] = 100 * states.mean(0)
    items2[UNK_IDX] = 100 * states.mean(0)
    assert torch.allclose(full_softmax_loss(states, items2, targets, 0.5), got, atol=1e-6)


def test_pad_and_unk_targets_contribute_nothing_to_the_full_softmax():
    states, items, targets = _data()
    with_pad = targets.clone()
    with_pad[1] = PAD_IDX
    with_pad[4] = UNK_IDX
    keep = torch.tensor([0, 2, 3, 5])
    got = full_softmax_loss(states, items, with_pad)
    assert torch.allclose(got, full_softmax_loss(states[keep], items, targets[keep]), atol=1e-6)
    all_pad = torch.full((N,), PAD_IDX)
    states.requires_grad_(True)
    zero = full_softmax_loss(states, items, all_pad)
    assert zero.item() == 0.0
    zero.backward()  # still part of the graph
    assert torch.count_nonzero(states.grad) == 0


def test_sampled_softmax_equals_full_softmax_when_every_item_is_sampled():
    states, items, targets = _data()
    every = torch.arange(N_RESERVED, V)  # each real item once as a negative
    for temperature in (1.0, 0.3):
        full = full_softmax_loss(states, items, targets, temperature)
        sampled = sampled_softmax_loss(
            states, items[targets], targets, items[every], every,
            temperature=temperature, logq_correction=False, in_batch=False,
        )
        assert torch.allclose(sampled, full, atol=1e-5)
        # a uniform Q is a constant shift of every logit, positive included: still the full softmax
        q = torch.full((V - N_RESERVED,), math.log(1 / (V - N_RESERVED)))
        uniform = sampled_softmax_loss(
            states, items[targets], targets, items[every], every,
            negative_logq=q, target_logq=q[:N], temperature=temperature, in_batch=False,
        )
        assert torch.allclose(uniform, full, atol=1e-5)


def test_sampled_softmax_matches_a_hand_built_logit_matrix_with_in_batch_hits_masked():
    states, items, targets = _data()  # targets 5 and 5 repeat: an in-batch accidental hit
    neg_ids = torch.tensor([7, 9, 2])  # 7 and 2 are targets of rows 4 and 0: accidental hits there
    logq = torch.log(torch.linspace(0.01, 0.2, V))  # any Q, one value per item
    got = sampled_softmax_loss(
        states, items[targets], targets, items[neg_ids], neg_ids,
        negative_logq=logq[neg_ids], target_logq=logq[targets], temperature=0.5,
    )
    columns = torch.cat([targets, neg_ids])  # in-batch columns, then uniform columns
    expected = []
    for i in range(N):
        pos = float(states[i] @ items[targets[i]]) / 0.5 - logq[targets[i]]
        negs = [
            float(states[i] @ items[c]) / 0.5 - logq[c]
            for c in columns.tolist()
            if c != int(targets[i])
        ]
        row = torch.tensor([pos] + negs)
        expected.append(-(row[0] - torch.logsumexp(row, 0)))
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-5)


def test_logq_correction_changes_the_loss_and_can_be_switched_off():
    states, items, targets = _data()
    neg_ids = torch.tensor([4, 6, 8, 10])
    logq = torch.log(torch.linspace(0.01, 0.3, V))
    args = (states, items[targets], targets, items[neg_ids], neg_ids, logq[neg_ids], logq[targets])
    corrected = sampled_softmax_loss(*args)
    plain = sampled_softmax_loss(*args, logq_correction=False)
    assert not torch.allclose(corrected, plain)
    assert torch.allclose(plain, sampled_softmax_loss(states, items[targets], targets, items[neg_ids], neg_ids,
                                                      logq_correction=False))


def test_pad_targets_are_dropped_and_never_used_as_negatives():
    states, items, targets = _data()
    with_pad = targets.clone()
    with_pad[2] = PAD_IDX
    keep = torch.tensor([0, 1, 3, 4, 5])
    neg_ids = torch.tensor([4, 6])
    got = sampled_softmax_loss(states, items[with_pad], with_pad, items[neg_ids], neg_ids, logq_correction=False)
    ref = sampled_softmax_loss(states[keep], items[targets[keep]], targets[keep], items[neg_ids], neg_ids,
                               logq_correction=False)
    assert torch.allclose(got, ref, atol=1e-6)


def test_gradient_flows_to_states_targets_and_negatives():
    states, items, targets = _data()
    items.requires_grad_(True)
    states.requires_grad_(True)
    neg_ids = sample_uniform_negatives(V, 5, generator=torch.Generator().manual_seed(1))
    logq = log_sampling_prob(torch.arange(V).float(), n_in_batch=N, n_uniform=5)
    loss = sampled_softmax_loss(states, items[targets], targets, items[neg_ids], neg_ids,
                                logq[neg_ids], logq[targets], temperature=0.2)
    loss.backward()
    assert torch.isfinite(loss)
    assert states.grad.abs().sum() > 0
    assert items.grad[targets].abs().sum() > 0
    assert items.grad[neg_ids].abs().sum() > 0
    assert torch.count_nonzero(items.grad[:N_RESERVED]) == 0


def test_uniform_negatives_are_never_reserved_and_cover_the_real_items():
    ids = sample_uniform_negatives(V, 2000, generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.long and ids.shape == (2000,)
    assert int(ids.min()) >= N_RESERVED and int(ids.max()) < V
    assert set(ids.tolist()) == set(range(N_RESERVED, V))
    with pytest.raises(ValueError, match="no real item"):
        sample_uniform_negatives(N_RESERVED, 3)


def test_log_sampling_prob_is_the_expected_count_under_mixed_sampling():
    counts = torch.tensor([50.0, 9.0, 1.0, 3.0, 0.0, 6.0])  # reserved counts are ignored
    logq = log_sampling_prob(counts, n_in_batch=10, n_uniform=8)
    n_real = 4
    expected = torch.tensor([10 * c / 10.0 + 8 / n_real for c in (1.0, 3.0, 0.0, 6.0)])
    assert torch.allclose(logq[N_RESERVED:].exp(), expected, atol=1e-5)
    assert torch.isneginf(logq[:N_RESERVED]).all()


def test_sampled_softmax_refuses_to_run_without_negatives_or_logq():
    states, items, targets = _data()
    with pytest.raises(ValueError, match="needs negatives"):
        sampled_softmax_loss(states, items[targets], targets, in_batch=False)
    with pytest.raises(ValueError, match="logq_correction needs"):
        sampled_softmax_loss(states, items[targets], targets)



def test_log_sampling_prob_of_some_ids_is_the_table_entries_bit_for_bit():
    counts = torch.tensor([0.0, 0.0, 5.0, 1.0, 0.0, 9.0, 3.0])
    table = log_sampling_prob(counts, n_in_batch=7, n_uniform=3)
    ids = torch.tensor([5, 1, 2, 2, 4, 0, 6])
    assert torch.equal(log_sampling_prob(counts, n_in_batch=7, n_uniform=3, ids=ids), table[ids])
    assert torch.isinf(table[:2]).all() and torch.isfinite(table[2:]).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_full_softmax_value_and_gradients_match_autograd_cross_entropy(temperature):
    """The fused backward (softmax - onehot in place, scales on the small products) is the gradient
    of ``F.cross_entropy`` over the real columns, ignored rows included."""
    g = torch.Generator().manual_seed(3)
    states = torch.randn(40, 8, generator=g, requires_grad=True)
    items = torch.randn(30, 8, generator=g, requires_grad=True)
    targets = torch.randint(N_RESERVED, 30, (40,), generator=g)
    targets[::7] = PAD_IDX
    targets[3] = UNK_IDX
    got = full_softmax_loss(states, items, targets, temperature)
    g_states, g_items = torch.autograd.grad(got, (states, items))
    real = targets >= N_RESERVED
    logits = states[real] @ items[N_RESERVED:].T / temperature
    want = torch.nn.functional.cross_entropy(logits, targets[real] - N_RESERVED)
    w_states, w_items = torch.autograd.grad(want, (states, items))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(g_states, w_states, atol=1e-6)
    assert torch.allclose(g_items, w_items, atol=1e-6)
    assert torch.count_nonzero(g_states[~real]) == 0
    assert torch.count_nonzero(g_items[:N_RESERVED]) == 0
