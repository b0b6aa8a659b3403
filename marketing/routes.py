"""The marketing endpoints the service mounts: profiles, segments, audiences, A/B feedback.

``MarketingService`` holds what those endpoints need (the experiments and the active one, the
feedback store, the loaded profiles, user vectors cached per model version); ``marketing_router``
turns it into a FastAPI ``APIRouter`` that the serving ingress includes. The model version an
audience is computed with is whatever the ingress serves at that moment, so the router asks for it
through a callable instead of holding a bundle.

No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at runtime, and
the ingress that includes this router is shipped to its replica by value.
"""

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import numpy as np
from fastapi import APIRouter, Body, Path as PathParam
from starlette.exceptions import HTTPException

from towerline.training.bundle import Bundle
from towerline.config import ArmConfig, ExperimentConfig, ProfileConfig
from towerline.errors import TowerlineError
from towerline.marketing.assignment import assign_arm, find_experiment
from towerline.marketing.audience import AudienceRequest, AudienceResponse, audience_response, log_partition, user_vectors
from towerline.marketing.audience_scorer import Evidence, load_scorer
from towerline.marketing.feedback import Feedback, FeedbackResult, FeedbackStore, record_feedback
from towerline.marketing.profiles import UserProfile, load_profiles, profile_of, profile_thresholds, segment_definitions, segment_summary
from towerline.problems import problem, validate_and_store
from towerline.text import Text

log = logging.getLogger(__name__)

NO_PROFILES = "no profiles are loaded; start the service with profiles from `towerline profile`"


class MarketingService:
    """Profiles, segments, audiences, A/B arms and feedback behind the service's marketing endpoints."""

    def __init__(
        self,
        experiments: Sequence[ExperimentConfig],
        experiment: Optional[str],
        feedback_db: str | Path,
        profiles: Optional[str | Path] = None,
    ) -> None:
        self.experiments = list(experiments)
        self.active = find_experiment(self.experiments, experiment) if experiment else None
        self.feedback = FeedbackStore(feedback_db)
        self.profiles = load_profiles(profiles) if profiles else None
        self._vectors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, Evidence | None]] = {}

    def arms_with_models(self) -> list[ArmConfig]:
        """Arms of the active experiment that serve their own model version."""
        return [a for a in (self.active.arms if self.active else ()) if a.model]

    def arm_of(self, user_id: str) -> Optional[ArmConfig]:
        """The user's arm in the active experiment (stable hash), None without an experiment."""
        if self.active is None:
            return None
        name = assign_arm(self.active, user_id)
        return next(a for a in self.active.arms if a.name == name)

    def profile(self, user_id: str) -> UserProfile:
        found = profile_of(self.profiles, user_id) if self.profiles is not None else None
        if found is None:
            detail = NO_PROFILES if self.profiles is None else f"no profile for user {user_id!r} (unknown, or no consent)"
            raise HTTPException(404, detail)
        return found

    def segments(self) -> dict[str, Any]:
        """Sizes and definitions, with the thresholds the loaded profiles were built with."""
        if self.profiles is None:
            return {"definitions": segment_definitions(ProfileConfig()), "sizes": None, "note": NO_PROFILES}
        return segment_summary(self.profiles, profile_thresholds(self.profiles))

    def audience(self, bundle: Bundle, req: AudienceRequest) -> AudienceResponse:
        if req.item_id is not None and req.item_id not in bundle.vocabs.items:
            raise HTTPException(404, f"item {req.item_id!r} is not in the model's catalogue")
        key = str(bundle.path)
        if key not in self._vectors:
            ids, vecs = user_vectors(bundle)
            scorer = load_scorer(bundle)  # the learned scorer's evidence, when the bundle has one
            evidence = Evidence.from_bundle(bundle, params=scorer.heuristics) if scorer is not None else None
            self._vectors = {key: (ids, vecs, log_partition(bundle, vecs), evidence)}  # one model version cached
        ids, vecs, log_z, evidence = self._vectors[key]
        try:
            return audience_response(bundle, vecs, ids, req, self.profiles, log_z, evidence)
        except TowerlineError as e:  # e.g. a segment nobody is in, attributes no item carries
            raise HTTPException(422, str(e)) from None

    def record(self, events: list[Feedback]) -> FeedbackResult:
        return record_feedback(self.feedback, events, self.experiments) if events else FeedbackResult()


def batch_openapi(item: str, max_items: int, example: list[dict[str, Any]]) -> dict[str, Any]:
    """``openapi_extra`` documenting a batch body as ``item`` objects (a components schema) while the
    endpoint takes a plain list and validates row by row, so that one bad row rejects only itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}, "maxItems": max_items},
        "examples": {"batch": {"summary": "a small batch", "value": example}},
    }}}}


def batch_too_large(n: int, max_batch: int, what: str) -> Any:
    """413 for a batch with more records than ``max_batch``; the problem body says the limit."""
    return problem(413, "Content Too Large", f"a batch of {n} {what} exceeds the limit of {max_batch} per request; "
                   "send smaller batches", limit=max_batch)


FEEDBACK_EXAMPLE = [
    {"experiment": "home-feed", "user_id": "u000001", "item_id": "i00042", "kind": "impression", "event_id": "imp-1"},
    {"experiment": "home-feed", "arm": "treatment", "user_id": "u000001", "item_id": "i00042", "kind": "purchase",
     "value": 19.9, "timestamp": "2024-05-01T12:00:00Z", "event_id": "buy-1"},
]


def marketing_router(
    service: MarketingService,
    current_bundle: Callable[[], Bundle],
    *,
    read: Sequence[Any] = (),
    write: Sequence[Any] = (),
    max_batch: int = 10_000,
) -> APIRouter:
    """``GET /users/{id}/profile``, ``GET /segments``, ``POST /audiences``, ``POST /feedback``.

    ``read`` and ``write`` are the FastAPI dependencies (``Depends(...)``) the service puts before
    reads and writes (the bearer token, ``serving.auth``); ``max_batch`` caps a feedback batch.
    """
    router = APIRouter(tags=["marketing"])

    @router.get("/users/{user_id}/profile", response_model=UserProfile, dependencies=list(read),
                summary="A user's marketing profile",
                description="RFM scores and groups, lifecycle segment, interest tags and cluster of one user "
                            "(from `towerline profile`); 404 for an unknown user or one without consent.")
    async def profile(user_id: Annotated[Text, PathParam(min_length=1, max_length=256, examples=["u000001"])]) -> Any:
        return service.profile(user_id)

    @router.get("/segments", dependencies=list(read), summary="Lifecycle segments: definitions and sizes",
                description="How each lifecycle segment is defined (the thresholds the profiles were built with) "
                            "and how many users each holds.")
    async def segments() -> Any:
        return service.segments()

    @router.post("/audiences", response_model=AudienceResponse, dependencies=list(write),
                 summary="The users most likely to buy an item next",
                 description="Searches the user vectors with an item's vector (or the mean of items carrying the "
                             "attributes); past buyers and users without consent are left out. Needs the API token.")
    async def audiences(req: AudienceRequest) -> Any:
        return await asyncio.to_thread(service.audience, current_bundle(), req)

    @router.post("/feedback", dependencies=list(write), summary="Record A/B impressions, clicks and purchases",
                 description="A batch (at most max_batch records) of feedback per experiment arm, idempotent on "
                             "event_id; each record is validated on its own, so bad ones are rejected (summarised "
                             "by reason) and the rest stored. Needs the API token.",
                 openapi_extra=batch_openapi("Feedback", max_batch, FEEDBACK_EXAMPLE))
    async def feedback(body: list[Any] = Body(...)) -> Any:
        if len(body) > max_batch:
            return batch_too_large(len(body), max_batch, "feedback records")
        return (await validate_and_store(body, Feedback, service.record, "feedback")).as_response()

    return router
