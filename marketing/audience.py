"""Item -> audience: the users most likely to buy an item next, for a campaign.

Recommendation asks "which items for this user?"; a campaign asks the transpose, "which users for
this item?". The two-tower model answers both with the same vectors: every user's state after
their history (``user_vectors``) is searched with the item's vector (FAISS inner product).

Scoring. The model is trained with a softmax over the catalogue, so a user's probability of taking
item ``i`` next is ``exp(u.v_i) / sum_j exp(u.v_j)``. Ranking users by the raw ``u.v_i`` would
favour users whose vectors are long (confident about *everything*); ranking by
``log p(i | u) = u.v_i - logsumexp_j(u.v_j)`` asks the campaign's question. FAISS still does the
search: users are indexed as ``[u, -lse(u)]`` and queried with ``[v_i, 1]``, whose inner product is
exactly ``log p(i | u)``. ``scoring="dot"`` keeps the raw inner product (``bench/audience.py``
compares the two).

Learned scoring. When the bundle carries ``audience_scorer.json`` (``towerline audience-scorer``
fits it on the validation step), an item query ranks every eligible user (or, with the scorer's
``pool`` > 0, the FAISS search's top users joined by the users with the most co-visitation and
category/brand evidence for the item) by a small model (linear plus 16 tanh units) over
``log p(i | u)`` and that evidence (``marketing.audience_scorer``). ``scoring="auto"``
(the default) uses it whenever it is there; ``"probability"`` asks for the model alone.

Who is never in an audience: users without consent (privacy: no personalisation), users whose
consent is unknown when a profiles table is given (exports leave non-consenting users out, so
"absent" is treated as "no"), and, for an item query, users who already bought it (data with
purchase events) or already interacted with it (data without event types, such as the S3Rec
files, where every interaction is a purchase). An attributes query (a category campaign) excludes
nobody for past behaviour: past buyers of a category are its best prospects.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from towerline.training.bundle import Bundle
from towerline.errors import DataValidationError
from towerline.features.sequences import Sequences
from towerline.features.vocab import N_RESERVED
from towerline.marketing.audience_scorer import Evidence, learned_audience, load_scorer, scorer_path
from towerline.training import inference
from towerline.text import Text

log = logging.getLogger(__name__)

Scoring = Literal["auto", "learned", "probability", "dot"]
Exclude = Literal["auto", "purchased", "interacted", "none"]
PURCHASE = "purchase"


# ----------------------------------------------------------------------------------------------
# user vectors


def user_vectors(
    bundle: Bundle,
    extra_history: pd.DataFrame | None = None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Every known user's vector: the user tower over their newest ``max_len`` steps, computed by
    ``training.inference`` exactly as serving computes a request's vector.

    Args:
        bundle: a loaded bundle with ``histories`` (every user's steps at training time).
        extra_history: events that arrived after training (``user_id``, ``item_id``,
            ``timestamp``, optional ``event_type``), e.g. read from the online history store;
            they are appended to the users' histories (new users get rows too).
        batch_size: users per forward pass.

    Returns:
        user_ids (U,) object array of external ids and vectors (U, D) float32, same order.
    """
    hist, user_ids = merged_histories(bundle, extra_history)
    rows = inference.Histories.from_sequences(hist, np.arange(len(hist)))
    out = inference.user_vectors_of(bundle.net, bundle.item_embeddings, rows, batch_size)  # (U, D), as served
    log.info("user vectors: %d users, dim %d", len(out), bundle.dim)
    return user_ids, out


@torch.no_grad()
def log_partition(bundle: Bundle, vectors: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """(U,) ``logsumexp_j(u . v_j)`` over the real catalogue (reserved rows left out).

    The normaliser of each user's softmax; compute it once per set of user vectors and pass it to
    ``find_audience`` (a service caches it beside the vectors).
    """
    items = torch.from_numpy(np.ascontiguousarray(bundle.item_embeddings[N_RESERVED:], dtype=np.float32))  # (V', D)
    u = np.ascontiguousarray(vectors, dtype=np.float32)
    out = np.empty(len(u), dtype=np.float32)
    for lo in range(0, len(u), batch_size):
        logits = torch.from_numpy(u[lo : lo + batch_size]) @ items.T  # (B, V')
        out[lo : lo + batch_size] = torch.logsumexp(logits, dim=1).numpy()
    return out


def merged_histories(bundle: Bundle, extra_history: pd.DataFrame | None = None) -> tuple[Sequences, np.ndarray]:
    """The bundle's histories with ``extra_history`` events appended, and the external id of each row.

    Rows are keyed by user vocabulary index; users unknown to the vocabulary get indices past its
    end, in first-seen order. Items or event types the vocabulary lacks encode as UNK, as they do
    at serving time.
    """
    hist = bundle.histories
    if hist is None:
        raise DataValidationError(
            f"bundle {bundle.path} has no histories.npz; retrain with a current towerline to get user histories"
        )
    vocab = bundle.vocabs.users
    if extra_history is None or not len(extra_history):
        return hist, vocab.decode(hist.user_idx)
    x = extra_history
    users = x["user_id"].astype(str).to_numpy(dtype=object)  # (X,)
    unknown = ~np.isin(users, vocab.ids)
    new = pd.unique(users[unknown])
    user = vocab.encode(users)
    user[unknown] = len(vocab) + pd.Index(new).get_indexer(users[unknown])
    etypes = x["event_type"].astype(str).to_numpy(dtype=object) if "event_type" in x else np.full(len(x), "interaction", dtype=object)
    values = x["value"].to_numpy(dtype=np.float64) if "value" in x else np.full(len(x), np.nan)
    user_all = np.concatenate([np.repeat(hist.user_idx, hist.lengths), user])
    ts_all = np.concatenate([hist.timestamp, x["timestamp"].to_numpy(dtype=np.int64)])
    order = np.lexsort((np.arange(len(user_all)), ts_all, user_all))  # by user, then time, then arrival
    user_all = user_all[order]
    row_start = np.flatnonzero(np.r_[True, user_all[1:] != user_all[:-1]])
    items = bundle.vocabs.items.encode(x["item_id"].astype(str).to_numpy(dtype=object))
    merged = Sequences(
        offsets=np.append(row_start, len(user_all)).astype(np.int64),
        user_idx=user_all[row_start],
        item_idx=np.concatenate([hist.item_idx, items])[order],
        event_type_idx=np.concatenate([hist.event_type_idx, bundle.vocabs.event_types.encode(etypes)])[order],
        timestamp=ts_all[order],
        value=np.concatenate([hist.value, values])[order],
    )
    known = merged.user_idx < len(vocab)
    ids = np.empty(len(merged), dtype=object)
    ids[known] = vocab.decode(merged.user_idx[known])
    ids[~known] = np.asarray(new, dtype=object)[merged.user_idx[~known] - len(vocab)]
    return merged, ids


# ----------------------------------------------------------------------------------------------
# audiences


def find_audience(
    bundle: Bundle,
    vectors: np.ndarray,
    user_ids: np.ndarray,
    item_id: str | None = None,
    attributes: Sequence[str] | None = None,
    size: int = 100,
    segment: str | None = None,
    profiles: pd.DataFrame | None = None,
    *,
    scoring: Scoring = "auto",
    log_z: np.ndarray | None = None,
    exclude: Exclude = "auto",
    extra_history: pd.DataFrame | None = None,
    evidence: Evidence | None = None,
) -> pd.DataFrame:
    """The ``size`` users most likely to buy ``item_id`` next (or items with all of ``attributes``).

    Args:
        bundle: the model bundle (item vectors, vocabularies, histories for exclusions).
        vectors: (U, D) user vectors from ``user_vectors``; ``user_ids`` (U,) their ids.
        item_id: the item to find buyers for; or
        attributes: tokens (``"category:skincare"``, ``"attr:12"``); the query is the mean vector
            of the catalogue items carrying all of them.
        size: audience size (fewer when fewer users are eligible).
        segment: keep only users whose lifecycle ``segment`` or ``rfm_group`` (or ``cluster``
            number) equals this; needs ``profiles``.
        profiles: profiles table (``user_id``, ``consent``, ``segment``, ``rfm_group``...);
            when given, only users in it with consent are eligible.
        scoring: ``"auto"``: the bundle's learned scorer for an item query when it has one
            (``audience_scorer.json``), else ``"probability"``; ``"learned"`` insists on it;
            ``"probability"`` ranks by ``log p(item | user)``, ``"dot"`` by ``u . v``.
        log_z: (U,) ``log_partition(bundle, vectors)``, computed here when needed and absent.
        exclude: past behaviour that removes a user for an item query; ``"auto"`` = purchased
            when the histories hold purchase events, else interacted.
        extra_history: events after training (as given to ``user_vectors``); a purchase there
            excludes its user too.
        evidence: ``Evidence.from_bundle(bundle, extra_history)`` for the learned scorer, built
            here when needed and absent (a service or a benchmark builds it once).

    Returns:
        DataFrame ``user_id``, ``score`` (descending), plus ``segment`` when profiles are given.

    Raises:
        DataValidationError: unknown item, attributes no item carries, a segment without
            profiles, or neither/both of item_id and attributes.
    """
    if (item_id is None) == (attributes is None or len(attributes) == 0):
        raise DataValidationError("audience: give exactly one of item_id or attributes")
    if size < 1:
        raise DataValidationError(f"audience: size must be >= 1, got {size}")
    user_ids = np.asarray(user_ids, dtype=object)
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    if vecs.ndim != 2 or len(vecs) != len(user_ids):
        raise ValueError(f"vectors {vecs.shape} and user_ids ({len(user_ids)},) must have one row per user")

    if item_id is not None:
        item_idx = bundle.vocabs.items.encode_one(str(item_id))
        if item_idx < N_RESERVED:
            raise DataValidationError(
                f"audience: item_id {item_id!r} is not in the model's catalogue ({len(bundle.vocabs.items.ids)} items); "
                "check the id or retrain with it"
            )
        query = bundle.item_embeddings[item_idx]  # (D,)
    else:
        query = attribute_query(bundle, list(attributes or []))

    eligible = np.ones(len(user_ids), dtype=bool)
    seg_of_user: pd.Series | None = None
    if profiles is not None:
        p = profiles.drop_duplicates("user_id").set_index(profiles["user_id"].drop_duplicates().astype(str))
        consent = p["consent"].astype(bool) if "consent" in p else pd.Series(True, index=p.index)
        eligible &= consent.reindex(user_ids).fillna(False).to_numpy(dtype=bool)
        if segment is not None:
            match = pd.Series(False, index=p.index)
            for col in ("segment", "rfm_group"):
                if col in p:
                    match |= p[col].astype(str).str.lower() == str(segment).lower()
            if "cluster" in p and str(segment).lstrip("-").isdigit():
                match |= p["cluster"] == int(segment)
            if not match.any():
                known = sorted(set(p.get("segment", pd.Series(dtype=str)).astype(str)) | set(p.get("rfm_group", pd.Series(dtype=str)).astype(str)))
                raise DataValidationError(f"audience: no user is in segment {segment!r}; known segments: {', '.join(known)}")
            eligible &= match.reindex(user_ids).fillna(False).to_numpy(dtype=bool)
        seg_of_user = p["segment"].astype(str) if "segment" in p else None
    elif segment is not None:
        raise DataValidationError("audience: --segment needs profiles (pass --data, or a profiles table)")

    if item_id is not None and exclude != "none":
        eligible &= ~past_users(bundle, item_idx, user_ids, exclude, extra_history)

    scorer = load_scorer(bundle) if scoring in ("auto", "learned") else None
    if scoring == "learned" and (scorer is None or item_id is None):
        raise DataValidationError(
            f"audience: scoring 'learned' needs an item query and {scorer_path(bundle)}; fit it with "
            f"`towerline audience-scorer --model {bundle.path}`" if scorer is None else
            "audience: the learned scorer ranks users for an item; use scoring 'probability' for attributes"
        )
    if scorer is not None and item_id is not None:
        lz = log_partition(bundle, vecs) if log_z is None else np.asarray(log_z, dtype=np.float32)
        ev_all = evidence if evidence is not None else Evidence.from_bundle(bundle, extra_history, scorer.heuristics)
        ev = ev_all.item_evidence(item_idx, user_ids)
        index = index_vectors(vecs, lz)[0] if scorer.pool else None  # pool 0 scores every user: no search
        scores, rows, _ = learned_audience(scorer, index, vecs, query, lz, ev, eligible, size)
    elif scoring in ("auto", "learned", "probability"):
        lz = log_partition(bundle, vecs) if log_z is None else np.asarray(log_z, dtype=np.float32)
        scores, rows = search_rows(index_vectors(vecs, lz)[0], np.append(query, 1.0), eligible, size)
    else:
        scores, rows = _search(vecs, np.asarray(query), eligible, size)
    out = pd.DataFrame({"user_id": pd.Series(user_ids[rows], dtype="str"), "score": scores.astype(np.float64)})
    if seg_of_user is not None:
        out["segment"] = seg_of_user.reindex(out["user_id"]).to_numpy()
    log.info("audience for %s: %d users of %d eligible", item_id or attributes, len(out), int(eligible.sum()))
    return out


def attribute_query(bundle: Bundle, attributes: list[str]) -> np.ndarray:
    """(D,) mean item vector of the catalogue items carrying every one of ``attributes``."""
    items = bundle.items
    if "attributes" not in items or not len(items):
        raise DataValidationError("audience: the bundle's catalogue has no attributes; query by item_id")
    wanted = set(attributes)
    has_all = np.fromiter((wanted.issubset(a if a is not None else ()) for a in items["attributes"]), bool, len(items))
    if not has_all.any():
        raise DataValidationError(
            f"audience: no catalogue item carries all of {sorted(wanted)}; check the tokens "
            "(e.g. 'category:skincare', 'brand:norvik', 'attr:12')"
        )
    idx = bundle.vocabs.items.encode(items["item_id"][has_all].astype(str).to_numpy())
    idx = idx[idx >= N_RESERVED]
    if not len(idx):
        raise DataValidationError(f"audience: the items carrying {sorted(wanted)} are unknown to the model")
    return bundle.item_embeddings[idx].mean(axis=0)


def past_users(
    bundle: Bundle,
    item_idx: int,
    user_ids: np.ndarray,
    exclude: Exclude = "auto",
    extra_history: pd.DataFrame | None = None,
) -> np.ndarray:
    """(U,) bool: which of ``user_ids`` already bought (or interacted with) item ``item_idx``.

    ``"auto"`` means purchased when the histories hold any purchase event, else interacted: in
    data without event types every interaction is the purchase (a review of a bought product).
    """
    if bundle.histories is None or exclude == "none":
        return np.zeros(len(user_ids), dtype=bool)
    hist, row_ids = merged_histories(bundle, extra_history)
    purchase_idx = bundle.vocabs.event_types.encode_one(PURCHASE)
    if exclude == "auto":
        has_purchases = purchase_idx >= N_RESERVED and bool((hist.event_type_idx == purchase_idx).any())
        exclude = "purchased" if has_purchases else "interacted"
    hit = hist.item_idx == item_idx
    if exclude == "purchased":
        hit &= hist.event_type_idx == purchase_idx
    rows = np.unique(np.searchsorted(hist.offsets, np.flatnonzero(hit), side="right") - 1)
    return np.isin(np.asarray(user_ids, dtype=object), row_ids[rows])


def index_vectors(vectors: np.ndarray, log_z: np.ndarray) -> tuple[Any, np.ndarray]:
    """An exact FAISS index of users as ``[u, -lse(u)]`` (query ``[v_i, 1]``: inner product = ``log p(i | u)``)."""
    x = np.hstack([np.asarray(vectors, np.float32), -np.asarray(log_z, np.float32)[:, None]])  # (U, D+1)
    return flat_index(x), x


def flat_index(x: np.ndarray) -> Any:
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _search(index_vecs: np.ndarray, query: np.ndarray, eligible: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` eligible rows by inner product with FAISS (exact ``IndexFlatIP``, bitmap selector)."""
    return search_rows(flat_index(index_vecs), query, eligible, k)


def search_rows(index: Any, query: np.ndarray, eligible: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``index`` among the ``eligible`` ones (bitmap selector): (scores, rows), best first."""
    import faiss

    n_ok = int(eligible.sum())
    if n_ok == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    bitmap = np.packbits(eligible, bitorder="little")
    params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(eligible), faiss.swig_ptr(bitmap)))
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    scores, rows = index.search(q, min(k, n_ok), params=params)
    keep = rows[0] >= 0  # -1: fewer results than asked
    return scores[0][keep], rows[0][keep]


# ----------------------------------------------------------------------------------------------
# the service's request and response (POST /audiences)


class AudienceRequest(BaseModel):
    """``POST /audiences`` body: an item or a set of attribute tokens, an audience size, a segment."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"item_id": "i00042", "size": 500}]})

    item_id: Optional[Annotated[Text, Field(min_length=1, max_length=256)]] = None
    attributes: Optional[list[Annotated[Text, Field(min_length=1, max_length=128)]]] = Field(default=None, min_length=1, max_length=16)
    size: StrictInt = Field(default=100, ge=1, le=100_000)
    segment: Optional[Annotated[Text, Field(min_length=1, max_length=64)]] = None

    @model_validator(mode="after")
    def _one_query(self) -> "AudienceRequest":
        if (self.item_id is None) == (self.attributes is None):
            raise ValueError("give exactly one of item_id or attributes")
        return self


class AudienceMember(BaseModel):
    user_id: str
    score: float
    segment: str | None = None


class AudienceResponse(BaseModel):
    item_id: str | None
    attributes: list[str] | None
    size: int
    users: list[AudienceMember]
    model_version: str | None = None


def audience_response(
    bundle: Bundle, vectors: np.ndarray, user_ids: np.ndarray, req: AudienceRequest,
    profiles: pd.DataFrame | None = None, log_z: np.ndarray | None = None, evidence: Evidence | None = None,
) -> AudienceResponse:
    """One-line handler body for ``POST /audiences`` (vectors, ids, ``log_z`` and the learned
    scorer's ``evidence`` cached at start-up)."""
    frame = find_audience(
        bundle, vectors, user_ids, item_id=req.item_id, attributes=req.attributes, size=req.size,
        segment=req.segment, profiles=profiles, log_z=log_z, evidence=evidence,
    )
    members = [AudienceMember(**_clean(r)) for r in frame.to_dict("records")]
    return AudienceResponse(item_id=req.item_id, attributes=req.attributes, size=len(members), users=members,
                            model_version=bundle.model_version)


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in record.items()}
