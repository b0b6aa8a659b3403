"""The serving path run offline: what the business rules cost against the evaluation protocol.

``towerline evaluate --rules serving`` answers "how much NDCG@10 do the serving rules give up?".
Both numbers come from the same test users and the same inference functions
(``training/inference.py``):

- **protocol**: retrieve -> rank (or retrieval alone without a ranker) ranked as the published
  leave-one-out protocol ranks: history masked except the target itself, no other rule;
- **serving rules**: each user's history before the target goes through ``Recommender.answer`` --
  the code ``/recommend`` runs -- with the given ``ServeSettings`` (stock, blocked items, category
  cap, consent, popular fill), and the target's position in the served top 10 gives the gain.

The difference is the price of the rules (mostly: a repeat purchase of a seen item can never be
served). ``served_top_k`` is also the offline half of the parity checks (``bench/parity.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from towerline.features.sequences import Sequences
from towerline.features.splits import EvalTargets
from towerline.serving import recommender as rec
from towerline.serving.history import HistoryEvent
from towerline.serving.settings import ServeSettings
from towerline.training import inference
from towerline.training.evaluate import bundle_split, evaluate_pipeline, evaluate_targets

log = logging.getLogger(__name__)

K = 10


class _NoOnlineHistory:
    """A history store with no events: offline, a user's history is exactly the given steps."""

    def recent(self, user_id: str, limit: int) -> list[HistoryEvent]:
        return []


def histories_before(seqs: Sequences, targets: EvalTargets) -> list[rec.UserHistory]:
    """Each evaluated user's steps before the target, as a request's history."""
    out = []
    for row, end in zip(np.asarray(targets.rows), np.asarray(targets.history_end)):
        lo = int(seqs.offsets[row])
        out.append(rec.UserHistory(seqs.item_idx[lo:end].astype(np.int64), seqs.event_type_idx[lo:end].astype(np.int64),
                                   seqs.timestamp[lo:end].astype(np.int64), int(seqs.user_idx[row])))
    return out


def served_top_k(
    state: rec.ModelState, settings: ServeSettings, user_ids: Sequence[str], histories: Sequence[rec.UserHistory],
    k: int = K, progress: bool = False,
) -> list[rec.RecommendResult]:
    """``Recommender.answer`` -- the request path of ``/recommend`` -- for every (user, history), with
    in-process stages one request at a time (``serve.batch`` needs a Serve replica; answers do not
    depend on batching anyway)."""
    recommender = rec.Recommender(state, settings, _NoOnlineHistory())  # type: ignore[arg-type]
    return [rec.run_inline(recommender.answer(state, u, h, k))
            for u, h in tqdm(list(zip(user_ids, histories)), desc="serve", disable=not progress, leave=False)]


def ndcg_of_lists(lists: Sequence[Sequence[int]], targets: np.ndarray, k: int = K) -> float:
    """Mean NDCG@k of one relevant item per user from served lists (a miss scores 0)."""
    gains = []
    for items, t in zip(lists, targets):
        hit = np.flatnonzero(np.asarray(items[:k]) == t)
        gains.append(1.0 / np.log2(hit[0] + 2.0) if len(hit) else 0.0)
    return float(np.mean(gains)) if gains else 0.0


def evaluate_serving_rules(
    uri: str, settings: ServeSettings = ServeSettings(), data_overrides: list[str] | None = None,
    max_users: int | None = None, batch_size: int = 256, progress: bool = True,
) -> dict[str, Any]:
    """NDCG@10 of the test users under the evaluation protocol and through the serving rules."""
    state = rec.load_model(uri, settings)
    bundle = state.bundle
    _, split = bundle_split(bundle, data_overrides)
    targets = split.test
    if max_users is not None and max_users < len(targets.rows):
        keep = np.arange(max_users)
        targets = EvalTargets(**{f: np.asarray(getattr(targets, f))[keep] for f in targets.__dataclass_fields__})
    if state.ranker is not None:
        protocol = evaluate_pipeline(bundle, split.full, targets, "test", batch_size, progress)["test/pipeline_ndcg_10"]
        stage = f"retrieve {state.n_candidates} -> rank"
    else:
        protocol = evaluate_targets(bundle.net, split.full, targets, "test", batch_size, progress)["test/ndcg_10"]
        stage = "retrieval"
    histories = histories_before(split.full, targets)
    users = [str(u) for u in bundle.vocabs.users.decode(split.full.user_idx[np.asarray(targets.rows)])]
    results = served_top_k(state, settings, users, histories, K, progress)
    lists = [bundle.vocabs.items.encode(np.asarray([i for i, _ in r.items], dtype=object)) for r in results]
    served = ndcg_of_lists(lists, np.asarray(targets.targets))
    log.info("NDCG@10 protocol %.4f, serving rules %.4f (%d users)", protocol, served, len(lists))
    return {
        "model": uri,
        "model_version": bundle.model_version,
        "dataset": bundle.config.data.name,
        "stage": stage,
        "users": len(lists),
        "fallback_users": int(sum(r.fallback for r in results)),
        "protocol_ndcg_10": protocol,
        "serving_rules_ndcg_10": served,
        "difference_ndcg_10": served - protocol,
        "settings": settings.model_dump(mode="json"),
    }


def offline_top_k(state: rec.ModelState, histories: Sequence[rec.UserHistory], k: int = K) -> list[np.ndarray]:
    """The offline pipeline's top-k item indices per history, straight from ``inference`` (no rules,
    history masked): retrieve the ranker's list, rank it, best k. The reference the served answers
    must equal when the rules are set to the evaluation's."""
    hist = rec.histories_of(histories)
    net, table = state.bundle.net, state.item_table
    cand, scores = inference.retrieve(net, table, hist, state.n_candidates)  # (B, N) each
    if state.ranker is not None:
        scores = inference.rank(state.ranker, hist, cand, scores)
    return [inference.top_k(cand[b], scores[b], k)[0] for b in range(len(histories))]


def evaluation_settings(**overrides: Any) -> ServeSettings:
    """Serving settings whose rules are the evaluation protocol's: history masked, nothing else
    (no category cap, no stock or block filter)."""
    values: dict[str, Any] = {"exclude_seen": True, "max_per_category": None, "blocked_items": (), "drop_out_of_stock": False}
    return ServeSettings(**{**values, **overrides})
