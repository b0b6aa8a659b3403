"""The audiences a marketer builds without a model: the baselines ``find_audience`` has to beat.

"Who should get the mail about item X?" Without a model a marketer would pick:

* **category/brand affinity**: users who recently viewed or bought in X's category or brand. Each
  of a user's last ``recent`` items adds ``0.5 ** (steps back / half_life)`` to every attribute token
  it carries; a user's score for X is the weight of X's tokens in their profile (the "interested in
  skincare" segment every CRM tool offers, ranked by how recently and how often);
* **co-visitation**: users whose recent items are often seen together with X. Item-to-item
  co-occurrence counts within ``window`` steps of the same user's sequence (the "customers who
  viewed this also viewed" table of Linden, Smith & York, "Amazon.com recommendations: item-to-item
  collaborative filtering", IEEE Internet Computing 2003), normalised by popularity (cosine:
  ``c_ij / sqrt(n_i n_j)``) so best-sellers do not co-occur with everything; a user's score for X is
  the recency-weighted sum over their recent items j of ``cos(j, X)``.

Both are sparse linear algebra: a user x item recency matrix ``W`` (U, I), an item x token matrix
``A`` (I, T) and an item x item co-visitation matrix ``C`` (I, I); one target item costs one sparse
matrix-vector product. Ties (most users score 0 for a niche item) break by activity, then at
random (seeded): the "most active users" list fills what the heuristic leaves.

Inputs are CSR-style arrays (``offsets`` (U+1,), ``item_idx`` (E,) in time order per user), so the
functions run on ``features.sequences.Sequences`` and on any hand-built log.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


def recency_matrix(offsets: np.ndarray, item_idx: np.ndarray, n_items: int, recent: int = 20,
                   half_life: float = 10.0) -> sp.csr_matrix:
    """(U, I) weights: a user's last ``recent`` items, each ``0.5 ** (steps back / half_life)`` (newest = 1).

    Repeated items add up. Steps stand for time because the S3Rec files have no clock; with a clock
    the same weight over days would do.
    """
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    U = len(lengths)
    rows = np.repeat(np.arange(U), lengths)  # (E,)
    back = np.repeat(offsets[1:], lengths) - 1 - np.arange(offsets[-1])  # steps before the user's newest event
    keep = back < recent
    w = 0.5 ** (back[keep] / half_life)
    return sp.csr_matrix((w, (rows[keep], np.asarray(item_idx)[keep])), shape=(U, n_items))


def attribute_matrix(item_attributes: Sequence[Sequence[str]], prefixes: Sequence[str] | None = None,
                     idf: bool = False) -> tuple[sp.csr_matrix, list[str]]:
    """(I, T) item x token matrix and the token names; ``prefixes`` keeps only e.g. ``category:``/``brand:``.

    Entries are 1, or with ``idf`` the token's inverse document frequency ``log(I / items with it)``:
    in catalogues whose tokens are unnamed (the S3Rec files' ``attr:17``) the top-level category
    that half the items share would otherwise outweigh the brand; idf is how a marketer's "same
    brand or sub-category" is told from "same shop".
    """
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, attrs in enumerate(item_attributes):
        for tok in attrs if attrs is not None else ():
            tok = str(tok)
            if prefixes and not any(tok.startswith(p) for p in prefixes):
                continue
            rows.append(i)
            cols.append(vocab.setdefault(tok, len(vocab)))
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(item_attributes), len(vocab)))
    m.data[:] = 1.0  # an item listing a token twice still carries it once
    if idf and m.shape[1]:
        df = np.asarray((m > 0).sum(axis=0)).ravel()
        m = (m @ sp.diags(np.log(m.shape[0] / np.maximum(df, 1)))).tocsr()
    return m, list(vocab)


def covisitation_matrix(offsets: np.ndarray, item_idx: np.ndarray, n_items: int, window: int = 3,
                        normalise: bool = True, directed: bool = False) -> sp.csr_matrix:
    """(I, I) symmetric co-visitation: pairs of items within ``window`` steps in one user's sequence.

    ``normalise`` divides by ``sqrt(n_i n_j)`` (item occurrence counts): cosine similarity of the
    items' co-occurrence, so a best-seller is not everyone's neighbour. The diagonal is zero.
    ``directed`` counts only ``j`` after ``i`` in ``[i, j]`` ("bought i, then j"): the direction
    a next-purchase campaign asks about.
    """
    offsets = np.asarray(offsets, np.int64)
    items = np.asarray(item_idx, np.int64)
    user_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    r, c = [], []
    for d in range(1, window + 1):
        same = user_of[d:] == user_of[:-d]
        a, b = items[:-d][same], items[d:][same]
        diff = a != b
        r += [a[diff]] if directed else [a[diff], b[diff]]
        c += [b[diff]] if directed else [b[diff], a[diff]]
    rows, cols = np.concatenate(r) if r else np.zeros(0, np.int64), np.concatenate(c) if c else np.zeros(0, np.int64)
    C = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_items, n_items))
    C.sum_duplicates()
    if normalise:
        n = np.bincount(items, minlength=n_items).astype(np.float64)
        inv = 1.0 / np.sqrt(np.maximum(n, 1.0))
        C = sp.diags(inv) @ C @ sp.diags(inv)
    return C.tocsc()  # columns are read per target item


def affinity_scores(W: sp.csr_matrix, A: sp.csr_matrix, item: int, user_tokens: sp.csr_matrix | None = None) -> np.ndarray:
    """(U,) category/brand affinity of every user for ``item``: recency weight of the item's tokens.

    Pass ``user_tokens = W @ A`` when scoring many items (computed once).
    """
    UT = user_tokens if user_tokens is not None else (W @ A).tocsr()
    return np.asarray(UT @ A[item].T.toarray()).ravel()


def covisitation_scores(W: sp.csr_matrix, C: sp.csc_matrix, item: int) -> np.ndarray:
    """(U,) co-visitation score of every user for ``item``: recency-weighted similarity of their items to it."""
    return np.asarray(W @ C[:, item].toarray()).ravel()


def top_users(scores: np.ndarray, size: int, exclude: np.ndarray | None = None, activity: np.ndarray | None = None,
              seed: int = 0) -> np.ndarray:
    """(size,) user rows by descending score; ties by activity, then at random; ``exclude`` (U,) bool never chosen."""
    scores = np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    keys = [rng.random(len(scores))]
    if activity is not None:
        keys.append(-np.asarray(activity, np.float64))
    keys.append(-scores)
    order = np.lexsort(keys)  # last key is primary
    if exclude is not None:
        order = order[~np.asarray(exclude, bool)[order]]
    return order[:size]
