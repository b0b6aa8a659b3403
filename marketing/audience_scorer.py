"""A learned audience score: the model's ``log p(item | user)`` with the evidence a marketer reads.

On Beauty the next purchase is strongly tied to the category, brand and co-visited neighbours of a
user's last few items; the heuristics of ``audience_baselines`` read that evidence directly, the
two-tower model only through its vectors. This module combines both in one small model per
(user, item) pair (a linear score plus 16 tanh units for interactions, 12 inputs: a few hundred
numbers), whose weights are *fitted on the validation step* and stored beside the bundle
(``audience_scorer.json``); ``audience.find_audience`` applies them whenever the file is there, so
the CLI, ``POST /audiences`` and ``bench/audience.py`` all rank with the same function.

Features of a candidate user ``u`` for item ``i`` (``FEATURES``):

* ``dot`` = ``u . v_i`` and ``neg_log_z`` = ``-logsumexp_j(u . v_j)``: their sum is ``log p(i | u)``,
  so the model-only ranking is one setting of the weights;
* ``covisit`` and ``log_covisit``: recency-weighted co-visitation of the user's recent items with
  ``i`` (``audience_baselines.covisitation_scores``); ``covisit_last``: the co-visitation of the
  user's newest item alone with ``i``; ``log_covisit_total``: the user's co-visitation with every
  item, so that the weights can read the *share* of it that ``i`` takes (a user with many recent
  items co-occurs with everything);
* ``log_follows`` and ``follows_last``: the same with directed co-visitation ("bought j, then i"
  within the window), over the recent items and of the newest one;
* ``log_affinity``: recency weight of ``i``'s category/brand tokens (idf-weighted) in the user's
  recent items (``audience_baselines.affinity_scores``), ``log_affinity_total`` the user's total
  token weight, ``affinity_last``: the tokens the newest item shares with ``i``;
* ``log_activity``: ``log(1 + steps)`` of the user's history.

Scoring. With ``pool`` 0 (the default) every eligible user is scored: ``item_evidence`` already
reads every user's evidence for the item (a few sparse products), and the features and the small
network cost microseconds a user, so no buyer is lost to a candidate step. With ``pool`` > 0 it
is two-stage: the FAISS search of ``find_audience`` proposes the top ``pool`` users by the model,
the users with the strongest co-visitation (over their recent items, and of their newest item)
and affinity evidence join them (``pool`` each), and the union is re-scored with the weights
(``learned_audience``, the one path serving and the fit's report share).

Fitting runs on the validation step (every user's validation item hidden, the histories before
it) and maximises the softmax likelihood of each item's real next buyers among the eligible users
(a conditional logit, the listwise objective behind recall@N). Negatives are sampled in two
strata, each with its own log correction: the item's evidence candidates (the hard ones) and,
with ``pool`` 0, the other eligible users. Items held out of the fit measure the fitted scorer at
N = 100, 500, 1000 against the model alone and the heuristics (``validation_report``, stored in
``fitted["validation_recall"]``): the figure to choose settings by. The test step is never read:
``bench/audience.py`` evaluates on it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from towerline.errors import DataValidationError
from towerline.features.sequences import Sequences
from towerline.features.vocab import N_RESERVED
from towerline.marketing import audience_baselines as ab

log = logging.getLogger(__name__)

SCORER_FILE = "audience_scorer.json"
FORMAT = "towerline-audience-scorer/1"  # bump with FEATURES or the meaning of a field
FEATURES = ("dot", "neg_log_z", "covisit", "log_covisit", "covisit_last", "log_covisit_total", "log_follows",
            "follows_last", "log_affinity", "log_affinity_total", "affinity_last", "log_activity")
REPORT_SIZES = (100, 500, 1000)  # audience sizes of the fit's validation report (bench/audience.py's)
COVISIT_EPS = 1e-3  # log_covisit = log(covisit + eps): users without evidence sit at log(eps)


class HeuristicParams(BaseModel):
    """How the evidence is read (the heuristics' own defaults in ``bench/audience.py``)."""

    model_config = ConfigDict(extra="forbid")

    recent: int = Field(20, ge=1)  # a user's last N items count
    half_life: float = Field(10.0, gt=0)  # recency half-life, in steps
    window: int = Field(3, ge=1)  # co-visitation: pairs within this many steps


class AudienceScorer(BaseModel):
    """The fitted weights, as stored in ``audience_scorer.json`` (plain JSON, nothing unpickled)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["towerline-audience-scorer/1"] = FORMAT
    features: list[str]
    mean: list[float]  # standardisation of each feature (over the fitting candidates)
    scale: list[float]
    weights: list[float]  # linear part: sum_k weights[k] * z_k, z = (x - mean) / scale
    hidden_weights: list[list[float]] = Field(default_factory=list)  # (H, F): + out . tanh(hidden_weights z + hidden_bias)
    hidden_bias: list[float] = Field(default_factory=list)  # (H,)
    output_weights: list[float] = Field(default_factory=list)  # (H,); H = 0: the linear model alone
    heuristics: HeuristicParams = Field(default_factory=HeuristicParams)
    pool: int = Field(0, ge=0)  # candidates per source (model, co-visitation, affinity), at least 2 x size; 0 = every eligible user
    item_embeddings_sha256: str | None = None  # the bundle the weights were fitted for
    fitted: dict[str, Any] = Field(default_factory=dict)  # what it was fitted on, and its validation recall

    @model_validator(mode="after")
    def _shapes(self) -> "AudienceScorer":
        F, H = len(self.features), len(self.output_weights)
        if not (len(self.mean) == len(self.scale) == len(self.weights) == F):
            raise ValueError(f"mean, scale and weights need one number per feature ({F})")
        if len(self.hidden_bias) != H or len(self.hidden_weights) != H or any(len(r) != F for r in self.hidden_weights):
            raise ValueError(f"hidden_weights ({H} x {F}), hidden_bias and output_weights ({H}) do not fit together")
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """(n,) scores of a (n, F) feature matrix in ``features`` order."""
        z = (np.asarray(x, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)  # (n, F)
        out = z @ np.asarray(self.weights, np.float64)
        if self.output_weights:
            h = np.tanh(z @ np.asarray(self.hidden_weights, np.float64).T + np.asarray(self.hidden_bias))  # (n, H)
            out = out + h @ np.asarray(self.output_weights, np.float64)
        return out


# ----------------------------------------------------------------------------------------------
# evidence: what the heuristics read from the histories


@dataclass
class Evidence:
    """Every user's recent-item evidence over one set of histories (rows in ``user_ids`` order).

    Build it once per set of histories (``from_bundle``; a service keeps it beside the user
    vectors): the matrices cost a fraction of a second on Beauty, one item's scores a few
    sparse products.
    """

    user_ids: np.ndarray  # (R,) external ids
    W: sp.csr_matrix  # (R, I) recency weights of each user's recent items
    last_item: np.ndarray  # (R,) vocabulary index of each user's newest item
    activity: np.ndarray  # (R,) steps in each user's history
    A: sp.csr_matrix  # (I, T) idf-weighted item x attribute token
    UT: sp.csr_matrix  # (R, T) = W @ A
    C: sp.csc_matrix  # (I, I) cosine co-visitation
    D: sp.csc_matrix  # (I, I) directed co-visitation: D[j, i] for i within the window after j
    covisit_total: np.ndarray  # (R,) each user's co-visitation with every item
    affinity_total: np.ndarray  # (R,) each user's total token weight

    @classmethod
    def from_histories(cls, hist: Sequences, user_ids: np.ndarray, item_attributes: Sequence[Sequence[str]],
                       params: HeuristicParams | None = None) -> "Evidence":
        p = params or HeuristicParams()
        n_items = len(item_attributes)
        W = ab.recency_matrix(hist.offsets, hist.item_idx, n_items, p.recent, p.half_life)
        A, _ = ab.attribute_matrix(item_attributes, idf=True)
        C = ab.covisitation_matrix(hist.offsets, hist.item_idx, n_items, window=p.window)
        D = ab.covisitation_matrix(hist.offsets, hist.item_idx, n_items, window=p.window, directed=True)
        lengths = hist.lengths
        last = np.where(lengths > 0, hist.item_idx[np.maximum(hist.offsets[1:] - 1, 0)] if hist.n_events else 0, 0)
        UT = (W @ A).tocsr()
        covisit_total = np.asarray(W @ np.asarray(C.sum(axis=1)).ravel()).ravel()
        affinity_total = np.asarray(UT @ np.asarray(A.sum(axis=0)).ravel()).ravel()
        return cls(np.asarray(user_ids, dtype=object), W, last.astype(np.int64), lengths.astype(np.float64),
                   A, UT, C, D, covisit_total, affinity_total)

    @classmethod
    def from_bundle(cls, bundle: Any, extra_history: Any = None, params: HeuristicParams | None = None) -> "Evidence":
        """The evidence of ``bundle``'s histories (with ``extra_history`` appended), as ``user_vectors`` sees them."""
        from towerline.marketing.audience import merged_histories  # audience imports this module

        hist, ids = merged_histories(bundle, extra_history)
        return cls.from_histories(hist, ids, item_attribute_lists(bundle), params)

    def rows_of(self, user_ids: np.ndarray) -> np.ndarray:
        """(U,) row of each of ``user_ids`` here, -1 for a user these histories lack."""
        if len(user_ids) == len(self.user_ids) and np.array_equal(np.asarray(user_ids, dtype=object), self.user_ids):
            return np.arange(len(user_ids))
        import pandas as pd

        return pd.Index(self.user_ids).get_indexer(np.asarray(user_ids, dtype=object))

    def item_evidence(self, item_idx: int, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """(U,) evidence of each of ``user_ids`` for ``item_idx`` (0 for a user these histories lack)."""
        col = self.C[:, item_idx].toarray().ravel()  # (I,) co-visitation of every item with it
        follows = self.D[:, item_idx].toarray().ravel()  # (I,) how often it came after each item
        tokens = self.A[item_idx].toarray().ravel()  # (T,)
        shared = np.asarray(self.A @ tokens).ravel()  # (I,) token weight each item shares with it
        per_user = {
            "covisit": self.W @ col, "covisit_last": col[self.last_item], "covisit_total": self.covisit_total,
            "follows": self.W @ follows, "follows_last": follows[self.last_item],
            "affinity": np.asarray(self.UT @ tokens).ravel(), "affinity_total": self.affinity_total,
            "affinity_last": shared[self.last_item], "activity": self.activity,
        }
        rows = self.rows_of(user_ids)
        known = rows >= 0

        def gather(x: np.ndarray) -> np.ndarray:
            out = np.zeros(len(rows), np.float64)
            out[known] = x[rows[known]]
            return out

        return {k: gather(np.asarray(v, np.float64)) for k, v in per_user.items()}


def item_attribute_lists(bundle: Any) -> list[list[str]]:
    """Attribute tokens of each item vocabulary index (empty for reserved rows and bare items)."""
    attrs: list[list[str]] = [[] for _ in range(len(bundle.vocabs.items))]
    items = bundle.items
    if items is None or "attributes" not in items or not len(items):
        return attrs
    for idx, a in zip(bundle.vocabs.items.encode(items["item_id"].astype(str).to_numpy(dtype=object)), items["attributes"]):
        if int(idx) >= N_RESERVED:
            attrs[int(idx)] = [str(t) for t in a] if a is not None else []
    return attrs


# ----------------------------------------------------------------------------------------------
# candidates and features: the one path fitting and serving share


def features(dot: np.ndarray, log_z: np.ndarray, ev: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """(n, F) ``FEATURES`` of the candidate ``rows``: ``dot`` (n,) is theirs, ``log_z`` and ``ev`` are (U,)."""
    cov = ev["covisit"][rows]
    return np.stack([
        np.asarray(dot, np.float64), -log_z[rows], cov, np.log(cov + COVISIT_EPS), ev["covisit_last"][rows],
        np.log(ev["covisit_total"][rows] + COVISIT_EPS), np.log(ev["follows"][rows] + COVISIT_EPS), ev["follows_last"][rows],
        np.log1p(ev["affinity"][rows]), np.log1p(ev["affinity_total"][rows]), ev["affinity_last"][rows],
        np.log1p(ev["activity"][rows]),
    ], axis=1)


def candidates(model_rows: np.ndarray, ev: dict[str, np.ndarray], eligible: np.ndarray, pool: int) -> np.ndarray:
    """Sorted unique rows: the model's top users (``model_rows``, from FAISS) and the ``pool``
    eligible users with the most co-visitation (over their recent items, and of their newest item)
    and the most affinity evidence (evidence > 0 only); ``pool`` 0: every eligible user."""
    if pool == 0:
        return np.flatnonzero(eligible)
    parts = [np.asarray(model_rows, np.int64)]
    for key in ("covisit", "covisit_last", "affinity"):
        s = np.where(eligible, ev[key], 0.0)
        has = np.flatnonzero(s > 0)
        if len(has) > pool:
            has = has[np.argpartition(-s[has], pool - 1)[:pool]]
        parts.append(has)
    return np.unique(np.concatenate(parts))


def pool_size(scorer: AudienceScorer, size: int) -> int:
    """Candidates per source at audience size ``size`` (0: every eligible user)."""
    return max(scorer.pool, 2 * size) if scorer.pool else 0


def rescore(scorer: AudienceScorer, vectors: np.ndarray, query: np.ndarray, log_z: np.ndarray,
            ev: dict[str, np.ndarray], rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``size`` of the candidate ``rows`` by the learned score: (scores, rows), best first."""
    s = scorer.score(features(vectors[rows] @ query, log_z, ev, rows))
    order = np.lexsort((rows, -s))[:size]  # ties: lower row first (deterministic)
    return s[order], rows[order]


def learned_audience(scorer: AudienceScorer, index: Any, vectors: np.ndarray, query: np.ndarray, log_z: np.ndarray,
                     ev: dict[str, np.ndarray], eligible: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The served learned audience (``find_audience``, and the fit's validation report): the FAISS
    search of ``index`` (``audience.index_vectors``) for the model's top users, the evidence
    candidates beside them, the top ``size`` by the learned score. Returns (scores, rows, candidates)."""
    from towerline.marketing.audience import search_rows  # audience imports this module

    k = pool_size(scorer, size)
    model_rows = search_rows(index, np.append(query, 1.0), eligible, k)[1] if k else np.zeros(0, np.int64)
    rows = candidates(model_rows, ev, eligible, k)
    scores, top = rescore(scorer, vectors, np.asarray(query, np.float32), log_z, ev, rows, size)
    return scores, top, rows


# ----------------------------------------------------------------------------------------------
# loading and saving


def scorer_path(bundle: Any) -> Path:
    return Path(bundle.path) / SCORER_FILE


def load_scorer(bundle: Any) -> AudienceScorer | None:
    """The bundle's fitted scorer (``audience_scorer.json``), or None when it has none.

    Weights fitted for another model (a different ``item_embeddings.npy``) are not applied: the
    scale of ``u . v`` is the model's own. Cached in ``bundle.extras``.
    """
    path = scorer_path(bundle)
    key = ("audience_scorer", str(path))
    cache = bundle.extras
    if key in cache:
        return cache[key]
    scorer = None
    if path.is_file():
        try:
            scorer = AudienceScorer.model_validate(json.loads(path.read_text()))
        except (ValueError, ValidationError) as e:
            raise DataValidationError(f"{path}: not a Towerline audience scorer ({str(e).splitlines()[0]}); "
                                      "refit it with `towerline audience-scorer`") from None
        if list(scorer.features) != list(FEATURES):
            raise DataValidationError(f"{path}: features {scorer.features} are not this version's {list(FEATURES)}; "
                                      "refit it with `towerline audience-scorer`")
        mine = bundle.manifest.get("files", {}).get("item_embeddings.npy")
        if scorer.item_embeddings_sha256 and mine and scorer.item_embeddings_sha256 != mine:
            log.warning("%s was fitted for another model (item embeddings differ); audiences use log p(item | user) "
                        "alone until it is refitted", path)
            scorer = None
    cache[key] = scorer
    return scorer


def save_scorer(scorer: AudienceScorer, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(scorer.model_dump(), indent=2))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# fitting on the validation step


@dataclass
class ValidationView:
    """Every user's history before their validation step, what the model makes of it, and the buyers."""

    bundle: Any  # the bundle with histories cut before the validation step
    user_ids: np.ndarray  # (U,)
    vectors: np.ndarray  # (U, D)
    log_z: np.ndarray  # (U,)
    evidence: Evidence
    buyers: dict[int, np.ndarray]  # item index -> rows (into user_ids) whose validation item it is
    interacted: dict[int, np.ndarray]  # item index -> rows that interacted with it before


def validation_view(bundle: Any, params: HeuristicParams | None = None) -> ValidationView:
    """Cut every evaluated user's history before their validation item (the model's own split)."""
    import dataclasses

    from towerline.marketing.audience import log_partition, user_vectors
    from towerline.training.data import make_split

    full = bundle.histories
    if full is None:
        raise DataValidationError(f"bundle {bundle.path} has no histories.npz; the scorer is fitted on them")
    split = make_split(full, bundle.config.data)
    valid = split.valid
    if not len(valid):
        raise DataValidationError("audience scorer: the split has no validation step to fit on")
    lengths = full.lengths.copy()
    lengths[valid.rows] = valid.history_end - full.offsets[:-1][valid.rows]
    keep = lengths > 0
    past = full.truncate(lengths, keep)
    view = dataclasses.replace(bundle, histories=past)
    ids, vectors = user_vectors(view)
    log_z = log_partition(view, vectors)
    evidence = Evidence.from_histories(past, ids, item_attribute_lists(bundle), params)
    # rows of `past` are the kept rows of `full`, in order
    row_in_past = np.full(len(full), -1, np.int64)
    row_in_past[np.flatnonzero(keep)] = np.arange(int(keep.sum()))
    vr = row_in_past[valid.rows]
    ok = vr >= 0
    buyers: dict[int, list[int]] = {}
    for r, t in zip(vr[ok], valid.targets[ok]):
        buyers.setdefault(int(t), []).append(int(r))
    row_of_step = np.repeat(np.arange(len(past)), past.lengths)
    order = np.argsort(past.item_idx, kind="stable")
    items_sorted = past.item_idx[order]
    interacted = {}
    for item in buyers:
        lo, hi = np.searchsorted(items_sorted, [item, item + 1])
        interacted[item] = np.unique(row_of_step[order[lo:hi]])
    return ValidationView(view, ids, vectors, log_z, evidence,
                          {k: np.asarray(v, np.int64) for k, v in buyers.items()}, interacted)


def validation_report(scorer: AudienceScorer, vv: ValidationView, items: np.ndarray, sizes: Sequence[int] = REPORT_SIZES,
                      seed: int = 0) -> dict[str, Any]:
    """Recall@N on the validation step of ``items`` (items the fit did not see): the served learned
    audience, the model alone, the two heuristics (as ``bench/audience.py`` reads them), and the share
    of the buyers that are among the scorer's candidates at that N (the ceiling of its recall).

    The number to compare scorer variants by; the test step stays for ``bench/audience.py``. Users
    who interacted with the item before are excluded; recall divides by all the item's buyers.
    """
    from towerline.marketing.audience import index_vectors

    index, _ = index_vectors(vv.vectors, vv.log_z)
    emb = vv.bundle.item_embeddings
    ev_all = vv.evidence
    names = ("audience", "model", "affinity", "covisit", "buyers_among_candidates")
    hits = {k: {n: [] for n in sizes} for k in names}
    n_buyers = []
    for item in items:
        buyers = vv.buyers[int(item)]
        eligible = np.ones(len(vv.user_ids), bool)
        eligible[vv.interacted[int(item)]] = False
        excluded = ~eligible
        ev = ev_all.item_evidence(int(item), vv.user_ids)
        n_buyers.append(len(buyers))
        lp = np.where(eligible, vv.vectors @ emb[item] - vv.log_z, -np.inf)
        model = np.argsort(-lp, kind="stable")[: max(sizes)]
        aff = ab.top_users(ev["affinity"], max(sizes), excluded, ev_all.activity, seed)
        cov = ab.top_users(ev["covisit"], max(sizes), excluded, ev_all.activity, seed)
        for n in sizes:
            _, top, cand = learned_audience(scorer, index, vv.vectors, emb[item], vv.log_z, ev, eligible, n)
            for k, rows in (("audience", top), ("model", model[:n]), ("affinity", aff[:n]), ("covisit", cov[:n]),
                            ("buyers_among_candidates", cand)):
                hits[k][n].append(int(np.isin(buyers, rows).sum()))
    nb = np.asarray(n_buyers, np.float64)
    out: dict[str, Any] = {"items": int(len(items)), "buyers": int(nb.sum())}
    for n in sizes:
        row = {k: {"macro": round(float(np.mean(np.asarray(hits[k][n]) / nb)), 4),
                   "micro": round(float(np.sum(hits[k][n]) / nb.sum()), 4)} for k in names}
        best = max(row["affinity"]["macro"], row["covisit"]["macro"])
        row["audience_over_best_heuristic_macro"] = round(row["audience"]["macro"] / best, 3) if best > 0 else None
        out[str(n)] = row
    return out


def fit_scorer(
    bundle: Any,
    *,
    max_items: int = 1500,
    size: int = 500,
    pool: int = 0,
    hard_pool: int = 1000,
    negatives: int = 400,
    rest_negatives: int = 400,
    l2: float = 1e-3,
    hidden: int = 16,
    seed: int = 0,
    params: HeuristicParams | None = None,
    holdout: int = 500,
) -> AudienceScorer:
    """Fit the weights on the validation step of ``bundle``'s own split.

    Args:
        max_items: items with validation buyers to fit on (sampled with ``seed``; 0 = all).
        size: the audience size whose evidence candidates the fit samples its hard negatives from
            (``max(hard_pool, 2 * size)`` per source).
        pool: the scorer's candidates per source when serving; 0 (default) = every eligible user
            (the evidence of every user is computed anyway; the features and the small network
            cost microseconds a user), so no buyer is lost to the candidate step.
        negatives: hard negatives per item (uniform over its evidence candidates, log-corrected);
        rest_negatives: with ``pool`` 0, negatives drawn from the other eligible users (log-corrected).
        l2: ridge penalty on the standardised weights.
        hidden: tanh units beside the linear part (0: linear only), for interactions such as
            "the model's score counts for more when there is no co-visitation evidence".
        holdout: validation items kept out of the fit (at most a fifth of them; 0 = none) on which
            ``validation_report`` measures the fitted scorer at ``REPORT_SIZES``
            (``fitted["validation_recall"]``): the figure to choose settings by, never the test step.
    """
    import torch

    from towerline.marketing.audience import index_vectors, search_rows

    t0 = time.perf_counter()
    params = params or HeuristicParams()
    vv = validation_view(bundle, params)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.asarray(sorted(vv.buyers), np.int64))
    n_held = min(max(holdout, 0), len(perm) // 5)
    held, items = np.sort(perm[:n_held]), perm[n_held:]
    items = np.sort(items[:max_items] if max_items else items)
    fit_k = max(hard_pool, 2 * size)  # the hard stratum: the evidence candidates at the fitted size
    index, _ = index_vectors(vv.vectors, vv.log_z)
    emb = vv.bundle.item_embeddings
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (features (n, F), is_buyer (n,), log correction (n,))
    model_hits = reachable = total = 0
    for item in items:
        eligible = np.ones(len(vv.user_ids), bool)
        eligible[vv.interacted[int(item)]] = False
        buyers = vv.buyers[int(item)]
        buyers = buyers[eligible[buyers]]
        if not len(buyers):
            continue
        total += len(buyers)
        _, model_rows = search_rows(index, np.append(emb[item], 1.0), eligible, fit_k)
        model_hits += int(np.isin(buyers, model_rows[:size]).sum())
        ev = vv.evidence.item_evidence(int(item), vv.user_ids)
        hard = candidates(model_rows, ev, eligible, fit_k)
        # pool > 0 serves the hard candidates alone; pool 0 ranks every eligible user, so the rest
        # is a second stratum with its own sample and log correction (the softmax over all users)
        strata = [(hard, negatives)] if pool else [(hard, negatives), (np.setdiff1d(np.flatnonzero(eligible), hard), rest_negatives)]
        pos = buyers if not pool else buyers[np.isin(buyers, hard)]
        if not len(pos):
            continue
        reachable += len(pos)
        pick, corr = [np.sort(pos)], [np.zeros(len(pos))]
        for stratum, n_neg in strata:
            neg = np.setdiff1d(stratum, buyers)
            take = rng.choice(neg, min(n_neg, len(neg)), replace=False) if len(neg) else neg
            pick.append(take)
            corr.append(np.full(len(take), np.log(len(neg) / max(len(take), 1))))
        rows = np.concatenate(pick)
        x = features(vv.vectors[rows] @ emb[item], vv.log_z, ev, rows)
        groups.append((x, np.arange(len(rows)) < len(pos), np.concatenate(corr)))
    if not groups:
        raise DataValidationError("audience scorer: no validation buyer is among any item's candidates; nothing to fit")

    allx = np.concatenate([g[0] for g in groups])
    mean, scale = allx.mean(axis=0), allx.std(axis=0)
    scale[scale < 1e-9] = 1.0
    n_max = max(len(g[0]) for g in groups)
    G, F = len(groups), len(FEATURES)
    X = np.zeros((G, n_max, F), np.float32)
    Y = np.zeros((G, n_max), np.float32)
    offset = np.full((G, n_max), -np.inf, np.float32)  # padding never wins the softmax
    for g, (x, y, corr) in enumerate(groups):
        X[g, : len(x)] = (x - mean) / scale
        Y[g, : len(x)] = y
        offset[g, : len(x)] = np.where(y, 0.0, corr)  # (n,) per stratum
    Xt, Yt, Ot = torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(offset)
    w = torch.zeros(F, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():  # start at the model alone: log p = dot + neg_log_z
        w[FEATURES.index("dot")] = float(scale[FEATURES.index("dot")])
        w[FEATURES.index("neg_log_z")] = float(scale[FEATURES.index("neg_log_z")])
    gen = torch.Generator().manual_seed(seed)
    W1 = (0.1 * torch.randn(hidden, F, generator=gen)).requires_grad_(True)
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = torch.zeros(hidden, requires_grad=True)  # starts as the linear model
    params_t = [w] + ([W1, b1, w2] if hidden else [])
    opt = torch.optim.LBFGS(params_t, lr=1.0, max_iter=300, line_search_fn="strong_wolfe")
    n_pos = float(Yt.sum())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = Xt @ w + Ot  # (G, n)
        if hidden:
            logits = logits + torch.tanh(Xt @ W1.T + b1) @ w2
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        logp = torch.where(Yt > 0, logits - lse, torch.zeros_like(logits))  # padding is -inf: never times 0
        loss = -logp.sum() / n_pos + l2 * sum((q ** 2).sum() for q in params_t)
        loss.backward()
        return loss

    loss = float(opt.step(closure).detach())
    weights = w.detach().numpy().astype(np.float64)
    mlp = {"hidden_weights": W1.detach().double().numpy().tolist(), "hidden_bias": b1.detach().double().numpy().tolist(),
           "output_weights": w2.detach().double().numpy().tolist()} if hidden else {}
    scorer = AudienceScorer(
        features=list(FEATURES), mean=mean.tolist(), scale=scale.tolist(), weights=weights.tolist(), **mlp,
        heuristics=params, pool=pool, item_embeddings_sha256=bundle.manifest.get("files", {}).get("item_embeddings.npy"),
        fitted={
            "split": "validation", "items_sampled": int(len(items)), "items": int(len(groups)), "buyers": int(total),
            "buyers_among_candidates": int(reachable), "negatives_per_item": negatives,
            "rest_negatives_per_item": rest_negatives if not pool else 0, "hard_pool": hard_pool, "l2": l2, "hidden": hidden, "seed": seed,
            "fit_size": size, "holdout_items": int(len(held)), "loss": loss, "model_recall_at_size": model_hits / max(total, 1),
            "seconds": round(time.perf_counter() - t0, 1), "created_at": int(time.time()),
        },
    )
    log.info("audience scorer fitted on %d validation items (%d buyers, %d among candidates): weights %s",
             len(groups), total, reachable, dict(zip(FEATURES, np.round(weights, 3))))
    if len(held):
        report = validation_report(scorer, vv, held, seed=seed)
        scorer = scorer.model_copy(update={"fitted": {**scorer.fitted, "validation_recall": report,
                                                      "seconds": round(time.perf_counter() - t0, 1)}})
        log.info("validation recall on %d held-out items: %s", len(held), "; ".join(
            f"N={n} audience {report[str(n)]['audience']['macro']:.4f} model {report[str(n)]['model']['macro']:.4f} "
            f"affinity {report[str(n)]['affinity']['macro']:.4f} covisit {report[str(n)]['covisit']['macro']:.4f} "
            f"({report[str(n)]['audience_over_best_heuristic_macro']}x)" for n in REPORT_SIZES))
    return scorer
