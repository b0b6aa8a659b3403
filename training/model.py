"""The two-tower network: an item tower, a causal-Transformer user tower, and the net that joins them.

Plain ``nn.Module``s in dependency order (nanoGPT's ``model.py`` layout); the Lightning system in
``training/system.py`` adds losses and optimisers, and serving imports this module alone to rebuild
the net from ``config.json`` (``TwoTowerNet.meta()``) plus a safetensors state dict.

Design choices, and why:

- **Shared item vectors** (as in SASRec, Kang & McAuley, ICDM 2018): the user tower reads the item
  tower's vectors of the history, and the same vectors are the softmax's output embeddings and the
  FAISS catalogue, so a user state and an item vector live in one space and serving is a plain
  inner-product search.
- **Every position is a training example**: the user tower returns a state at every step (state
  after seeing items up to and including ``t``), so one pass trains on every prefix of every
  sequence instead of one sample per prefix.
- **No LayerNorm or dropout on the item tower's output**: those vectors are both the output embedding
  of every logit and the index vectors. Dropout there would perturb the catalogue side of every
  logit, and a LayerNorm would pin every item's norm to about the same value, taking away the
  per-item magnitude that inner-product scoring uses to express popularity. Dropout is applied where
  SASRec applies it: on the user tower's input and inside its blocks.
- **Positions are counted from the newest event** (histories are left-padded, newest event at
  ``T - 1``): the newest event always gets position ``max_len - 1`` whatever ``T`` is, so a batch
  may be trimmed to its longest history and extra left padding changes nothing.
- **Time gaps, when events have times** (``model.time_gaps``; off by default): each history step adds
  an embedding of its log2-bucketed gap to the previous step of the window (``GAP_FIRST`` for the
  first), and every attention logit gets a learned per-head bias of the bucketed age of the key
  relative to the query, ``ts[t] - ts[s]`` (the intervals TiSASRec, Li et al., WSDM 2020, feeds its
  attention, as a bias rather than extra key/value vectors). Both are functions of the window's own
  timestamps, so training windows, evaluation, serving and batch export compute them alike and a
  user's vector still depends on nothing but their history. Data without real times (S3Rec: times
  are positions) gives gap 1 everywhere: a constant, i.e. position-only.
- **Every position may attend to itself**: with causal masking and left padding, a padded position
  sees only pads; letting the diagonal through keeps its softmax finite (no NaN), and because real
  positions come after all pads they never see a pad key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from towerline.config import TwoTowerConfig, from_dict
from towerline.errors import BundleError, ConfigError
from towerline.features.vocab import N_RESERVED, PAD_IDX

log = logging.getLogger(__name__)

INIT_STD = 0.02  # normal init of embeddings and linear weights (GPT-2 / nanoGPT)
N_GAP_BUCKETS = 32  # time-gap buckets: 2 reserved + 2 + floor(log2(gap_s + 1)), capped (2^29 s is 17 years)
GAP_PAD, GAP_FIRST = 0, 1  # reserved gap buckets: padding; a window's first step (no previous step in it)
N_RESERVED_GAPS = 2


def _fit_attribute_table(item_attributes: torch.Tensor | None, n_items: int, width: int) -> torch.Tensor:
    """(n_items, width) long table of attribute indices, PAD-padded or truncated to ``width`` columns.

    ``None`` gives an all-PAD table: the shape a net rebuilt for serving needs before
    ``load_state_dict`` fills in the real table. The PAD item's row is forced to PAD so that the
    padding item's vector is exactly zero.
    """
    table = torch.full((n_items, width), PAD_IDX, dtype=torch.long)
    if item_attributes is None:
        return table
    if item_attributes.dim() != 2 or item_attributes.shape[0] != n_items:
        raise ValueError(
            f"item_attributes must have shape (n_items={n_items}, max_attributes), got {tuple(item_attributes.shape)}"
        )
    if item_attributes.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"item_attributes must hold integer attribute indices, got {item_attributes.dtype}")
    w = min(width, item_attributes.shape[1])
    table[:, :w] = item_attributes[:, :w].to(torch.long)
    table[PAD_IDX] = PAD_IDX
    return table


def mean_pooling_transpose(table: torch.Tensor, n_attributes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n_attributes, n_items) sparse CSR ``P.T`` of the mean-pooling matrix ``P`` of a PAD-padded
    (n_items, A) attribute table: ``P[i, a]`` = (times ``a`` is in row ``i``) / (non-PAD entries of row ``i``).

    ``P @ W`` is what ``F.embedding_bag(table, W, mode="mean", padding_idx=PAD_IDX)`` computes, so the
    gradient of the attribute table is ``P.T @ grad``: one sparse product over the catalogue's
    attribute entries, instead of the CPU EmbeddingBag backward, which sorts all ``n_items * A``
    indices (PAD included) every training step.
    """
    mask = table != PAD_IDX  # (V, A)
    per_row = mask.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)  # (V, 1)
    weights = (1.0 / per_row).expand(table.shape)[mask]  # (nnz,)
    rows = torch.arange(table.shape[0], device=table.device).unsqueeze(1).expand(table.shape)[mask]  # (nnz,)
    size = (n_attributes, table.shape[0])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long-standing
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.stack([table[mask], rows]), weights, size, check_invariants=False)
        return coo.coalesce().to_sparse_csr()  # coalesce sums an attribute listed twice in a row, as the bag does


def _csr(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR tensor from its (crow, col, values) parts, which (unlike the tensor) copy and pickle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(*parts, size, check_invariants=False)


class _MeanPool(torch.autograd.Function):
    """``F.embedding_bag`` mean pooling forward (bit for bit), backward as ``P.T @ grad``
    (``mean_pooling_transpose``): the same gradient up to float summation order."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, table: torch.Tensor, transpose: torch.Tensor) -> torch.Tensor:
        ctx.transpose = transpose
        return F.embedding_bag(table, weight, mode="mean", padding_idx=PAD_IDX)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        t = ctx.transpose
        return t @ grad.to(t.dtype), None, None


class ItemTower(nn.Module):
    """Item index -> vector: id embedding plus the mean of the item's attribute embeddings.

    The attribute half lets items that share a category or brand share signal, which matters most for
    rarely seen items whose id embedding gets few updates (the motivation for attribute-aware models
    such as S3-Rec, Zhou et al., CIKM 2020). The two halves are summed: same width, no extra
    parameters, and an item without attributes falls back to its id embedding.
    """

    def __init__(
        self,
        n_items: int,
        n_attributes: int,
        item_attributes: torch.Tensor | None,
        cfg: TwoTowerConfig,
        sparse_grads: bool = False,
    ) -> None:
        """
        Args:
            n_items: item table size including the reserved PAD/UNK rows (``len(vocab)``).
            n_attributes: attribute table size including the reserved rows.
            item_attributes: (n_items, A) long attribute indices per item, PAD-padded; kept as a
                persistent buffer (so it travels in the state dict), padded or cut to
                ``cfg.max_attributes`` columns. Ignored when ``cfg.use_attributes`` is False.
            cfg: the model config.
            sparse_grads: give the id table sparse gradients (``nn.Embedding(sparse=True)``), so a
                step costs the rows it touched, not the whole catalogue; training only (the system
                resolves ``cfg.sparse_item_grads``), the weights are the same either way.
        """
        super().__init__()
        if n_items <= N_RESERVED:
            raise ValueError(f"n_items={n_items} leaves no real item (the first {N_RESERVED} rows are reserved)")
        self.n_items = n_items
        self.use_attributes = cfg.use_attributes
        self.id_emb = nn.Embedding(n_items, cfg.dim, padding_idx=PAD_IDX, sparse=sparse_grads)
        if cfg.use_attributes:
            n_attr_rows = max(n_attributes, N_RESERVED)
            table = _fit_attribute_table(item_attributes, n_items, cfg.max_attributes)
            if table.numel() and int(table.max()) >= n_attr_rows:
                bad = int((table >= n_attr_rows).any(dim=1).nonzero()[0, 0])
                raise ValueError(
                    f"item_attributes row {bad} holds attribute index {int(table[bad].max())} "
                    f">= n_attributes={n_attributes}"
                )
            # mean over the non-PAD attributes of each item; an item with none gets a zero vector
            self.attr_emb: nn.EmbeddingBag | None = nn.EmbeddingBag(
                n_attr_rows, cfg.dim, mode="mean", padding_idx=PAD_IDX
            )
            self.register_buffer("item_attributes", table, persistent=True)
            self._pool_transpose: tuple[torch.Tensor, tuple[Any, ...], tuple[torch.Tensor, ...]] | None = None  # _pool
        else:
            self.attr_emb = None
            self.item_attributes: torch.Tensor | None = None

    def forward(self, item_idx: torch.Tensor, id_dropout: float = 0.0) -> torch.Tensor:
        """(...) long item indices -> (..., D) item vectors; PAD gives the zero vector.

        ``id_dropout`` > 0 (training only: the system passes ``cfg.id_dropout``) zeroes the id
        embedding of each occurrence with that probability, so the attribute half alone must
        already place the item (DropoutNet, Volkovs et al., NeurIPS 2017): that is the vector a
        cold item, known only by its attributes, gets (``attribute_vectors``).
        """
        x = self.id_emb(item_idx)  # (..., D)
        if id_dropout > 0:
            keep = torch.rand(item_idx.shape, device=x.device) >= id_dropout  # (...,)
            x = x * keep.unsqueeze(-1).to(x.dtype)
        if self.attr_emb is not None:
            attrs = self.item_attributes[item_idx.reshape(-1)]  # (N, A)
            x = x + self._pool(attrs).view(x.shape)  # (..., D)
        return x

    def _pool(self, attributes: torch.Tensor, catalogue: bool = False) -> torch.Tensor:
        """(N, A) PAD-padded attribute indices -> (N, D) mean of their embeddings (zero without any).

        The one pooling of the item tower (history lookups, ``all_items``, cold items). With
        ``catalogue`` (``attributes`` is the item table itself) and a gradient to compute, the
        backward is one sparse product with the cached ``mean_pooling_transpose`` of the table,
        rebuilt whenever the table changes (``load_state_dict``, ``.to(device)``).
        """
        weight = self.attr_emb.weight  # type: ignore[union-attr]
        if not (catalogue and torch.is_grad_enabled() and weight.requires_grad):
            return F.embedding_bag(attributes, weight, mode="mean", padding_idx=PAD_IDX)
        cached = self._pool_transpose
        key = (attributes._version, weight.dtype)
        if cached is None or cached[0] is not attributes or cached[1] != key:
            t = mean_pooling_transpose(attributes, weight.shape[0], weight.dtype)
            cached = self._pool_transpose = (attributes, key, (t.crow_indices(), t.col_indices(), t.values()))
        transpose = _csr(cached[2], (weight.shape[0], attributes.shape[0]))  # (n_attributes, V)
        return _MeanPool.apply(weight, attributes, transpose)

    def all_items(self, id_dropout: float = 0.0) -> torch.Tensor:
        """(n_items, D): every row of the catalogue in one pass (softmax outputs, FAISS vectors).

        ``id_dropout`` > 0 drops whole rows' id embeddings for this call (one draw per item per
        training step; see ``forward``).
        """
        x = self.id_emb.weight  # (V, D)
        if id_dropout > 0:
            keep = torch.rand(x.shape[0], device=x.device) >= id_dropout  # (V,)
            x = x * keep.unsqueeze(1).to(x.dtype)
        if self.attr_emb is not None:
            x = x + self._pool(self.item_attributes, catalogue=True)  # (V, D)
        return x

    def attribute_vectors(self, attributes: torch.Tensor) -> torch.Tensor:
        """(N, A) long attribute indices (PAD-padded) -> (N, D): the item tower with its id part zeroed.

        The vector of an item the net has never seen (cold start): exactly what ``forward`` gives a
        known item whose id embedding was dropped, which is how training taught the tower to use it.
        An item without known attributes gets the zero vector (it cannot be placed; it still is
        servable by id, scoring 0 against every user).
        """
        if attributes.dim() != 2:
            raise ValueError(f"attributes must be (N, A) attribute indices, got shape {tuple(attributes.shape)}")
        if self.attr_emb is None:
            return self.id_emb.weight.new_zeros((attributes.shape[0], self.id_emb.embedding_dim))
        return self._pool(attributes.long())  # (N, D)


def gap_bucket(gaps: torch.Tensor) -> torch.Tensor:
    """(...) int64 gaps in seconds -> (...) long buckets ``2 + floor(log2(gap + 1))``, capped at
    ``N_GAP_BUCKETS - 1``; a negative gap (clock skew, out-of-order events) counts as 0.

    Log buckets as in TiSASRec's clipped intervals, but scale-free: seconds, minutes, days and months
    each get a few buckets (0 s -> 2, 1-2 s -> 3, 3-6 s -> 4, 1 h -> 13, 1 day -> 18, 30 days -> 23).
    Computed in float64, exact for every integer gap below 2^52.
    """
    g = gaps.clamp(min=0).to(torch.float64)
    return (torch.floor(torch.log2(g + 1.0)).long() + N_RESERVED_GAPS).clamp(max=N_GAP_BUCKETS - 1)


def time_gap_buckets(timestamps: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 event times (left-padded) -> ``(steps (B, T), ages (B, T, T))`` long buckets.

    ``steps[b, t]``: the gap from step ``t - 1`` to step ``t`` (``GAP_FIRST`` for the window's first
    real step, ``GAP_PAD`` at padding). ``ages[b, t, s]``: the bucket of ``ts[t] - ts[s]``, the key's
    age when query ``t`` reads it (meaningful for ``s <= t``; the causal mask hides the rest).
    """
    ts = timestamps.long()
    prev_pad = torch.cat([torch.ones_like(pad_mask[:, :1]), pad_mask[:, :-1]], dim=1)  # (B, T)
    gap = ts - torch.cat([ts[:, :1], ts[:, :-1]], dim=1)  # (B, T)
    steps = torch.where(prev_pad, torch.full_like(gap, GAP_FIRST), gap_bucket(gap))
    steps = steps.masked_fill(pad_mask, GAP_PAD)
    ages = gap_bucket(ts[:, :, None] - ts[:, None, :])  # (B, T, T)
    return steps, ages


def attention_mask(pad_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at padding -> (B, 1, T, T) bool, True where query ``t`` may attend key ``s``.

    Key ``s`` is allowed when ``s <= t`` (causal) and it is not padding, and every query may always
    attend to itself. The diagonal matters for left-padded rows: a padded query has no other
    allowed key, and a softmax over nothing but ``-inf`` is NaN on the kernels of several torch
    versions. A real query never sees a pad key, since with left padding all pads come before it.
    """
    T = pad_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=pad_mask.device).tril()  # (T, T)
    eye = torch.eye(T, dtype=torch.bool, device=pad_mask.device)  # (T, T)
    return (causal & ~pad_mask[:, None, None, :]) | eye  # (B, 1, T, T)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where step ``t`` sees steps ``<= t`` that are not padding."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), allowed (B, 1, T, T) bool, True where a query may attend to a key, or a
        (B, H, T, T) float mask added to the logits (the time-gap biases, ``-inf`` where not allowed)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q = q.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward layer, 4x wide as in the Transformer."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.proj = nn.Linear(4 * cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, D)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: stable to train without learning-rate warm-up."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)  # (B, T, D)
        return x + self.mlp(self.ln_2(x))  # (B, T, D)


def causal_moving_average(x: torch.Tensor, pad_mask: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T, D) -> (B, T, D): at step ``t`` the mean of the real (non-padding) steps ``t - window + 1 .. t``.

    A low-pass filter that reads no future step, so it may run at every training position (BSARec's
    FFT filter sees the whole sequence, which is only sound when the loss reads the last step alone).
    Padding steps are left out of every mean; a padding step itself gets the mean of nothing (zero).
    """
    real = (~pad_mask).to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    cs = F.pad(torch.cumsum(x * real, dim=1), (0, 0, 1, 0))  # (B, T + 1, D); cs[:, i] = sum of steps < i
    cn = F.pad(torch.cumsum(real, dim=1), (0, 0, 1, 0))  # (B, T + 1, 1)
    T = x.shape[1]
    hi = torch.arange(1, T + 1, device=x.device)  # exclusive end of each step's window
    lo = (hi - window).clamp(min=0)
    total = cs[:, hi] - cs[:, lo]  # (B, T, D)
    count = (cn[:, hi] - cn[:, lo]).clamp(min=1.0)  # (B, T, 1)
    return total / count


class FrequencyFilter(nn.Module):
    """BSARec's frequency branch (Shin et al., "An Attentive Inductive Bias for Sequential
    Recommendation beyond the Self-Attention", AAAI 2024), made causal: the low-frequency part of
    the sequence (a moving average of the last ``freq_window`` steps) plus the high-frequency rest
    rescaled per channel by a learned ``beta**2``. At ``beta = 1`` (the initial value) it passes its
    input through unchanged, so the branch starts as a plain residual of the normalised input.
    """

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.window = cfg.freq_window
        self.sqrt_beta = nn.Parameter(torch.ones(cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        low = causal_moving_average(x, pad_mask, self.window)  # (B, T, D)
        return self.drop(low + self.sqrt_beta**2 * (x - low))  # (B, T, D)


class FreqMixBlock(Block):
    """A pre-LN block whose token mixer is ``alpha * FrequencyFilter + (1 - alpha) * attention``
    (``alpha = cfg.freq_mix``), as BSARec mixes its inductive-bias branch with self-attention."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__(cfg)
        self.alpha = cfg.freq_mix
        self.filter = FrequencyFilter(cfg)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if pad_mask is None:
            raise ValueError("FreqMixBlock needs the padding mask (its filter must skip padding steps)")
        h = self.ln_1(x)  # (B, T, D)
        x = x + self.alpha * self.filter(h, pad_mask) + (1.0 - self.alpha) * self.attn(h, allowed)
        return x + self.mlp(self.ln_2(x))  # (B, T, D)


class UserTower(nn.Module):
    """History of item vectors (+ position, + event type) -> a user state at every step.

    A causal Transformer as in SASRec (Kang & McAuley, ICDM 2018), pre-LN. The event-type
    embedding tells a purchase from a view of the same item.
    """

    def __init__(self, cfg: TwoTowerConfig, n_event_types: int) -> None:
        """
        Args:
            cfg: the model config (``dim``, ``max_len``, ``n_layers``, ``n_heads``, ``dropout``,
                ``use_event_type``).
            n_event_types: event-type table size including the reserved PAD/UNK rows.
        """
        super().__init__()
        self.max_len = cfg.max_len
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.event_emb = (
            nn.Embedding(max(n_event_types, N_RESERVED), cfg.dim, padding_idx=PAD_IDX)
            if cfg.use_event_type
            else None
        )
        # time gaps (cfg.time_gaps): a per-step gap embedding and a per-head age bias shared by the blocks
        self.gap_emb = nn.Embedding(N_GAP_BUCKETS, cfg.dim, padding_idx=GAP_PAD) if cfg.time_gaps else None
        self.age_bias = nn.Embedding(N_GAP_BUCKETS, cfg.n_heads) if cfg.time_gaps else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([FreqMixBlock(cfg) if cfg.freq_mix > 0 else Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.dim)

    def forward(
        self,
        item_vectors: torch.Tensor,
        event_types: torch.Tensor | None,
        pad_mask: torch.Tensor,
        timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            item_vectors: (B, T, D) item-tower vectors of the history, oldest first.
            event_types: (B, T) long event-type indices, or None (ignored without ``use_event_type``).
            pad_mask: (B, T) bool, True at padding.
            timestamps: (B, T) int64 event times (epoch seconds; anything at padding), read with
                ``time_gaps`` and ignored without; None is all zeros (every gap 0), the convention of
                ``inference`` and serving for events without times.

        Returns:
            (B, T, D): at step ``t`` the state after items ``<= t``; padded steps hold finite
            values that mean nothing.
        """
        B, T, D = item_vectors.shape
        if T > self.max_len:
            raise ValueError(f"history length {T} exceeds max_len={self.max_len}; keep the newest {self.max_len} events")
        device = item_vectors.device
        # right-aligned positions: the newest step is always max_len - 1, whatever the padding
        pos = torch.arange(self.max_len - T, self.max_len, device=device)  # (T,)
        x = item_vectors + self.pos_emb(pos)  # (B, T, D)
        if self.event_emb is not None and event_types is not None:
            x = x + self.event_emb(event_types)  # (B, T, D)
        allowed = attention_mask(pad_mask)  # (B, 1, T, T)
        if self.gap_emb is not None:
            ts = torch.zeros_like(pad_mask, dtype=torch.long) if timestamps is None else timestamps
            steps, ages = time_gap_buckets(ts, pad_mask)  # (B, T), (B, T, T)
            x = x + self.gap_emb(steps)  # (B, T, D)
            bias = self.age_bias(ages).permute(0, 3, 1, 2).to(x.dtype)  # (B, H, T, T)
            allowed = bias.masked_fill(~allowed, float("-inf"))  # float mask: bias where allowed, -inf elsewhere
        x = self.drop(x)

        for block in self.blocks:
            x = block(x, allowed, pad_mask) if isinstance(block, FreqMixBlock) else block(x, allowed)
        return self.ln_f(x)  # (B, T, D)


class TwoTowerNet(nn.Module):
    """Item tower and user tower in one space: ``score(user, item) = user_vector . item_vector``.

    Constructor arguments are plain ints and a config so that ``build_two_tower(net.meta())`` plus
    ``load_state_dict`` rebuilds the same net in serving; the attribute table is a persistent
    buffer, so it travels in the state dict.

    Example::

        net = TwoTowerNet(n_items=len(vocabs.items), n_attributes=len(vocabs.attributes),
                          n_event_types=len(vocabs.event_types), cfg=TwoTowerConfig(),
                          item_attributes=table)
        scores = net.user_vector(history, event_types) @ net.item_vectors().T  # (B, V)
    """

    def __init__(
        self,
        n_items: int,
        n_attributes: int,
        n_event_types: int,
        cfg: TwoTowerConfig,
        item_attributes: torch.Tensor | None = None,
        sparse_item_grads: bool = False,
    ) -> None:
        super().__init__()
        self.n_items = n_items
        self.n_attributes = n_attributes
        self.n_event_types = n_event_types
        self.cfg = cfg
        self.item_tower = ItemTower(n_items, n_attributes, item_attributes, cfg, sparse_item_grads)
        self.user_tower = UserTower(cfg, n_event_types)
        self.init_weights()
        log.debug("TwoTowerNet: %d parameters", sum(p.numel() for p in self.parameters()))

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights and zero biases (GPT-2); residual projections scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * self.cfg.n_layers))

    def forward(
        self, history: torch.Tensor, event_types: torch.Tensor | None = None, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Inference: (B, T) left-padded history -> (B, D) user vectors."""
        return self.user_vector(history, event_types, timestamps=timestamps)

    def item_vectors(self) -> torch.Tensor:
        """(n_items, D) vectors of the whole catalogue, reserved rows included (score them -inf)."""
        return self.item_tower.all_items()

    def user_states(
        self,
        history: torch.Tensor,
        event_types: torch.Tensor | None = None,
        item_table: torch.Tensor | None = None,
        id_dropout: float = 0.0,
        timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) left-padded item indices -> (B, T, D) state after each step.

        ``timestamps`` (B, T) event times feed the time-gap features (``cfg.time_gaps``).

        ``item_table`` (n_items, D), when given, is used instead of running the item tower on the
        history: a training step that already computed ``item_vectors()`` for a full softmax then
        pays for the attribute pooling once. ``id_dropout`` (training, without a table) is passed
        to the item tower (``ItemTower.forward``).
        """
        pad_mask = history == PAD_IDX  # (B, T)
        if item_table is not None:
            vecs = item_table[history]  # (B, T, D)
        else:
            vecs = self.item_tower(history, id_dropout)  # (B, T, D)
        return self.user_tower(vecs, event_types, pad_mask, timestamps)

    def user_vector(
        self,
        history: torch.Tensor,
        event_types: torch.Tensor | None = None,
        item_table: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) left-padded history -> (B, D) state at the newest step ``T - 1``."""
        return self.user_states(history, event_types, item_table, timestamps=timestamps)[:, -1]  # (B, D)

    def meta(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``build_two_tower(meta)`` rebuilds this net's shape."""
        return {
            "n_items": self.n_items,
            "n_attributes": self.n_attributes,
            "n_event_types": self.n_event_types,
            "cfg": dataclasses.asdict(self.cfg),
        }


def config_from_meta(meta: dict[str, Any], keys: tuple[str, ...], cls: type, section: str, owner: str) -> Any:
    """The config dataclass of a network's ``meta()`` dict, or a ``BundleError`` naming what is wrong."""
    missing = [k for k in (*keys, "cfg") if k not in meta]
    if missing:
        raise BundleError(f"{section} meta is missing {missing}; expected the dict {owner}.meta() writes")
    try:
        return from_dict(cls, meta["cfg"], section)
    except ConfigError as e:
        raise BundleError(f"{section} meta 'cfg' is not a valid {cls.__name__}: {e}") from None


def build_two_tower(meta: dict[str, Any]) -> TwoTowerNet:
    """Rebuild an (untrained) ``TwoTowerNet`` from ``TwoTowerNet.meta()``, e.g. read from a bundle's
    ``config.json``; load weights with ``net.load_state_dict(safetensors.torch.load_file(path))``.

    Raises:
        BundleError: a key is missing or the config section is invalid.
    """
    cfg = config_from_meta(meta, ("n_items", "n_attributes", "n_event_types"), TwoTowerConfig, "model", "TwoTowerNet")
    return TwoTowerNet(
        n_items=int(meta["n_items"]),
        n_attributes=int(meta["n_attributes"]),
        n_event_types=int(meta["n_event_types"]),
        cfg=cfg,
    )
