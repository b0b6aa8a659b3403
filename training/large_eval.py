"""Full-catalogue evaluation for catalogues too big for a dense users x items score matrix.

``training/evaluate.py`` scores a batch of users against every item as one (B, V) tensor: at a
million items that is 4 GB for 1,000 users. Here the item vectors go into an exact FAISS
inner-product index (``IndexFlatIP``: the same scores, every item visited, nothing approximated)
and each batch of users asks it for its top items, so memory is (B, k') rather than (B, V).

User vectors come from ``inference.user_vectors``, the one path serving and ``evaluate.py`` use.
History masking stays exact: a user whose history holds h distinct items has at least K non-history
items among its top K + h, so each batch searches ``K + longest history in the batch`` and drops
the history items (the target itself stays, as ``metrics.py`` rules); users are batched in order of
history length so k' stays small. What differs from ``evaluate.py``: only the top ``max(ks)`` are
known, so MRR is reported cut at that depth (``mrr_<K>``), and equal scores are ordered by FAISS
(``metrics.py`` counts ties pessimistically; with float scores ties are rare).
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np
import torch

from towerline.features.sequences import Sequences, left_padded_windows
from towerline.features.splits import EvalTargets
from towerline.features.vocab import N_RESERVED
from towerline.training import inference
from towerline.training.model import TwoTowerNet

log = logging.getLogger(__name__)


@torch.no_grad()
def item_matrix(net: TwoTowerNet, chunk: int = 65_536) -> np.ndarray:
    """(V - N_RESERVED, D) float32 vectors of the real items, computed ``chunk`` items at a time
    (row r is item index r + N_RESERVED)."""
    device = next(net.parameters()).device
    rows = []
    for lo in range(N_RESERVED, net.n_items, chunk):
        ids = torch.arange(lo, min(lo + chunk, net.n_items), device=device)
        rows.append(net.item_tower(ids).float().cpu().numpy())
    return np.ascontiguousarray(np.concatenate(rows) if rows else np.zeros((0, 1), np.float32), dtype=np.float32)


@torch.no_grad()
def evaluate_with_faiss(
    net: TwoTowerNet,
    full: Sequences,
    targets: EvalTargets,
    prefix: str = "test",
    ks: tuple[int, ...] = (5, 10, 20),
    batch_size: int = 1024,
    max_users: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR@max(K) and coverage@10, history masked (``<prefix>/``) and not
    (``<prefix>_unmasked/``), over all real items by exact FAISS search.

    Args:
        net: the trained network (eval mode is set and restored).
        full, targets: the split's full sequences and the evaluated targets.
        max_users: evaluate a seeded random sample of this many users (None: all).

    Returns:
        ``{"test/ndcg_10": ..., "test_unmasked/hr_20": ..., "test/users": n, "test/seconds": s}``.
    """
    t0 = time.perf_counter()
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    real = item_matrix(net)  # (V - 2, D)
    index = faiss.IndexFlatIP(net.cfg.dim)
    index.add(real)
    n_real = index.ntotal
    reserved = net.item_tower(torch.arange(N_RESERVED, device=device)).float()  # (2, D)
    table = torch.cat([reserved, torch.from_numpy(real).to(device)])  # (V, D): what inference.user_vectors reads

    order = np.arange(len(targets))
    if max_users is not None and max_users < len(order):
        order = np.sort(np.random.default_rng(seed).choice(len(order), max_users, replace=False))
    starts = full.offsets[:-1][targets.rows[order]]
    ends = targets.history_end[order]
    order = order[np.argsort(ends - starts, kind="stable")]  # short histories together: small k'
    starts = full.offsets[:-1][targets.rows[order]]
    ends = targets.history_end[order]
    k_max = max(ks)
    hits = {name: {k: 0.0 for k in ks} for name in ("masked", "unmasked")}
    dcg = {name: {k: 0.0 for k in ks} for name in ("masked", "unmasked")}
    rr = {"masked": 0.0, "unmasked": 0.0}
    seen = {"masked": np.zeros(n_real, dtype=bool), "unmasked": np.zeros(n_real, dtype=bool)}

    for lo in range(0, len(order), batch_size):
        s, e = starts[lo : lo + batch_size], ends[lo : lo + batch_size]
        tgt = targets.targets[order[lo : lo + batch_size]]
        items = torch.from_numpy(left_padded_windows(full.item_idx, s, e, net.cfg.max_len)).to(device)
        types = torch.from_numpy(left_padded_windows(full.event_type_idx, s, e, net.cfg.max_len)).to(device)
        ts = torch.from_numpy(left_padded_windows(full.timestamp.astype(np.int64), s, e, net.cfg.max_len)).to(device)
        users = np.ascontiguousarray(inference.user_vectors(net, items, types, table, ts).float().cpu().numpy())  # (B, D)
        depth = min(n_real, k_max + int((e - s).max(initial=0)))
        _, found = index.search(users, depth)  # (B, depth) row numbers, -1 when fewer items exist
        found = np.where(found >= 0, found + N_RESERVED, -1)  # -> item indices
        for b in range(len(users)):
            history = full.item_idx[s[b] : e[b]]
            for name, row in (("unmasked", found[b]), ("masked", _drop(found[b], history, tgt[b]))):
                top = row[:k_max]
                top10 = top[:10]
                seen[name][top10[top10 >= N_RESERVED] - N_RESERVED] = True
                if tgt[b] < N_RESERVED:
                    continue  # PAD/UNK target: a miss
                where = np.flatnonzero(top == tgt[b])
                if not len(where):
                    continue
                rank = int(where[0])
                rr[name] += 1.0 / (rank + 1)
                for k in ks:
                    if rank < k:
                        hits[name][k] += 1
                        dcg[name][k] += 1.0 / math.log2(rank + 2)
    net.train(was_training)

    n = max(len(order), 1)
    out: dict[str, float] = {}
    for name, key in (("masked", prefix), ("unmasked", f"{prefix}_unmasked")):
        for k in ks:
            out[f"{key}/hr_{k}"] = hits[name][k] / n
            out[f"{key}/ndcg_{k}"] = dcg[name][k] / n
        out[f"{key}/mrr_{k_max}"] = rr[name] / n
        out[f"{key}/coverage_10"] = float(seen[name].sum()) / max(n_real, 1)
    out[f"{prefix}/users"] = float(len(order))
    out[f"{prefix}/seconds"] = time.perf_counter() - t0
    log.info("faiss evaluation of %d users over %d items in %.1f s: ndcg_10 %.4f", len(order), n_real,
             out[f"{prefix}/seconds"], out.get(f"{prefix}/ndcg_10", float("nan")))
    return out


def _drop(row: np.ndarray, history: np.ndarray, target: int) -> np.ndarray:
    """``row`` without the history's items (the target stays, as ``metrics.mask_scores`` keeps it)."""
    banned = np.setdiff1d(history, [target])
    return row[~np.isin(row, banned) & (row >= 0)]
