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
from typing import Any, Callable, Optional, Sequence

import numpy as np
from fastapi import APIRouter, Body
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from towerline.training.bundle import Bundle
from towerline.config import ArmConfig, ExperimentConfig, ProfileConfig
from towerline.errors import TowerlineError
from towerline.marketing.assignment import assign_arm, find_experiment
from towerline.marketing.audience import AudienceRequest, AudienceResponse, audience_response, log_partition, user_vectors
from towerline.marketing.feedback import Feedback, FeedbackResult, FeedbackStore, record_feedback
from towerline.marketing.profiles import UserProfile, load_profiles, profile_of, profile_thresholds, segment_definitions, segment_summary
from towerline.problems import record_problems

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
        self._vectors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

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
            self._vectors = {key: (ids, vecs, log_partition(bundle, vecs))}  # one model version cached
        ids, vecs, log_z = self._vectors[key]
        try:
            return audience_response(bundle, vecs, ids, req, self.profiles, log_z)
        except TowerlineError as e:  # e.g. a segment nobody is in, attributes no item carries
            raise HTTPException(422, str(e)) from None

    def record(self, events: list[Feedback]) -> FeedbackResult:
        return record_feedback(self.feedback, events, self.experiments) if events else FeedbackResult()


def marketing_router(service: MarketingService, current_bundle: Callable[[], Bundle]) -> APIRouter:
    """``GET /users/{id}/profile``, ``GET /segments``, ``POST /audiences``, ``POST /feedback``."""
    router = APIRouter()

    @router.get("/users/{user_id}/profile", response_model=UserProfile)
    async def profile(user_id: str) -> Any:
        return service.profile(user_id)

    @router.get("/segments")
    async def segments() -> Any:
        return service.segments()

    @router.post("/audiences", response_model=AudienceResponse)
    async def audiences(req: AudienceRequest) -> Any:
        return await asyncio.to_thread(service.audience, current_bundle(), req)

    @router.post("/feedback")
    async def feedback(body: list[dict[str, Any]] = Body(..., max_length=100_000)) -> Any:
        valid: list[Feedback] = []
        rejected: list[str] = []
        for pos, raw in enumerate(body):
            try:
                valid.append(Feedback.model_validate(raw))
            except ValidationError as e:
                rejected.append(record_problems(pos, e))
        result = await asyncio.to_thread(service.record, valid)
        return {"accepted": result.accepted, "duplicate": result.duplicate, "rejected": rejected + result.rejected}

    return router
