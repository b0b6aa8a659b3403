"""The recommendation pipeline as plain Python: history -> user tower -> FAISS top-N -> rank -> rules.

The Ray Serve deployments in ``app.py`` call these same functions, split across processes
(ingress: history and rules; retriever: user tower + FAISS; ranker: ``rank``); ``Recommender``
chains them in one process for tests, notebooks and the in-process latency benchmark. One code
path, so what the tests check is what the endpoint serves.

A request's history is the user's training history from the bundle (``bundle.histories``)
followed by the newer events of the online store, folded like training folds them (consecutive
steps on one item become one step with the strongest event type) and cut to the model's
``max_len`` newest steps. Items unknown to the model (``UNK_IDX``) are dropped from the model
input: the item tower has nothing learned for them.

Fallback: a user with no history at all (unknown to the model and no online events), or without
consent (``context={"consent": False}`` or ``consent == False`` in the bundle's optional
``users.parquet``), gets the most popular allowed items and ``fallback=True``. A user unknown to
the model *with* online events is personalised from those events: the user tower needs only a
history, which is how a new visitor's first clicks already shape the next page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import pandas as pd
import torch

from towerline.bundle import Bundle, load_bundle
from towerline.config import IndexConfig
from towerline.errors import TowerlineError
from towerline.features.sequences import left_padded_windows
from towerline.features.vocab import N_RESERVED, PAD_IDX, UNK_IDX
from towerline.serving import rules
from towerline.serving.history import HistoryEvent, HistoryStore
from towerline.serving.index import build_index, load_index, search
from towerline.serving.settings import ServeSettings

log = logging.getLogger(__name__)

PURCHASE = "purchase"


class UnknownItemError(TowerlineError):
    """An item id the model's vocabulary does not hold (``/items/{id}/similar`` answers 404)."""


@dataclass(frozen=True)
class ModelState:
    """One loaded model version with everything a request needs; swapped whole on reload."""

    key: str  # a URI that loads this same version again (models:/name/<v>, runs:/..., or a directory)
    bundle: Bundle
    index: faiss.Index
    index_manifest: dict[str, Any]
    facts: rules.ItemFacts
    user_rows: np.ndarray  # (n_users,) row of each user vocabulary index in bundle.histories, -1 = none
    purchase_type: int  # event-type index of "purchase" (UNK_IDX when the vocabulary lacks it)
    blocked: np.ndarray  # (B,) item indices of ServeSettings.blocked_items
    has_ranker: bool = False  # the bundle carries a trained ranker (ranker/config.json)
    user_index: dict[str, int] = field(default_factory=dict)  # user id -> vocabulary index, one dict lookup
    no_consent: frozenset[str] = frozenset()

    @property
    def n_items(self) -> int:
        return int(self.bundle.item_embeddings.shape[0])

    @property
    def model_version(self) -> str | None:
        return self.bundle.model_version

    @property
    def index_kind(self) -> str:
        return str(self.index_manifest.get("kind", "flat"))


@dataclass(frozen=True)
class UserHistory:
    """A user's steps for one request, oldest first."""

    items: np.ndarray  # (L,) int64 item indices (UNK kept here, for the rules)
    event_types: np.ndarray  # (L,) int64
    user_idx: int = UNK_IDX  # user vocabulary index: the ranker's profile row (UNK: no profile)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Prepared:
    """Ingress-side facts of one request: the model input and what the rules must ban."""

    history: UserHistory
    banned: np.ndarray  # (V,) bool
    fallback: bool  # True: serve popular items, skip retrieval


@dataclass(frozen=True)
class RecommendResult:
    items: list[tuple[str, float]] = field(default_factory=list)  # (item_id, score), best first
    fallback: bool = False
    model_version: str | None = None


def model_key(bundle: Bundle) -> str:
    """A URI that loads exactly this version again in another process (no moving alias)."""
    if bundle.model_name and bundle.model_version:
        return f"models:/{bundle.model_name}/{bundle.model_version}"
    if bundle.uri.startswith("runs:/"):
        return bundle.uri
    return str(Path(bundle.path).resolve())


def _load_consent(path: Path) -> frozenset[str]:
    users = path / "users.parquet"
    if not users.is_file():
        return frozenset()
    df = pd.read_parquet(users, columns=None)
    if "consent" not in df:
        return frozenset()
    return frozenset(df.loc[df["consent"].eq(False), "user_id"].astype(str))


def load_model(
    uri: str | Path,
    settings: ServeSettings = ServeSettings(),
    index_dir: str | Path | None = None,
) -> ModelState:
    """Load a bundle and its index into a ``ModelState``.

    The index comes from ``index_dir``, else the bundle's ``index/`` folder, else an exact
    ``IndexFlatIP`` is built in memory (milliseconds for tens of thousands of items). A loaded
    index must match the bundle (dim, count, and model version when both know it):
    ``load_index`` raises ``IndexMismatchError`` on a corrupt or foreign file, and the caller keeps
    serving what it had.
    """
    bundle = load_bundle(uri)
    emb = bundle.item_embeddings  # (V, D)
    directory = Path(index_dir) if index_dir else bundle.path / "index"
    if index_dir or (directory / "manifest.json").is_file():
        expect: dict[str, Any] = {"dim": bundle.dim, "count": int(emb.shape[0])}
        if bundle.model_version:
            expect["model_version"] = bundle.model_version
        index, manifest = load_index(directory, expect=expect)
    else:
        index = build_index(emb, IndexConfig(kind="flat"), threads=settings.threads)
        manifest = {"kind": "flat", "dim": bundle.dim, "count": int(emb.shape[0]), "built": "in memory"}
    hist = bundle.histories
    user_rows = np.full(len(bundle.vocabs.users), -1, dtype=np.int64)
    if hist is not None and len(hist):
        user_rows[hist.user_idx] = np.arange(len(hist), dtype=np.int64)
    blocked = bundle.vocabs.items.encode(np.asarray(settings.blocked_items, dtype=object))
    state = ModelState(
        key=model_key(bundle),
        bundle=bundle,
        index=index,
        index_manifest=manifest,
        facts=rules.item_facts(bundle.vocabs.items, bundle.items, bundle.item_popularity),
        user_rows=user_rows,
        purchase_type=bundle.vocabs.event_types.encode_one(PURCHASE),
        blocked=blocked[blocked >= N_RESERVED],
        has_ranker=(bundle.path / "ranker" / "config.json").is_file(),
        user_index={str(u): i + N_RESERVED for i, u in enumerate(bundle.vocabs.users.ids)},
        no_consent=_load_consent(bundle.path),
    )
    log.info("model %s loaded: %d items, %s index", state.key, state.n_items, state.index_kind)
    return state


def _fold_repeats(items: np.ndarray, etypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive steps on one item become one step with the strongest event type (as in training)."""
    if len(items) < 2:
        return items, etypes
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
    return items[starts], np.maximum.reduceat(etypes, starts)


def training_histories(bundle: Bundle, rows: np.ndarray) -> list[UserHistory]:
    """The training-time histories of ``bundle.histories`` rows (index recall queries, benchmarks)."""
    hist = bundle.histories
    if hist is None:
        return []
    out = []
    for r in np.asarray(rows, dtype=np.int64):
        lo, hi = int(hist.offsets[r]), int(hist.offsets[r + 1])
        out.append(UserHistory(hist.item_idx[lo:hi].astype(np.int64), hist.event_type_idx[lo:hi].astype(np.int64),
                               int(hist.user_idx[r])))
    return out


def user_history(state: ModelState, user_id: str, online: Sequence[HistoryEvent]) -> UserHistory:
    """Training history of ``user_id`` (if the model knows the user) followed by ``online`` events."""
    vocabs = state.bundle.vocabs
    parts_i: list[np.ndarray] = []
    parts_t: list[np.ndarray] = []
    u = state.user_index.get(user_id, UNK_IDX)
    hist = state.bundle.histories
    if hist is not None and u >= N_RESERVED and state.user_rows[u] >= 0:
        row = int(state.user_rows[u])
        lo, hi = int(hist.offsets[row]), int(hist.offsets[row + 1])
        parts_i.append(hist.item_idx[lo:hi])
        parts_t.append(hist.event_type_idx[lo:hi])
    if online:
        parts_i.append(vocabs.items.encode(np.asarray([e.item_id for e in online], dtype=object)))
        parts_t.append(vocabs.event_types.encode(np.asarray([e.event_type for e in online], dtype=object)))
    if not parts_i:
        return UserHistory(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), u)
    items, etypes = _fold_repeats(np.concatenate(parts_i).astype(np.int64), np.concatenate(parts_t).astype(np.int64))
    return UserHistory(items, etypes, u)


def prepare(
    state: ModelState,
    settings: ServeSettings,
    user_id: str,
    online: Sequence[HistoryEvent],
    exclude: Sequence[str] = (),
    context: dict[str, Any] | None = None,
) -> Prepared:
    """History and banned items of one request; ``fallback`` when there is nothing to personalise on."""
    history = user_history(state, user_id, online)
    no_consent = (context or {}).get("consent") is False or user_id in state.no_consent
    seen: np.ndarray = np.zeros(0, dtype=np.int64)
    if settings.exclude_seen:
        seen = history.items
    elif settings.exclude_purchased:
        seen = history.items[history.event_types == state.purchase_type]
    excluded = state.bundle.vocabs.items.encode(np.asarray(list(exclude), dtype=object)) if exclude else ()
    banned = rules.banned_mask(
        state.n_items,
        in_stock=state.facts.in_stock,
        blocked=state.blocked,
        seen=seen,
        exclude=excluded,
    )
    model_input = history.items[history.items != UNK_IDX]
    return Prepared(history=history, banned=banned, fallback=no_consent or len(model_input) == 0)


@torch.inference_mode()
def user_vectors(bundle: Bundle, histories: Sequence[UserHistory]) -> np.ndarray:
    """(B, D) user-tower output over each history's newest ``max_len`` known items.

    The history's item vectors are looked up in ``bundle.item_embeddings`` (the item tower's
    eval-mode output, which the index holds too) instead of running the item tower again: the
    same numbers, without the attribute pooling on every request.
    """
    known = [h.items != UNK_IDX for h in histories]
    items = [h.items[m] for h, m in zip(histories, known)]
    etypes = [h.event_types[m] for h, m in zip(histories, known)]
    lengths = np.array([len(x) for x in items], dtype=np.int64)  # (B,)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    flat_i = np.concatenate(items) if items else np.zeros(0, dtype=np.int64)
    flat_t = np.concatenate(etypes) if etypes else np.zeros(0, dtype=np.int64)
    # the tower's positions are right-aligned, so padding only to the longest history in the batch
    # (not to max_len) gives the same vectors for a fraction of the attention cost
    width = int(min(bundle.max_len, max(1, int(lengths.max(initial=1)))))
    hist = left_padded_windows(flat_i.astype(np.int64), starts, ends, width)  # (B, T)
    types = left_padded_windows(flat_t.astype(np.int64), starts, ends, width)  # (B, T)
    types[hist == PAD_IDX] = PAD_IDX
    table = torch.from_numpy(bundle.item_embeddings)  # (V, D), shares memory with the array
    vec = bundle.net.user_vector(torch.from_numpy(hist), torch.from_numpy(types), item_table=table)  # (B, D)
    return np.ascontiguousarray(vec.float().numpy(), dtype=np.float32)


def retrieve(
    state: ModelState, settings: ServeSettings, histories: Sequence[UserHistory]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """FAISS top-N per history: ``[(item_idx (N,), scores (N,))]``; N grows by the history length,
    so excluding seen items still leaves about ``n_candidates``."""
    if not histories:
        return []
    vecs = user_vectors(state.bundle, histories)  # (B, D)
    n = settings.n_candidates + N_RESERVED + max(len(h) for h in histories)
    scores, idx = search(state.index, vecs, min(n, state.index.ntotal), threads=settings.threads)  # (B, N) each
    return [(idx[b], scores[b]) for b in range(len(histories))]


def rank(
    state: ModelState | None,
    histories: Sequence[UserHistory],
    candidates: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score each user's candidates with the bundle's trained ranker (the retrieval score without one).

    One batched ranker call when every list has the same length (the usual case: N candidates);
    the rules sort by the returned scores, so candidate order need not change here.
    """
    plain = [(np.asarray(i), np.asarray(s, dtype=np.float32)) for i, s in candidates]
    if state is None or getattr(state.bundle, "ranker", None) is None or not plain:
        return plain
    from towerline.training.ranker_model import rank_candidates

    if len({len(i) for i, _ in plain}) == 1:
        scores = rank_candidates(
            state.bundle, [h.items for h in histories], [h.event_types for h in histories], None,
            np.stack([i for i, _ in plain]), np.stack([s for _, s in plain]),
            user_idx=np.array([h.user_idx for h in histories], dtype=np.int64),
        )
        return [(i, scores[row].astype(np.float32)) for row, (i, _) in enumerate(plain)]
    return [
        (i, rank_candidates(state.bundle, h.items, h.event_types, None, i, s, user_idx=h.user_idx).astype(np.float32))
        for h, (i, s) in zip(histories, plain)
    ]


def apply_rank_stage(
    state: ModelState,
    settings: ServeSettings,
    histories: Sequence[UserHistory],
    candidates: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rank`` unless ``settings.rank_stage`` is ``"never"``: then the retrieval scores order the
    candidates even when the bundle carries a ranker (to serve, or measure, retrieval alone)."""
    return rank(state if settings.rank_stage != "never" else None, histories, candidates)


def popular(state: ModelState, settings: ServeSettings, k: int, banned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most popular allowed items; score = share of training interactions."""
    idx, _, _ = rules.fill_popular(
        np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), k, state.facts.popular, banned,
        state.facts.category, settings.max_per_category,
    )
    total = max(int(state.facts.popularity.sum()), 1)
    return idx, (state.facts.popularity[idx] / total).astype(np.float32)


def finish(
    state: ModelState,
    settings: ServeSettings,
    prepared: Prepared,
    ranked: tuple[np.ndarray, np.ndarray] | None,
    k: int,
) -> RecommendResult:
    """Rules over the ranked candidates (or popular items on fallback), decoded to item ids."""
    if prepared.fallback or ranked is None:
        idx, scores = popular(state, settings, k, prepared.banned)
        fallback = True
    else:
        idx, scores = rules.select(ranked[0], ranked[1], k, prepared.banned, state.facts.category, settings.max_per_category)
        idx, scores, _ = rules.fill_popular(
            idx, scores, k, state.facts.popular, prepared.banned, state.facts.category, settings.max_per_category
        )
        fallback = False
    ids = state.bundle.vocabs.items.decode(idx)
    return RecommendResult(
        items=[(str(i), float(s)) for i, s in zip(ids, scores)], fallback=fallback, model_version=state.model_version
    )


def similar_items(state: ModelState, settings: ServeSettings, item_id: str, k: int) -> list[tuple[str, float]]:
    """Nearest items by inner product of item-tower vectors, without the item itself, reserved,
    blocked or out-of-stock items. Raises ``UnknownItemError`` for an id the model lacks."""
    idx = state.bundle.vocabs.items.encode_one(item_id)
    if idx < N_RESERVED:
        raise UnknownItemError(f"item {item_id!r} is not in the catalogue of model {state.key}")
    query = state.bundle.item_embeddings[idx : idx + 1]  # (1, D)
    n = min(k + N_RESERVED + 1 + len(state.blocked) + int((~state.facts.in_stock).sum()), state.index.ntotal)
    scores, cand = search(state.index, query, n, threads=settings.threads)  # (1, n) each
    banned = rules.banned_mask(state.n_items, in_stock=state.facts.in_stock, blocked=state.blocked, exclude=[idx])
    keep_idx, keep_scores = rules.select(cand[0], scores[0], k, banned)
    return [(str(i), float(s)) for i, s in zip(state.bundle.vocabs.items.decode(keep_idx), keep_scores)]


def check_k(k: int, settings: ServeSettings) -> None:
    if not 1 <= k <= settings.max_k:
        raise ValueError(f"k must be between 1 and {settings.max_k}, got {k}")


class Recommender:
    """The whole pipeline in one process. Example::

        state = load_model("runs/latest/bundle")
        rec = Recommender(state, ServeSettings(), SQLiteHistoryStore("history.sqlite"))
        rec.recommend("u000042", k=10).items  # [("i00017", 3.2), ...]
    """

    def __init__(self, state: ModelState, settings: ServeSettings, store: HistoryStore) -> None:
        self.state = state
        self.settings = settings
        self.store = store

    def recommend(
        self, user_id: str, k: int = 10, exclude: Sequence[str] = (), context: dict[str, Any] | None = None
    ) -> RecommendResult:
        check_k(k, self.settings)
        state = self.state  # one version for the whole request, even if someone swaps self.state
        online = self.store.recent(user_id, self.settings.history_recent)
        prep = prepare(state, self.settings, user_id, online, exclude, context)
        if prep.fallback:
            return finish(state, self.settings, prep, None, k)
        (cands,) = retrieve(state, self.settings, [prep.history])
        (ranked,) = apply_rank_stage(state, self.settings, [prep.history], [cands])
        return finish(state, self.settings, prep, ranked, k)

    def similar(self, item_id: str, k: int = 10) -> list[tuple[str, float]]:
        check_k(k, self.settings)
        return similar_items(self.state, self.settings, item_id, k)
