"""Next-item losses over user states and item vectors: full softmax and sampled softmax with logQ.

Functions over tensors, testable without a Trainer. The Lightning system passes the user states of
the non-padding positions (``states[mask]``, shape (N, D)) and the item each of them should predict.

- ``full_softmax_loss``: cross-entropy over the whole catalogue. Training SASRec-style sequence
  models with the full softmax instead of one sampled negative per position is what closes most of
  the gap to newer models (Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really
  better than SASRec?", RecSys 2023); it is the default whenever an (N, V) logit matrix fits.
- ``sampled_softmax_loss``: for catalogues too big for that, a softmax over the positive, the other
  rows' positives (in-batch negatives) and M items drawn uniformly (mixed negative sampling, Yang et
  al., WWW 2020 companion). In-batch negatives are drawn in proportion to item frequency, so without
  a correction the model learns to push popular items down; subtracting ``log Q(item)`` from each
  logit (Yi et al., "Sampling-bias-corrected neural modeling for large corpus item
  recommendations", RecSys 2019; Bengio & Senecal 2008 for the importance-sampling origin) makes the
  sampled softmax an estimate of the full one again.

Targets below ``N_RESERVED`` (PAD, UNK) contribute nothing: PAD marks "no next item", and UNK is not
a real item that could ever be retrieved.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from towerline.features.vocab import N_RESERVED

log = logging.getLogger(__name__)

_IGNORE = -100  # F.cross_entropy's ignore_index


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that is still connected to the graph, for batches without a single real target."""
    return sum(t.sum() * 0.0 for t in tensors)  # type: ignore[return-value]


def full_softmax_loss(
    states: torch.Tensor,
    item_vectors: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of each state's target against every real item.

    Args:
        states: (N, D) user states.
        item_vectors: (V, D) the whole item table, reserved rows included.
        targets: (N,) long item indices; rows with a PAD or UNK target are ignored.
        temperature: logits are ``states @ item_vectors.T / temperature``.
        label_smoothing: share of the target's probability mass spread evenly over the real items
            (Szegedy et al., CVPR 2016); 0 is the plain cross-entropy.

    Returns:
        scalar: mean over rows with a real target (0, still differentiable, when there is none).

    The reserved columns are not scored at all (logits are computed against ``item_vectors[2:]``),
    which is the same as giving them ``-inf`` without materialising two useless columns.
    """
    real = targets >= N_RESERVED  # (N,)
    if not bool(real.any()):
        return _zero_loss(states, item_vectors)
    labels = torch.where(real, targets - N_RESERVED, torch.full_like(targets, _IGNORE))  # (N,)
    if label_smoothing > 0:  # the fused backward assumes a one-hot target: autograd's path for smoothing
        logits = states @ item_vectors[N_RESERVED:].T  # (N, V - 2)
        if temperature != 1.0:
            logits = logits / temperature
        return F.cross_entropy(logits, labels, ignore_index=_IGNORE, label_smoothing=label_smoothing)
    return _FullSoftmaxCrossEntropy.apply(states, item_vectors[N_RESERVED:], labels, 1.0 / temperature)


class _FullSoftmaxCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(states @ items.T / temperature, labels, ignore_index=_IGNORE)`` in fewer
    passes over the (N, V) logits, the one big tensor of a training step.

    Autograd's version writes and reads several (N, V) tensors around the two matmuls: the
    log-softmax output, a zero-filled (N, V) gradient that NLL scatters into, and the log-softmax
    backward's output (each freshly allocated, so page-faulted, on CPU). Here the backward turns
    the saved log-probabilities into ``softmax - onehot`` in place, one pass, and applies ``1/N``
    and the temperature to the (N, D) and (V, D) products instead of the (N, V) matrix. Same value
    and gradients up to float rounding (``tests/training/test_losses.py``). A second backward
    through the same graph is refused by autograd (the saved tensor was changed in place).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, states: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, inv_temp: float) -> torch.Tensor:
        scaled = states * inv_temp if inv_temp != 1.0 else states  # (N, D): cheaper than scaling (N, V)
        logp = torch.log_softmax((scaled @ items.T).float(), dim=1)  # (N, V')
        kept = labels != _IGNORE  # (N,)
        n = kept.sum()
        picked = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)  # (N,)
        ctx.save_for_backward(scaled, items, labels, logp)
        ctx.inv_temp = inv_temp
        ctx.n = n
        return -(picked * kept).sum() / n

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        scaled, items, labels, logp = ctx.saved_tensors
        p = logp.exp_()  # (N, V') softmax, in place of the saved log-probabilities
        kept = labels != _IGNORE
        rows = torch.nonzero(kept).squeeze(1)
        p[rows, labels[rows]] -= 1.0  # softmax - onehot
        if not bool(kept.all()):
            p[~kept] = 0.0
        coef = grad / ctx.n  # d loss / d logits = coef * (softmax - onehot)
        p = p.to(items.dtype)
        grad_states = (p @ items) * (coef * ctx.inv_temp)  # (N, D)
        grad_items = (p.T @ scaled) * coef  # (V', D)
        return grad_states.to(scaled.dtype), grad_items, None, None


def sample_uniform_negatives(
    n_items: int,
    m: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(m,) long item indices drawn uniformly, with replacement, from the real items
    ``[N_RESERVED, n_items)``: never PAD or UNK. Each draw has probability ``1 / (n_items - 2)``."""
    if n_items <= N_RESERVED:
        raise ValueError(f"n_items={n_items} leaves no real item to sample (the first {N_RESERVED} are reserved)")
    return torch.randint(N_RESERVED, n_items, (m,), generator=generator, device=device)


def log_sampling_prob(
    item_counts: torch.Tensor,
    n_in_batch: int,
    n_uniform: int,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(V,) log of the expected number of times each item appears among a step's negatives.

    With mixed sampling an item can arrive two ways: as one of ``n_in_batch`` in-batch targets, each
    drawn with probability ``count / total`` (targets follow the training data's item frequency), and
    as one of ``n_uniform`` uniform draws with probability ``1 / n_real``. The expected count
    ``n_in_batch * p_freq + n_uniform / n_real`` is the proposal ``Q`` of sampled softmax (Jean et
    al., ACL 2015; Yi et al., RecSys 2019), whatever route a given negative took, so one table serves
    for targets and negatives alike: ``target_logq = logq[targets]``, ``negative_logq = logq[ids]``.
    Reserved rows get ``-inf`` (they are never sampled).

    Args:
        item_counts: (V,) how often each item is a training target (reserved rows are ignored).
        n_in_batch: in-batch negatives per step (the number of targets in a batch; 0 for none).
        n_uniform: uniform negatives per step.
        ids: (K,) long item indices: return only their entries, ``table[ids]`` bit for bit,
            without the (V,) passes a step would pay at a million items (~0.1 s of CPU each).
    """
    n_rows = item_counts.numel()
    n_real = n_rows - N_RESERVED
    if n_real <= 0:
        raise ValueError(f"item_counts has {n_rows} rows; the first {N_RESERVED} are reserved")
    full = item_counts.to(torch.float64).clone()
    full[:N_RESERVED] = 0.0
    total = full.sum()  # the same sum either way, so ``ids`` changes no bit
    counts = full if ids is None else full[ids]  # (V,) or (K,)
    reserved = slice(0, N_RESERVED) if ids is None else ids < N_RESERVED  # rows never sampled
    p_freq = counts / total if total > 0 else torch.zeros_like(counts)
    expected = n_in_batch * p_freq + n_uniform / n_real
    expected[reserved] = 0.0
    return expected.log().to(torch.float32)  # log 0 = -inf for the reserved rows


def sampled_softmax_loss(
    states: torch.Tensor,
    target_vectors: torch.Tensor,
    targets: torch.Tensor,
    negative_vectors: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    negative_logq: torch.Tensor | None = None,
    target_logq: torch.Tensor | None = None,
    temperature: float = 1.0,
    logq_correction: bool = True,
    in_batch: bool = True,
) -> torch.Tensor:
    """Sampled softmax with in-batch and shared uniform negatives, logQ correction and hit masking.

    Row ``i`` is a softmax over ``[positive_i, other rows' positives (if in_batch), M negatives]``:

    - logits are ``states_i . v / temperature``, then (with ``logq_correction``) ``- log Q(item)``
      for every column, the positive's included, as Yi et al. (RecSys 2019) do;
    - a negative column that is row ``i``'s own target (an accidental hit: a popular item that is
      also another row's target, or a uniform draw of the target) is masked to ``-inf``, so the model
      is never asked to push its positive down;
    - rows whose target is PAD or UNK are dropped, and such targets are never used as negatives.

    Args:
        states: (N, D) user states.
        target_vectors: (N, D) item vectors of the targets (``item_vectors[targets]``).
        targets: (N,) long target item indices.
        negative_vectors: (M, D) vectors of the shared negatives, or None for in-batch only.
        negative_ids: (M,) their item indices (for accidental-hit masking).
        negative_logq: (M,) log Q of each negative; needed with ``logq_correction``.
        target_logq: (N,) log Q of each target; needed with ``logq_correction``.
        temperature: divides the raw inner products.
        logq_correction: subtract ``log Q``; see ``log_sampling_prob`` for the Q of mixed sampling.
        in_batch: use the other rows' targets as negatives.

    Returns:
        scalar: mean over rows with a real target (0, still differentiable, when there is none).
    """
    if negative_vectors is None and not in_batch:
        raise ValueError("sampled_softmax_loss needs negatives: pass negative_vectors or set in_batch=True")
    if negative_vectors is not None and negative_ids is None:
        raise ValueError("negative_ids are needed with negative_vectors, to mask accidental hits")
    if logq_correction and (target_logq is None or (negative_vectors is not None and negative_logq is None)):
        raise ValueError("logq_correction needs target_logq and negative_logq; see log_sampling_prob")

    real = targets >= N_RESERVED  # (N,)
    if not bool(real.all()):
        if not bool(real.any()):
            tensors = [states, target_vectors] + ([negative_vectors] if negative_vectors is not None else [])
            return _zero_loss(*tensors)
        states, target_vectors, targets = states[real], target_vectors[real], targets[real]
        target_logq = target_logq[real] if target_logq is not None else None

    pos = (states * target_vectors).sum(-1, keepdim=True) / temperature  # (N, 1)
    if logq_correction:
        pos = pos - target_logq[:, None]  # type: ignore[index]
    columns = [pos]

    if in_batch:
        inb = states @ target_vectors.T / temperature  # (N, N); column j is row j's target
        if logq_correction:
            inb = inb - target_logq[None, :]  # type: ignore[index]
        hit = targets[:, None] == targets[None, :]  # (N, N); the diagonal is the positive itself
        columns.append(inb.masked_fill(hit, float("-inf")))

    if negative_vectors is not None:
        neg = states @ negative_vectors.T / temperature  # (N, M)
        if logq_correction:
            neg = neg - negative_logq[None, :]  # type: ignore[index]
        hit = targets[:, None] == negative_ids[None, :]  # (N, M)  # type: ignore[index]
        columns.append(neg.masked_fill(hit, float("-inf")))

    logits = torch.cat(columns, dim=1)  # (N, 1 + N + M); the positive is column 0
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)
