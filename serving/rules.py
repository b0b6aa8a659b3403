"""Business rules between the ranker and the response: pure numpy functions, tested without Ray.

Order of work for one request::

    banned = banned_mask(n_items, in_stock=..., blocked=..., seen=..., exclude=...)   # (V,) bool
    idx, scores = select(cand_idx, cand_scores, k, banned, category, max_per_category)
    idx, scores, n_filled = fill_popular(idx, scores, k, popular, banned, category, max_per_category)

Why these rules and not "let the model learn it": a retriever trained on next-item prediction
happily recommends what the user just bought, items the warehouse no longer has, and ten
phones in a row. Those are product decisions that change faster than models are retrained, so
they are applied after ranking, where a config change takes effect on the next request.

Why a category cap is greedy: walking the ranked list once and skipping an item whose category
already has ``max_per_category`` picks keeps the best-scored item of each category, the same
rule most "diversity by slot limit" production systems use; it never reorders what it keeps.

Reserved indices (``PAD_IDX``, ``UNK_IDX``) are banned by ``banned_mask`` unconditionally, and
``select`` also drops FAISS's ``-1`` labels, so no path can serve padding or a missing result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from towerline.features.vocab import N_RESERVED, Vocab

log = logging.getLogger(__name__)

CATEGORY_PREFIX = "category:"


@dataclass(frozen=True)
class ItemFacts:
    """What the rules need to know per item vocabulary index (rows 0/1 are PAD/UNK)."""

    in_stock: np.ndarray  # (V,) bool; items missing from the catalogue count as in stock
    category: np.ndarray  # (V,) int64 index into ``categories``, -1 = no category token
    categories: tuple[str, ...]  # category token values, e.g. "c12"
    popularity: np.ndarray  # (V,) int64 training interactions per item
    popular: np.ndarray  # (P,) item_idx by popularity, most popular first, reserved rows excluded


def category_of(attributes: Iterable[str] | None) -> str | None:
    """The value of the first ``category:<value>`` token, or None."""
    if attributes is None:
        return None
    for token in attributes:
        if isinstance(token, str) and token.startswith(CATEGORY_PREFIX):
            return token[len(CATEGORY_PREFIX) :]
    return None


def item_facts(item_vocab: Vocab, items: pd.DataFrame, popularity: np.ndarray) -> ItemFacts:
    """Per-index stock, category and popularity order from a bundle's catalogue and counts."""
    n = len(item_vocab)
    in_stock = np.ones(n, dtype=bool)
    category = np.full(n, -1, dtype=np.int64)
    names: list[str] = []
    if len(items) and "item_id" in items:
        idx = item_vocab.encode(items["item_id"].astype(str).to_numpy(dtype=object))  # (R,)
        known = idx >= N_RESERVED
        if "in_stock" in items:
            stock = items["in_stock"].fillna(True).to_numpy(dtype=bool)
            in_stock[idx[known]] = stock[known]
        if "attributes" in items:
            cats = [category_of(a) for a in items["attributes"]]
            codes, uniques = pd.factorize(pd.Series(cats, dtype=object), use_na_sentinel=True)
            category[idx[known]] = codes[known]
            names = [str(u) for u in uniques]
    pop = np.zeros(n, dtype=np.int64)
    counts = np.asarray(popularity, dtype=np.int64)[:n]
    pop[: len(counts)] = counts
    order = np.argsort(-pop[N_RESERVED:], kind="stable") + N_RESERVED  # ties keep vocabulary order
    return ItemFacts(in_stock=in_stock, category=category, categories=tuple(names), popularity=pop, popular=order)


def banned_mask(
    n_items: int,
    *,
    in_stock: np.ndarray | None = None,
    blocked: Sequence[int] | np.ndarray = (),
    seen: Sequence[int] | np.ndarray = (),
    exclude: Sequence[int] | np.ndarray = (),
) -> np.ndarray:
    """(V,) bool, True where an item may not be recommended.

    ``blocked``, ``seen`` and ``exclude`` are item indices (out-of-range and reserved ones are
    ignored, so an unknown id encoded as ``UNK_IDX`` bans nothing extra); ``in_stock`` (V,) bans
    items that are False. ``PAD_IDX`` and ``UNK_IDX`` are always banned.
    """
    banned = np.zeros(n_items, dtype=bool)
    banned[:N_RESERVED] = True
    if in_stock is not None:
        banned |= ~np.asarray(in_stock, dtype=bool)[:n_items]
    for group in (blocked, seen, exclude):
        if np.size(group) == 0:  # usually blocked and exclude: no work per request
            continue
        idx = np.asarray(group, dtype=np.int64).ravel()
        idx = idx[(idx >= 0) & (idx < n_items)]
        banned[idx] = True
    return banned


def _take(
    idx: np.ndarray,
    k: int,
    banned: np.ndarray,
    category: np.ndarray | None,
    max_per_category: int | None,
    taken: list[int],
    per_cat: dict[int, int],
) -> list[int]:
    """Positions in ``idx`` to keep, walking in order: not banned, not taken, under the cap."""
    keep: list[int] = []
    chosen = set(taken)
    for pos, item in enumerate(idx.tolist()):
        if len(taken) + len(keep) >= k:
            break
        if item < 0 or item >= len(banned) or banned[item] or item in chosen:
            continue
        if max_per_category is not None and category is not None:
            cat = int(category[item])
            if cat >= 0:
                if per_cat.get(cat, 0) >= max_per_category:
                    continue
                per_cat[cat] = per_cat.get(cat, 0) + 1
        chosen.add(item)
        keep.append(pos)
    return keep


def select(
    cand_idx: np.ndarray,
    cand_scores: np.ndarray,
    k: int,
    banned: np.ndarray,
    category: np.ndarray | None = None,
    max_per_category: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` allowed candidates, best first.

    Args:
        cand_idx: (N,) item indices (``-1`` = no result, dropped).
        cand_scores: (N,) scores, higher is better; need not be sorted.
        banned: (V,) from ``banned_mask``.
        category: (V,) category code per item (``ItemFacts.category``), for the cap.

    Returns:
        ``(item_idx (<=k,) int64, scores (<=k,) float32)``, duplicates removed.
    """
    cand_idx = np.asarray(cand_idx, dtype=np.int64).ravel()
    cand_scores = np.asarray(cand_scores, dtype=np.float32).ravel()
    if cand_idx.shape != cand_scores.shape:
        raise ValueError(f"cand_idx {cand_idx.shape} and cand_scores {cand_scores.shape} must have one shape")
    order = np.argsort(-cand_scores, kind="stable")  # (N,)
    cand_idx, cand_scores = cand_idx[order], cand_scores[order]
    keep = _take(cand_idx, k, banned, category, max_per_category, [], {})
    return cand_idx[keep], cand_scores[keep]


def fill_popular(
    item_idx: np.ndarray,
    scores: np.ndarray,
    k: int,
    popular: np.ndarray,
    banned: np.ndarray,
    category: np.ndarray | None = None,
    max_per_category: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top up a short list with the most popular allowed items; returns ``(idx, scores, n_filled)``.

    Filled items score below everything already in the list (the lowest score minus 1, minus 2,
    ...), so the list stays sorted and a fill never outranks a personal match. Fills respect the
    category cap first; if the cap leaves the list short, it is relaxed for the remainder, because
    a full list of allowed items beats a diverse short one.
    """
    item_idx = np.asarray(item_idx, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if len(item_idx) >= k:
        return item_idx[:k], scores[:k], 0
    taken = item_idx.tolist()
    per_cat: dict[int, int] = {}
    if category is not None and max_per_category is not None:
        for item in taken:
            cat = int(category[item])
            if cat >= 0:
                per_cat[cat] = per_cat.get(cat, 0) + 1
    popular = np.asarray(popular, dtype=np.int64)
    extra = popular[_take(popular, k, banned, category, max_per_category, taken, per_cat)].tolist()
    if len(taken) + len(extra) < k and max_per_category is not None:
        extra += popular[_take(popular, k, banned, None, None, taken + extra, {})].tolist()
    floor = float(scores.min()) if len(scores) else 0.0
    fill_scores = floor - np.arange(1, len(extra) + 1, dtype=np.float32)
    return (
        np.concatenate([item_idx, np.asarray(extra, dtype=np.int64)]),
        np.concatenate([scores, fill_scores]).astype(np.float32),
        len(extra),
    )
