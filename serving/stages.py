"""The two ways the Serve ingress runs a request's model stages, behind ``recommender.Stages``.

- ``BatchedStages`` (``stage_placement="ingress"``, the one-machine default): ``retrieve`` and
  ``rank`` batched with ``serve.batch`` inside the ingress replica; no actor hop, which on a few
  cores costs as much CPU as the model itself (``bench/serve_load.py``).
- ``HandleStages`` (``stage_placement="deployments"``): each call goes to the ``Retriever`` or
  ``Ranker`` deployment, which batch on their side and scale out by replicas.

Both end in ``recommender.retrieve`` / ``recommender.rank`` over the request's own model version,
and those compute each request independently of its batch (``training/inference.py``), so the
choice changes where the work runs, never an answer. ``Recommender`` holds the request sequence.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from towerline.serving import recommender as rec
from towerline.serving.settings import ServeSettings

log = logging.getLogger(__name__)


def _by_version(states: list[rec.ModelState]) -> dict[str, list[int]]:
    """Positions of a batch grouped by model version (almost always one group)."""
    groups: dict[str, list[int]] = {}
    for pos, state in enumerate(states):
        groups.setdefault(state.key, []).append(pos)
    return groups


class BatchedStages:
    """Both stages in this process, concurrent requests batched into one call per version."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        for method, size in ((self._retrieve, settings.retriever_batch_size), (self._rank, settings.ranker_batch_size)):
            method.set_max_batch_size(size)
            method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def retrieve(self, state: rec.ModelState, history: rec.UserHistory) -> rec.Candidates:
        return await self._retrieve((state, history))

    async def rank(self, state: rec.ModelState, history: rec.UserHistory, candidates: rec.Candidates) -> rec.Candidates:
        return await self._rank((state, history, candidates))

    async def prepare(self, state: rec.ModelState) -> None:
        """Nothing to warm: the ingress loaded ``state`` itself."""

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _retrieve(self, requests: list[tuple[rec.ModelState, rec.UserHistory]]) -> list[rec.Candidates]:
        out: list[Any] = [None] * len(requests)
        for positions in _by_version([r[0] for r in requests]).values():
            state = requests[positions[0]][0]
            for p, cands in zip(positions, rec.retrieve(state, self.settings, [requests[p][1] for p in positions])):
                out[p] = cands
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _rank(
        self, requests: list[tuple[rec.ModelState, rec.UserHistory, rec.Candidates]]
    ) -> list[rec.Candidates]:
        out: list[Any] = [None] * len(requests)
        for positions in _by_version([r[0] for r in requests]).values():
            state = requests[positions[0]][0]
            ranked = rec.rank(state, [requests[p][1] for p in positions], [requests[p][2] for p in positions])
            for p, r in zip(positions, ranked):
                out[p] = r
        return out


class HandleStages:
    """Each stage call goes to its deployment with the version's ``ModelState.ref``; a replica loads
    a version it lacks on demand (``app._Versions``)."""

    def __init__(self, retriever: Any, ranker: Any | None) -> None:
        self.retriever = retriever
        self.ranker = ranker

    async def retrieve(self, state: rec.ModelState, history: rec.UserHistory) -> rec.Candidates:
        return await self.retriever.top_n.remote((state.ref, history))

    async def rank(self, state: rec.ModelState, history: rec.UserHistory, candidates: rec.Candidates) -> rec.Candidates:
        if self.ranker is None:  # rank_stage="never": the Ranker deployment is not part of the app
            return candidates
        return await self.ranker.rank.remote((state.ref, history, candidates))

    async def prepare(self, state: rec.ModelState) -> None:
        """Load ``state``'s version in the stage replicas before the ingress swaps to it (reload)."""
        await self.retriever.prepare.remote(state.ref)
        if self.ranker is not None:
            await self.ranker.prepare.remote(state.ref)
