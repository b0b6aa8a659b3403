"""The recommendation pipeline: prepare -> retrieve -> rank -> rules, written once in ``Recommender``.

``Recommender.answer`` (behind ``recommend_async`` and ``recommend``) is the only place that sequence exists. Where the model stages run is
its ``stages`` object (``Stages``: async ``retrieve``/``rank``): ``LocalStages`` calls ``retrieve``
and ``rank`` below in this process (tests, notebooks, the in-process benchmark, offline evaluation
through the serving rules); ``serving/stages.py`` batches them inside the Serve ingress or sends
them to the ``Retriever``/``Ranker`` deployments. Every variant ends in the same two functions,
which call ``towerline.training.inference``, the code offline evaluation runs: with an exact index
the served top-k is the offline pipeline's top-k, item for item, and no answer depends on the other
requests of its batch.

What a model version serves is decided once, when it loads (``load_model`` -> ``ModelState``):
whether the ranker runs (``ranker``, ``rank_hop``), how many candidates retrieval hands on
(``n_candidates``: the ranker's own list length from ``ranker/config.json`` when it ranks, else
``ServeSettings.n_candidates``), and whether retrieval is exact (flat index: ``inference.retrieve``)
or approximate (HNSW/IVF through FAISS, with its measured recall).

A request's history is the user's training history from the bundle (``bundle.histories``)
followed by the newer events of the online store, folded like training folds them (consecutive
steps on one item become one step with the strongest event type) and cut to the model's
``max_len`` newest steps. Items unknown to the model (``UNK_IDX``) are dropped from the model
input (``inference``): the item tower has nothing learned for them. Each step keeps its event time
(the bundle's histories and the online store both carry it), which the ranker reads.

Fallback: a user with no history at all (unknown to the model and no online events), or without
consent (``context={"consent": False}`` or ``consent == False`` in the bundle's optional
``users.parquet``), gets the most popular allowed items and ``fallback=True``. A user unknown to
the model *with* online events is personalised from those events: the user tower needs only a
history, which is how a new visitor's first clicks already shape the next page.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import faiss
import numpy as np
import pandas as pd
import torch

from towerline.config import ArmConfig, IndexConfig
from towerline.errors import TowerlineError
from towerline.features.vocab import N_RESERVED, PAD_IDX, UNK_IDX, Vocab
from towerline.serving import rules
from towerline.serving.history import HistoryEvent, HistoryStore
from towerline.serving.index import add_to_index, build_index, load_index, search
from towerline.serving.settings import ServeSettings
from towerline.training import inference
from towerline.training.bundle import Bundle, load_bundle
from towerline.training.ranker_model import Ranker

log = logging.getLogger(__name__)

PURCHASE = "purchase"


class UnknownItemError(TowerlineError):
    """An item id the model's vocabulary does not hold (``/items/{id}/similar`` answers 404)."""


Candidates = tuple[np.ndarray, np.ndarray]  # (item_idx (N,) int64, scores (N,) float32) of one request


@dataclass(frozen=True)
class ModelState:
    """One loaded model version with everything a request needs; swapped whole on reload.

    The serving decisions are made here, once per version, from the bundle and the settings:
    ``ranker`` (None: the retrieval score ranks), ``rank_hop`` (the rank stage is called at all) and
    ``n_candidates`` (the list length retrieval returns).
    """

    key: str  # a URI that loads this same version again (models:/name/<v>, runs:/..., or a directory)
    bundle: Bundle
    index: faiss.Index
    index_manifest: dict[str, Any]
    facts: rules.ItemFacts
    user_rows: np.ndarray  # (n_users,) row of each user vocabulary index in bundle.histories, -1 = none
    purchase_type: int  # event-type index of "purchase" (UNK_IDX when the vocabulary lacks it)
    blocked: np.ndarray  # (B,) item indices of ServeSettings.blocked_items
    item_table: torch.Tensor  # (V, D) float32 bundle.item_embeddings (shares their memory)
    n_candidates: int  # candidates per request: the ranker's trained list length, else settings.n_candidates
    ranker: Ranker | None = None  # the ranker requests go through; None without one or with rank_stage="never"
    rank_hop: bool = False  # the rank stage is called (a ranker ranks, or rank_stage="always")
    exact: bool = True  # flat index: exact scores through inference.retrieve (the offline path)
    index_dir: str | None = None  # where the index came from (None: the bundle's or built in memory)
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

    @property
    def has_ranker(self) -> bool:
        """The bundle carries a trained ranker (whether or not ``rank_stage`` lets it run)."""
        return self.bundle.ranker is not None

    @property
    def ref(self) -> tuple[str, str | None]:
        """What a stage in another process needs to load this same version: (key, index_dir)."""
        return (self.key, self.index_dir)


@dataclass(frozen=True)
class UserHistory:
    """A user's steps for one request, oldest first."""

    items: np.ndarray  # (L,) int64 item indices (UNK kept here, for the rules)
    event_types: np.ndarray  # (L,) int64
    timestamps: np.ndarray | None = None  # (L,) int64 event times (epoch seconds, or positions); None = zeros
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
    ranker = bundle.ranker if settings.rank_stage != "never" else None
    state = ModelState(
        key=model_key(bundle),
        bundle=bundle,
        index=index,
        index_manifest=manifest,
        facts=rules.item_facts(bundle.vocabs.items, bundle.items, bundle.item_popularity),
        user_rows=user_rows,
        purchase_type=bundle.vocabs.event_types.encode_one(PURCHASE),
        blocked=blocked[blocked >= N_RESERVED],
        item_table=torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)),
        n_candidates=inference.list_length(ranker) if ranker is not None else settings.n_candidates,
        ranker=ranker,
        rank_hop=settings.rank_stage == "always" or ranker is not None,
        exact=str(manifest.get("kind", "flat")) == "flat",
        index_dir=None if index_dir is None else str(index_dir),
        user_index={str(u): i + N_RESERVED for i, u in enumerate(bundle.vocabs.users.ids)},
        no_consent=_load_consent(bundle.path),
    )
    log.info("model %s loaded: %d items, %s index, %s, %d candidates", state.key, state.n_items, state.index_kind,
             "ranker on" if ranker is not None else "no ranker", state.n_candidates)
    return state


@dataclass(frozen=True)
class AddedItems:
    """What ``add_items`` did: ids appended (cold, attribute-only vectors) and ids it left alone."""

    added: list[str]
    known: list[str]  # already in the model's vocabulary: they keep their trained vectors
    without_attributes: list[str]  # added, but no attribute token the model knows (zero vector)


def add_items(state: ModelState, items: pd.DataFrame | Sequence[dict[str, Any]]) -> tuple[ModelState, AddedItems]:
    """A new ``ModelState`` serving ``state``'s catalogue plus cold-start ``items``; ``state`` is untouched.

    ``items`` has the catalogue contract's columns (``features.contracts``: ``item_id``,
    ``attributes`` list of tokens, optional ``price``, ``in_stock``, ``title``). Each new id gets the
    next item index (vocabulary rows only grow, so every index already handed out keeps its item),
    a vector from its attributes (``inference.cold_item_vectors``: the bundle's fitted cold-item
    mapper, ``training.cold_items``, or without one the item tower's attribute path, id part zeroed,
    which training taught with id dropout, DropoutNet, Volkovs et al., NeurIPS 2017), popularity 0,
    its stock flag and category in the rules' facts, and a row in a copy of the FAISS index (flat,
    HNSW or IVF: ``index.add_to_index``). Attribute tokens the model never saw are ignored (their
    embeddings were never trained). Ids the model already knows are left as they are and reported.

    The returned state has its own ``key`` (``<key>#items=<n>``), so a batch that mixes requests
    of the old and the new state never answers one with the other's vocabulary. It lives in this
    process only: a Retriever deployment in another process (``stage_placement="deployments"``)
    reloads versions by key and would not have the items, and a ranker has per-item tables sized to
    the trained catalogue, so both are refused with a ``TowerlineError`` rather than served wrong.
    """
    if state.ranker is not None:
        raise TowerlineError(
            f"model {state.key} ranks with a ranker whose item tables cover the trained catalogue only; "
            "add cold items to a version served with rank_stage='never', or retrain"
        )
    df = pd.DataFrame(list(items)) if not isinstance(items, pd.DataFrame) else items.copy()
    if "item_id" not in df:
        raise ValueError("items need an 'item_id' column")
    df["item_id"] = df["item_id"].astype(str)
    df = df.drop_duplicates("item_id", keep="last")
    bundle = state.bundle
    vocab = bundle.vocabs.items
    is_known = np.array([i in vocab for i in df["item_id"]], dtype=bool)
    known = df.loc[is_known, "item_id"].tolist()
    new = df.loc[~is_known].reset_index(drop=True)
    if not len(new):
        return state, AddedItems(added=[], known=known, without_attributes=[])
    if "attributes" not in new:
        new["attributes"] = [[] for _ in range(len(new))]
    new["attributes"] = [list(a) if isinstance(a, (list, tuple, np.ndarray)) else [] for a in new["attributes"]]
    width = bundle.net.cfg.max_attributes
    rows = np.full((len(new), width), PAD_IDX, dtype=np.int64)  # (N, A)
    no_attr: list[str] = []
    for r, tokens in enumerate(new["attributes"]):
        idx = bundle.vocabs.attributes.encode(np.asarray([str(t) for t in tokens], dtype=object)) if tokens else np.zeros(0, np.int64)
        idx = idx[idx >= N_RESERVED][:width]  # unknown tokens (UNK) were never trained: left out
        rows[r, : len(idx)] = idx
        if not len(idx):
            no_attr.append(str(new["item_id"][r]))
    vectors = inference.cold_item_vectors(bundle.net, rows, bundle.cold_items)  # (N, D)
    first = state.n_items
    new_idx = np.arange(first, first + len(new), dtype=np.int64)  # (N,)
    vocabs = dataclasses.replace(bundle.vocabs, items=Vocab(np.concatenate([vocab.ids, new["item_id"].to_numpy(dtype=object)])))
    emb = np.concatenate([bundle.item_embeddings, vectors.astype(bundle.item_embeddings.dtype)], axis=0)  # (V + N, D)
    popularity = np.concatenate([np.asarray(bundle.item_popularity, dtype=np.int64)[:first],
                                 np.zeros(first - min(first, len(bundle.item_popularity)) + len(new), dtype=np.int64)])
    catalogue = pd.concat([bundle.items, new], ignore_index=True) if len(bundle.items) else new
    new_bundle = dataclasses.replace(bundle, vocabs=vocabs, item_embeddings=emb, item_popularity=popularity, items=catalogue)
    index = add_to_index(state.index, vectors, new_idx)
    cold = int(state.index_manifest.get("cold_items", 0)) + len(new)
    new_state = dataclasses.replace(
        state,
        key=f"{state.key.split('#items=')[0]}#items={len(vocabs.items)}",
        bundle=new_bundle,
        index=index,
        index_manifest={**state.index_manifest, "count": int(emb.shape[0]), "cold_items": cold},
        facts=rules.item_facts(vocabs.items, catalogue, popularity),
        item_table=torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)),
    )
    added = new["item_id"].tolist()
    log.info("added %d cold items to %s (%d known ids left alone, %d without known attributes); %d items now",
             len(added), state.key, len(known), len(no_attr), new_state.n_items)
    return new_state, AddedItems(added=added, known=known, without_attributes=no_attr)


def _fold_repeats(items: np.ndarray, etypes: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive steps on one item become one step with the strongest event type and the first
    step's time (as ``features.sequences.build_sequences`` folds training data)."""
    if len(items) < 2:
        return items, etypes, ts
    repeats = items[1:] == items[:-1]  # (L - 1,)
    if not repeats.any():  # the usual case (the bundle's histories are folded already): nothing to do
        return items, etypes, ts
    starts = np.flatnonzero(np.concatenate(([True], ~repeats)))
    return items[starts], np.maximum.reduceat(etypes, starts), ts[starts]


def training_histories(bundle: Bundle, rows: np.ndarray, ends: np.ndarray | None = None) -> list[UserHistory]:
    """The training-time histories of ``bundle.histories`` rows, each cut before flat index ``ends``
    when given (offline evaluation: the steps before a held-out target)."""
    hist = bundle.histories
    if hist is None:
        return []
    out = []
    rows = np.asarray(rows, dtype=np.int64)
    stops = hist.offsets[1:][rows] if ends is None else np.asarray(ends, dtype=np.int64)
    for r, hi in zip(rows, stops):
        lo = int(hist.offsets[r])
        out.append(UserHistory(hist.item_idx[lo:hi].astype(np.int64), hist.event_type_idx[lo:hi].astype(np.int64),
                               hist.timestamp[lo:hi].astype(np.int64), int(hist.user_idx[r])))
    return out


def user_history(state: ModelState, user_id: str, online: Sequence[HistoryEvent]) -> UserHistory:
    """Training history of ``user_id`` (if the model knows the user) followed by ``online`` events."""
    vocabs = state.bundle.vocabs
    parts_i: list[np.ndarray] = []
    parts_t: list[np.ndarray] = []
    parts_ts: list[np.ndarray] = []
    u = state.user_index.get(user_id, UNK_IDX)
    hist = state.bundle.histories
    if hist is not None and u >= N_RESERVED and state.user_rows[u] >= 0:
        row = int(state.user_rows[u])
        lo, hi = int(hist.offsets[row]), int(hist.offsets[row + 1])
        parts_i.append(hist.item_idx[lo:hi])
        parts_t.append(hist.event_type_idx[lo:hi])
        parts_ts.append(hist.timestamp[lo:hi])
    if online:
        parts_i.append(vocabs.items.encode(np.asarray([e.item_id for e in online], dtype=object)))
        parts_t.append(vocabs.event_types.encode(np.asarray([e.event_type for e in online], dtype=object)))
        parts_ts.append(np.asarray([e.timestamp for e in online], dtype=np.int64))
    if not parts_i:
        empty = np.zeros(0, dtype=np.int64)
        return UserHistory(empty, empty, empty, u)
    if len(parts_i) == 1:  # one source: its arrays as int64, without a concatenation (batch exports: every user)
        items, etypes, ts = (parts_i[0].astype(np.int64), parts_t[0].astype(np.int64), parts_ts[0].astype(np.int64))
    else:
        items, etypes, ts = (np.concatenate(parts_i).astype(np.int64), np.concatenate(parts_t).astype(np.int64),
                             np.concatenate(parts_ts).astype(np.int64))
    items, etypes, ts = _fold_repeats(items, etypes, ts)
    return UserHistory(items, etypes, ts, u)


def prepare(
    state: ModelState,
    settings: ServeSettings,
    user_id: str,
    online: Sequence[HistoryEvent],
    exclude: Sequence[str] = (),
    context: dict[str, Any] | None = None,
) -> Prepared:
    """History and banned items of one request; ``fallback`` when there is nothing to personalise on."""
    return prepare_history(state, settings, user_id, user_history(state, user_id, online), exclude, context)


def prepare_history(
    state: ModelState,
    settings: ServeSettings,
    user_id: str,
    history: UserHistory,
    exclude: Sequence[str] = (),
    context: dict[str, Any] | None = None,
) -> Prepared:
    """``prepare`` for a history already assembled (offline evaluation gives the steps before a target)."""
    no_consent = (context or {}).get("consent") is False or user_id in state.no_consent
    seen: np.ndarray = np.zeros(0, dtype=np.int64)
    if settings.exclude_seen:
        seen = history.items
    elif settings.exclude_purchased:
        seen = history.items[history.event_types == state.purchase_type]
    excluded = state.bundle.vocabs.items.encode(np.asarray(list(exclude), dtype=object)) if exclude else ()
    banned = rules.banned_mask(
        state.n_items,
        in_stock=state.facts.in_stock if settings.drop_out_of_stock else None,
        blocked=state.blocked,
        seen=seen,
        exclude=excluded,
    )
    model_input = history.items[history.items != UNK_IDX]
    return Prepared(history=history, banned=banned, fallback=no_consent or len(model_input) == 0)


def histories_of(histories: Sequence[UserHistory]) -> inference.Histories:
    """Requests' histories in ``inference``'s flat layout (missing timestamps become zeros)."""
    return inference.Histories.from_rows(
        [h.items for h in histories],
        [h.event_types for h in histories],
        [h.timestamps if h.timestamps is not None else np.zeros(len(h), dtype=np.int64) for h in histories],
        [h.user_idx for h in histories],
    )


def user_vectors(bundle: Bundle, histories: Sequence[UserHistory]) -> np.ndarray:
    """(B, D) user-tower output over each history's newest ``max_len`` known items (``inference``)."""
    return inference.user_vectors_of(bundle.net, bundle.item_embeddings, histories_of(histories))


def retrieve(state: ModelState, settings: ServeSettings, histories: Sequence[UserHistory]) -> list[Candidates]:
    """``state.n_candidates`` candidates per history, best first, the history's items masked as in
    training: ``[(item_idx (N,), scores (N,))]`` (``PAD_IDX`` fills a list the catalogue cannot).

    Exact index: ``inference.retrieve``, the offline function. Approximate index: FAISS over the
    same user vectors, asked for enough extra results to drop the history and still keep N.
    """
    if not histories:
        return []
    hist = histories_of(histories)
    n = state.n_candidates
    if state.exact:
        idx, scores = inference.retrieve(state.bundle.net, state.item_table, hist, n)  # (B, N) each
        return [(idx[b], scores[b]) for b in range(len(histories))]
    vecs = inference.user_vectors_of(state.bundle.net, state.bundle.item_embeddings, hist)  # (B, D)
    depth = min(n + N_RESERVED + max(len(h) for h in histories), state.index.ntotal)
    scores, idx = search(state.index, vecs, depth, threads=settings.threads)  # (B, depth) each
    out = []
    for b, h in enumerate(histories):
        keep = (idx[b] >= N_RESERVED) & ~np.isin(idx[b], h.items)
        i, s = idx[b][keep][:n], scores[b][keep][:n].astype(np.float32)
        pad = n - len(i)
        out.append((np.concatenate([i, np.full(pad, PAD_IDX, dtype=np.int64)]).astype(np.int64),
                    np.concatenate([s, np.zeros(pad, dtype=np.float32)])))
    return out


def rank(state: ModelState, histories: Sequence[UserHistory], candidates: Sequence[Candidates]) -> list[Candidates]:
    """Each request's candidates scored by ``state.ranker`` (``inference.rank``, one batched call);
    the retrieval scores as they are when the version serves without a ranker."""
    plain = [(np.asarray(i, dtype=np.int64), np.asarray(s, dtype=np.float32)) for i, s in candidates]
    if state.ranker is None or not plain:
        return plain
    cand = np.stack([i for i, _ in plain])  # (B, N)
    scores = inference.rank(state.ranker, histories_of(histories), cand, np.stack([s for _, s in plain]))  # (B, N)
    return [(cand[b], scores[b]) for b in range(len(plain))]


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


def arm_request(arm: ArmConfig | None, arm_models: Mapping[str, ModelState]) -> dict[str, Any]:
    """``recommend_async``'s ``state`` and ``popular_only`` for a user in ``arm`` of the active
    experiment (None: no experiment): the arm's own model version when it names one (loaded beside
    the served one, ``arm_models`` by arm name), popular items for a ``rules: popular`` arm.

    What an arm serves is decided here once, for the batch export (``serving/batch.py``) and for
    anyone else who answers a user "as their arm would"."""
    return {
        "state": arm_models.get(arm.name) if arm is not None else None,
        "popular_only": arm is not None and arm.rules == "popular",  # the non-personalised arm
    }


def check_k(k: int, settings: ServeSettings) -> None:
    if not 1 <= k <= settings.max_k:
        raise ValueError(f"k must be between 1 and {settings.max_k}, got {k}")


class Stages(Protocol):
    """Where the model stages of a request run; ``Recommender`` awaits these two and nothing else."""

    async def retrieve(self, state: ModelState, history: UserHistory) -> Candidates: ...

    async def rank(self, state: ModelState, history: UserHistory, candidates: Candidates) -> Candidates: ...


class LocalStages:
    """Both stages in this process, one request at a time (never suspends: see ``run_inline``)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings

    async def retrieve(self, state: ModelState, history: UserHistory) -> Candidates:
        return retrieve(state, self.settings, [history])[0]

    async def rank(self, state: ModelState, history: UserHistory, candidates: Candidates) -> Candidates:
        return rank(state, [history], [candidates])[0]


def run_inline(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never waits on anything to its result, without an event loop.

    ``Recommender.recommend`` (the synchronous call of tests, notebooks and benchmarks) runs the one
    async request path this way with ``LocalStages``, whose awaits return at once; stages that really
    suspend (batching, handles) need ``await recommend_async(...)`` instead.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("these stages suspend (batched or remote): call `await Recommender.recommend_async(...)`")


class Recommender:
    """The request path, written once: prepare -> retrieve -> rank -> rules. Example::

        state = load_model("runs/latest/bundle")
        rec = Recommender(state, ServeSettings(), SQLiteHistoryStore("history.sqlite"))
        rec.recommend("u000042", k=10).items  # [("i00017", 3.2), ...]

    The Serve ingress holds one with batched or handle-backed ``stages`` (``serving/stages.py``) and
    awaits ``recommend_async``; ``state`` is swapped whole on reload.
    """

    def __init__(
        self, state: ModelState, settings: ServeSettings, store: HistoryStore, stages: Stages | None = None
    ) -> None:
        self.state = state
        self.settings = settings
        self.store = store
        self.stages: Stages = stages if stages is not None else LocalStages(settings)

    async def recommend_async(
        self,
        user_id: str,
        k: int = 10,
        exclude: Sequence[str] = (),
        context: dict[str, Any] | None = None,
        *,
        state: ModelState | None = None,
        popular_only: bool = False,
    ) -> RecommendResult:
        """One request: the user's training history + online events, then ``answer``.

        ``state`` overrides the served version (an experiment arm with its own model);
        ``popular_only`` serves popular items (the non-personalised arm of an experiment).
        """
        check_k(k, self.settings)
        state = state or self.state  # one version for the whole request, even if someone swaps self.state
        online = self.store.recent(user_id, self.settings.history_recent)
        return await self.answer(state, user_id, user_history(state, user_id, online), k, exclude, context, popular_only)

    async def answer(
        self,
        state: ModelState,
        user_id: str,
        history: UserHistory,
        k: int = 10,
        exclude: Sequence[str] = (),
        context: dict[str, Any] | None = None,
        popular_only: bool = False,
    ) -> RecommendResult:
        """prepare -> retrieve -> rank -> rules for a history already assembled."""
        check_k(k, self.settings)
        prep = prepare_history(state, self.settings, user_id, history, exclude, context)
        if popular_only:
            prep = dataclasses.replace(prep, fallback=True)
        if prep.fallback:
            return finish(state, self.settings, prep, None, k)
        cands = await self.stages.retrieve(state, prep.history)
        ranked = await self.stages.rank(state, prep.history, cands) if state.rank_hop else cands
        return finish(state, self.settings, prep, ranked, k)

    def recommend(
        self, user_id: str, k: int = 10, exclude: Sequence[str] = (), context: dict[str, Any] | None = None
    ) -> RecommendResult:
        """``recommend_async`` run synchronously (in-process stages only)."""
        return run_inline(self.recommend_async(user_id, k, exclude, context))

    def similar(self, item_id: str, k: int = 10) -> list[tuple[str, float]]:
        check_k(k, self.settings)
        return similar_items(self.state, self.settings, item_id, k)
