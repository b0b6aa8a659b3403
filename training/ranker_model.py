"""The ranker: re-scores the retriever's top-N candidates of one user with richer signals.

A plain ``nn.Module`` (the Lightning system in ``ranker_system.py`` adds the loss); serving rebuilds
the net from ``ranker/config.json`` (``Ranker.meta()``) plus ``ranker/weights.safetensors``
(``training/bundle.py``) and scores through ``training/inference.py``, which builds its inputs the
way training does (fixed ``history_len`` window with real timestamps, ``cfg.n_candidates`` per list).

Per (user, candidate) pair the ranker sees:

- **the retrieval score and rank** (z-scored within the list, gap to the top, log rank): the
  retriever is a strong signal, so the ranker learns corrections to it rather than a new ranking;
- **target attention** of the candidate over the user's recent history (DIN, Zhou et al., KDD
  2018): the history is summarised *per candidate*, so "bought a tent" weighs heavily for a
  sleeping bag and barely for a lipstick, which one user vector cannot express;
- **item side**: the retriever's item vector (frozen) and the ranker's own attribute embeddings,
  log popularity overall and recent;
- **category recency**: steps and time since the user last touched the candidate's category, and the
  share of the recent history in it. Categories are attribute tokens ``category:<name>``; a
  catalogue without such tokens (S3Rec's ``attr:<id>``) uses each item's most common attribute, the
  coarsest grouping it has. Timestamps may be epoch seconds or (S3Rec) positions: both give
  "how long ago" in their own unit;
- **event-type mix** of the history (share of views, carts, purchases, ...);
- **user profile** features (optional ``(B, P)`` tensor from the marketing layer; zeros when absent).

The output is ``mlp(features) + w * z(retrieval score)`` with the MLP's last layer initialised to zero
and ``w = 1``: an untrained ranker reproduces the retrieval order exactly, and training moves away
from it only where the data say so.

All per-item facts (frozen item vectors, attribute table, category, popularity) are persistent
buffers, so they travel in the safetensors file and the ranker needs nothing else from the bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from towerline.config import RankerConfig
from towerline.features.sequences import Sequences
from towerline.features.vocab import N_RESERVED, PAD_IDX, Vocab
from towerline.training.model import config_from_meta

log = logging.getLogger(__name__)

CATEGORY_PREFIX = "category:"
RECENT_STEPS = 3  # "recent popularity" counts each user's last this-many training steps
N_DENSE = 11  # per-candidate scalar features, see Ranker.dense_features
TIME_SCALE = 20.0  # log1p(seconds) of a year is ~17.3: divides log time gaps into about [0, 1]


# ----------------------------------------------------------------------------- per-item facts


@dataclass(frozen=True)
class RankerFeatures:
    """Per-item facts the ranker reads for any candidate or history item, rows = item index.

    Built once per training run by ``build_ranker_features``; stored as buffers of ``Ranker``.
    """

    item_vectors: np.ndarray  # (V, D) float32 retriever item vectors (frozen)
    item_attributes: np.ndarray  # (V, A) int64 attribute indices, PAD-padded
    item_category: np.ndarray  # (V,) int64 attribute index of the item's category, PAD if none
    popularity: np.ndarray  # (V,) float32 log1p(training interactions) / max, in [0, 1]
    recent_popularity: np.ndarray  # (V,) float32 same over each user's last RECENT_STEPS steps


def item_categories(item_attributes: np.ndarray, attributes: Vocab, prefix: str = CATEGORY_PREFIX) -> np.ndarray:
    """(V,) int64: each item's first ``category:`` attribute, PAD when it has none.

    When no token of the vocabulary has the prefix (S3Rec catalogues), each item's most frequent
    attribute across the catalogue stands in: the token most items share is the coarsest grouping.
    """
    table = np.asarray(item_attributes, dtype=np.int64)  # (V, A)
    V = table.shape[0]
    out = np.full(V, PAD_IDX, dtype=np.int64)
    if table.size == 0:
        return out
    ids = np.asarray(attributes.ids, dtype=str)
    is_cat = np.zeros(len(attributes), dtype=bool)
    is_cat[N_RESERVED:] = np.char.startswith(ids, prefix) if len(ids) else False
    if is_cat.any():
        hit = is_cat[np.clip(table, 0, len(is_cat) - 1)] & (table >= N_RESERVED)  # (V, A)
    else:
        freq = np.bincount(table.reshape(-1), minlength=len(attributes)).astype(np.float64)
        freq[:N_RESERVED] = -1.0
        best = freq[table].argmax(axis=1)  # (V,) column of the most common token
        hit = np.zeros_like(table, dtype=bool)
        hit[np.arange(V), best] = table[np.arange(V), best] >= N_RESERVED
    first = hit.argmax(axis=1)  # (V,)
    has = hit.any(axis=1)
    out[has] = table[np.arange(V), first][has]
    return out


def _log_norm(counts: np.ndarray) -> np.ndarray:
    x = np.log1p(np.asarray(counts, dtype=np.float64))
    top = x.max() if x.size else 0.0
    return (x / top if top > 0 else x).astype(np.float32)


def build_ranker_features(
    item_vectors: np.ndarray,
    item_attributes: np.ndarray,
    attributes: Vocab,
    train: Sequences,
    recent_steps: int = RECENT_STEPS,
) -> RankerFeatures:
    """Per-item facts from the retriever's item vectors, the attribute table and training sequences.

    Popularity counts training sequences only (never validation or test items). "Recent" counts each
    user's last ``recent_steps`` training steps: it follows what people are into *now* and works the
    same whether timestamps are epoch seconds or S3Rec positions.

    Args:
        item_vectors: (V, D) float item-tower vectors in eval mode (the bundle's ``item_embeddings``).
        item_attributes: (V, A) int attribute indices, PAD-padded (the retriever's attribute table).
        attributes: the attribute vocabulary (to find ``category:`` tokens).
        train: training sequences (``Split.train``).
    """
    V = int(item_vectors.shape[0])
    items = np.asarray(train.item_idx, dtype=np.int64)
    counts = np.bincount(items, minlength=V)[:V]
    ends = np.asarray(train.offsets[1:], dtype=np.int64)
    starts = np.asarray(train.offsets[:-1], dtype=np.int64)
    steps_back = np.repeat(ends, ends - starts) - np.arange(len(items))  # (E,) 1 for each row's newest step
    recent = np.bincount(items[steps_back <= recent_steps], minlength=V)[:V]
    counts[:N_RESERVED] = 0
    recent[:N_RESERVED] = 0
    return RankerFeatures(
        item_vectors=np.ascontiguousarray(item_vectors, dtype=np.float32),
        item_attributes=np.asarray(item_attributes, dtype=np.int64),
        item_category=item_categories(item_attributes, attributes),
        popularity=_log_norm(counts),
        recent_popularity=_log_norm(recent),
    )


# ----------------------------------------------------------------------------- the network


class Ranker(nn.Module):
    """Scores (user, candidate) pairs; ``forward`` returns (B, N) scores, higher is better.

    Constructor arguments are plain ints and a config so that ``build_ranker(ranker.meta())`` plus
    ``load_state_dict`` rebuilds it in serving; ``features`` fills the per-item buffers (None gives
    zero buffers of the right shapes, for loading a state dict).

    Example::

        ranker = Ranker(n_items, n_attributes, n_event_types, item_dim=64, cfg=RankerConfig(),
                        features=build_ranker_features(emb, attrs, vocabs.attributes, split.train))
        scores = ranker(cand, cand_scores, hist, hist_types, hist_ts)  # (B, N)
    """

    def __init__(
        self,
        n_items: int,
        n_attributes: int,
        n_event_types: int,
        item_dim: int,
        cfg: RankerConfig,
        max_attributes: int = 8,
        n_profile_features: int = 0,
        features: RankerFeatures | None = None,
        n_users: int = 0,
    ) -> None:
        """
        Args:
            n_items, n_attributes, n_event_types: vocabulary sizes, reserved rows included.
            item_dim: width of the retriever's item vectors.
            cfg: the ranker config (``hidden``, ``n_layers``, ``dropout``, ``history_len``).
            max_attributes: attribute columns per item in the attribute table.
            n_profile_features: width of the optional user profile vector (0: none).
            features: per-item facts; None leaves zero buffers for ``load_state_dict`` to fill.
            n_users: rows of the per-user profile table (user vocabulary size); the table is a
                buffer, so the profiles a ranker was trained with are the ones it serves with.
        """
        super().__init__()
        if n_items <= N_RESERVED:
            raise ValueError(f"n_items={n_items} leaves no real item (the first {N_RESERVED} rows are reserved)")
        self.n_items, self.n_attributes, self.n_event_types = n_items, n_attributes, n_event_types
        self.item_dim, self.max_attributes, self.n_profile_features = item_dim, max_attributes, n_profile_features
        self.cfg = cfg
        H = cfg.hidden
        self._buffers_from(features)
        self.n_users = n_users
        self.register_buffer("user_profiles", torch.zeros(n_users, n_profile_features))  # (U, P)

        self.item_proj = nn.Linear(item_dim, H)
        self.attr_emb = nn.EmbeddingBag(max(n_attributes, N_RESERVED), H, mode="mean", padding_idx=PAD_IDX)
        self.type_emb = nn.Embedding(max(n_event_types, N_RESERVED), H, padding_idx=PAD_IDX)
        self.pos_emb = nn.Embedding(cfg.history_len, H)  # counted back from the newest step
        self.q = nn.Linear(H, H)
        self.k = nn.Linear(H, H)
        self.v = nn.Linear(H, H)
        width = 3 * H + N_DENSE + max(n_event_types, N_RESERVED) + n_profile_features
        layers: list[nn.Module] = [nn.LayerNorm(width)]
        for i in range(cfg.n_layers):
            layers += [nn.Linear(width if i == 0 else H, H), nn.GELU(), nn.Dropout(cfg.dropout)]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(H, 1)
        self.retrieval_weight = nn.Parameter(torch.ones(()))
        self.init_weights()

    def _buffers_from(self, f: RankerFeatures | None) -> None:
        V, A, D = self.n_items, self.max_attributes, self.item_dim
        if f is not None:
            checks = {
                "item_vectors": (f.item_vectors.shape, (V, D)),
                "item_attributes": (f.item_attributes.shape[:1], (V,)),
                "item_category": (f.item_category.shape, (V,)),
                "popularity": (f.popularity.shape, (V,)),
                "recent_popularity": (f.recent_popularity.shape, (V,)),
            }
            for name, (got, want) in checks.items():
                if tuple(got) != want:
                    raise ValueError(f"RankerFeatures.{name} has shape {tuple(got)}, expected {want}")
        attrs = torch.full((V, A), PAD_IDX, dtype=torch.long)
        if f is not None:
            w = min(A, f.item_attributes.shape[1])
            attrs[:, :w] = torch.as_tensor(f.item_attributes[:, :w], dtype=torch.long)
        zeros = torch.zeros(V)
        self.register_buffer("item_vectors", torch.as_tensor(f.item_vectors) if f else torch.zeros(V, D))
        self.register_buffer("item_attributes", attrs)
        self.register_buffer(
            "item_category", torch.as_tensor(f.item_category, dtype=torch.long) if f else torch.zeros(V, dtype=torch.long)
        )
        self.register_buffer("popularity", torch.as_tensor(f.popularity, dtype=torch.float32) if f else zeros.clone())
        self.register_buffer(
            "recent_popularity", torch.as_tensor(f.recent_popularity, dtype=torch.float32) if f else zeros.clone()
        )
        self._frozen_items: tuple[tuple[Any, ...], torch.Tensor] | None = None  # see item_reprs

    def init_weights(self) -> None:
        """Small normal weights; the output layer starts at zero so the untrained ranker is the
        retrieval order (score = z-scored retrieval score)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                nn.init.normal_(m.weight, std=0.02)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def item_repr(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) item indices -> (..., H): projected frozen retriever vector + attribute mean."""
        x = self.item_proj(self.item_vectors[idx])  # (..., H)
        attrs = self.item_attributes[idx.reshape(-1)]  # (M, A)
        return x + self.attr_emb(attrs).view(x.shape)  # (..., H)

    def item_reprs(self, *idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``item_repr`` of several index tensors; through one whole-catalogue table when the batch
        touches more rows than the catalogue has (training batches), per index otherwise.

        Without gradients (serving, evaluation) the table is computed once and kept: a request then
        gathers rows instead of running the projection and the attribute pooling again. The table is
        keyed by the storage and in-place version of every tensor it reads, so an optimizer step,
        ``load_state_dict`` or ``.to(device)`` rebuilds it.
        """
        if not torch.is_grad_enabled() and not self.training:
            tensors = (self.item_vectors, self.item_attributes, *self.item_proj.parameters(), *self.attr_emb.parameters())
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
            if self._frozen_items is None or self._frozen_items[0] != key:
                table = self.item_repr(torch.arange(self.n_items, device=idx[0].device))  # (V, H)
                self._frozen_items = (key, table)
            table = self._frozen_items[1]
            return tuple(table[i] for i in idx)
        if sum(i.numel() for i in idx) >= self.n_items:
            table = self.item_repr(torch.arange(self.n_items, device=idx[0].device))  # (V, H)
            return tuple(table[i] for i in idx)
        return tuple(self.item_repr(i) for i in idx)

    def forward(
        self,
        cand: torch.Tensor,
        cand_scores: torch.Tensor,
        hist: torch.Tensor,
        hist_types: torch.Tensor,
        hist_ts: torch.Tensor,
        profile: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            cand: (B, N) long candidate items; PAD/UNK (or fewer real candidates) are scored ``-inf``.
            cand_scores: (B, N) float retrieval scores of the candidates.
            hist: (B, T) long history, left-padded, newest at ``T - 1``; only the newest
                ``history_len`` steps are used.
            hist_types: (B, T) long event types of the history.
            hist_ts: (B, T) long timestamps (epoch seconds or positions) of the history.
            profile: (B, P) float user profile features, or None (zeros).

        Returns:
            (B, N) float scores.
        """
        T_max = self.cfg.history_len
        if hist.shape[1] > T_max:
            hist, hist_types, hist_ts = hist[:, -T_max:], hist_types[:, -T_max:], hist_ts[:, -T_max:]
        B, N = cand.shape
        T = hist.shape[1]
        H = self.cfg.hidden
        valid = cand >= N_RESERVED  # (B, N)
        hist_pad = hist == PAD_IDX  # (B, T)
        cand_c = cand.clamp(min=0)

        # target attention (DIN): each candidate pools the history its own way
        e_c, e_h = self.item_reprs(cand_c, hist)  # (B, N, H), (B, T, H)
        pos = torch.arange(T_max - T, T_max, device=hist.device)  # (T,) newest step is T_max - 1
        e_h = e_h + self.type_emb(hist_types) + self.pos_emb(pos)  # (B, T, H)
        logits = self.q(e_c) @ self.k(e_h).transpose(1, 2) / math.sqrt(H)  # (B, N, T)
        logits = logits.masked_fill(hist_pad[:, None, :], float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty history -> all-zero weights
        attn = w @ self.v(e_h)  # (B, N, H)

        dense = self.dense_features(cand_c, valid, cand_scores, hist, hist_pad, hist_ts)  # (B, N, N_DENSE)
        mix = self.event_mix(hist_types, hist_pad)  # (B, E)
        prof = profile if profile is not None else torch.zeros(B, self.n_profile_features, device=cand.device)
        if prof.shape != (B, self.n_profile_features):
            raise ValueError(f"profile must have shape ({B}, {self.n_profile_features}), got {tuple(prof.shape)}")
        user = torch.cat([mix, prof.to(e_c.dtype)], dim=1)[:, None, :].expand(B, N, -1)  # (B, N, E + P)
        x = torch.cat([e_c, attn, e_c * attn, dense, user], dim=-1)  # (B, N, F)
        score = self.out(self.mlp(x)).squeeze(-1) + self.retrieval_weight * dense[..., 0]  # (B, N)
        return score.masked_fill(~valid, float("-inf"))

    def dense_features(
        self,
        cand: torch.Tensor,
        valid: torch.Tensor,
        cand_scores: torch.Tensor,
        hist: torch.Tensor,
        hist_pad: torch.Tensor,
        hist_ts: torch.Tensor,
    ) -> torch.Tensor:
        """(B, N, N_DENSE) scalar features; column 0 is the z-scored retrieval score (the skip path).

        Columns: z-score, gap to the list's best score (in list std units), log rank, popularity,
        recent popularity, category never seen (0/1), log steps since the category, log time since
        it, share of the history in it, max and newest cosine similarity of retriever vectors.
        """
        B, N = cand.shape
        T = hist.shape[1]
        m = valid.to(cand_scores.dtype)  # (B, N)
        s = torch.where(valid, cand_scores, torch.zeros_like(cand_scores)).to(torch.float32)  # (B, N)
        cnt = m.sum(1, keepdim=True).clamp(min=1.0)
        mean = (s * m).sum(1, keepdim=True) / cnt  # (B, 1)
        std = (((s - mean) ** 2 * m).sum(1, keepdim=True) / cnt).sqrt().clamp(min=1e-6)  # (B, 1)
        z = (s - mean) / std * m  # (B, N)
        top = s.masked_fill(~valid, float("-inf")).max(1, keepdim=True).values.nan_to_num(0.0, neginf=0.0)
        gap = (s - top) / std * m  # (B, N) <= 0
        rank = s.masked_fill(~valid, float("-inf")).argsort(1, descending=True).argsort(1).float()  # (B, N)
        rank_f = torch.log1p(rank) / math.log1p(max(N, 2))

        pop = self.popularity[cand]  # (B, N)
        recent = self.recent_popularity[cand]  # (B, N)

        cc = self.item_category[cand]  # (B, N)
        hc = self.item_category[hist]  # (B, T)
        match = (cc[:, :, None] == hc[:, None, :]) & (cc != PAD_IDX)[:, :, None] & ~hist_pad[:, None, :]  # (B, N, T)
        steps = torch.arange(T, device=hist.device)
        last = torch.where(match, steps, torch.full_like(steps, -1)).max(-1).values  # (B, N) newest matching step
        never = last < 0
        steps_since = (T - 1 - last).clamp(min=0).float()
        steps_f = torch.where(never, torch.ones_like(steps_since), torch.log1p(steps_since) / math.log1p(self.cfg.history_len))
        ts_ref = hist_ts[:, -1:]  # (B, 1) newest step's time
        ts_last = hist_ts.gather(1, last.clamp(min=0))  # (B, N)
        dt = (ts_ref - ts_last).clamp(min=0).float()
        time_f = torch.where(never, torch.ones_like(dt), torch.log1p(dt) / TIME_SCALE)
        n_hist = (~hist_pad).sum(1, keepdim=True).clamp(min=1).float()  # (B, 1)
        share = match.sum(-1).float() / n_hist  # (B, N)

        # normalise only the rows used: the whole catalogue per call was a quarter of serving's rank time
        vc = F.normalize(self.item_vectors[cand], dim=-1)  # (B, N, D)
        vh = F.normalize(self.item_vectors[hist], dim=-1)  # (B, T, D)
        sim = vc @ vh.transpose(1, 2)  # (B, N, T) cosine; PAD rows are zero vectors
        max_sim = sim.masked_fill(hist_pad[:, None, :], float("-inf")).max(-1).values.nan_to_num(0.0, neginf=0.0)
        newest_sim = sim[:, :, -1]  # (B, N) 0 for an empty history

        cols = [z, gap, rank_f, pop, recent, never.float(), steps_f, time_f, share, max_sim, newest_sim]
        return torch.stack([c.to(torch.float32) for c in cols], dim=-1)  # (B, N, N_DENSE)

    def event_mix(self, hist_types: torch.Tensor, hist_pad: torch.Tensor) -> torch.Tensor:
        """(B, E) share of each event type in the history (zeros for an empty history)."""
        E = max(self.n_event_types, N_RESERVED)
        one_hot = F.one_hot(hist_types.clamp(0, E - 1), E).float() * (~hist_pad)[..., None]  # (B, T, E)
        return one_hot.sum(1) / (~hist_pad).sum(1, keepdim=True).clamp(min=1).float()  # (B, E)

    def profile_of(self, user_idx: torch.Tensor | None) -> torch.Tensor | None:
        """(B, P) profile rows of the users (zeros for users outside the table), or None without profiles."""
        if user_idx is None or self.n_profile_features == 0 or self.n_users == 0:
            return None
        idx = user_idx.long().to(self.user_profiles.device)
        inside = (idx >= 0) & (idx < self.n_users)
        return self.user_profiles[idx.clamp(0, self.n_users - 1)] * inside[:, None]  # (B, P)

    def meta(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``build_ranker(meta)`` rebuilds this net's shape."""
        return {
            "n_items": self.n_items,
            "n_attributes": self.n_attributes,
            "n_event_types": self.n_event_types,
            "item_dim": self.item_dim,
            "max_attributes": self.max_attributes,
            "n_profile_features": self.n_profile_features,
            "n_users": self.n_users,
            "cfg": dataclasses.asdict(self.cfg),
        }


def build_ranker(meta: dict[str, Any]) -> Ranker:
    """Rebuild an (untrained, zero-buffer) ``Ranker`` from ``Ranker.meta()``; then
    ``ranker.load_state_dict(safetensors.torch.load_file(path))`` restores weights and item facts.

    Raises:
        BundleError: a key is missing or the config section is invalid.
    """
    cfg = config_from_meta(meta, ("n_items", "n_attributes", "n_event_types", "item_dim"), RankerConfig, "ranker", "Ranker")
    return Ranker(
        n_items=int(meta["n_items"]),
        n_attributes=int(meta["n_attributes"]),
        n_event_types=int(meta["n_event_types"]),
        item_dim=int(meta["item_dim"]),
        cfg=cfg,
        max_attributes=int(meta.get("max_attributes", 8)),
        n_profile_features=int(meta.get("n_profile_features", 0)),
        n_users=int(meta.get("n_users", 0)),
    )
