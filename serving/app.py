"""The Ray Serve application: a FastAPI ingress in front of a batched retriever and a batched ranker.

::

    HTTP ──► Ingress (FastAPI) ── history store, rules, popular fallback, /similar, /events, reload
                 │ Recommender.recommend_async: prepare -> stages.retrieve -> stages.rank -> rules
                 ├──► BatchedStages   in the ingress replica (stage_placement="ingress", the default)
                 └──► HandleStages    ──► Retriever  user tower + top-N       (@serve.batch)
                                      ──► Ranker     score the N candidates   (@serve.batch)

The request sequence is ``recommender.Recommender``'s, written once; this module only decides where
its two model stages run (``serving/stages.py``). On one machine the default, ``"ingress"``, batches
them inside the ingress replica: on a few cores every actor hop costs as much CPU as the model
itself, and ``bench/serve_load.py`` measures the difference. ``"deployments"`` sends each request to
the ``Retriever`` and ``Ranker`` deployments, which then scale out by replicas across a cluster;
only then are they part of the application graph (the Ranker not at all with ``rank_stage="never"``).
Whether a version ranks is decided when it loads (``ModelState``), in every replica alike.

Model versions and reload: a request reads the current ``ModelState`` once and sends its ``ref`` (a
URI that pins the version, plus the index directory) with every stage call. A stage replica keeps
the few versions it was asked for, loading a missing one on demand, so ``POST /admin/reload`` can
load the new version in the ingress and warm the stages, then swap one reference: requests in
flight finish on the version they started with, and a version that fails to load (missing file,
corrupt index) never replaces the one serving. Admin writes reach every ingress replica: the one
that got the call publishes what it now serves to the app's ``AdminState`` deployment, and the
others (and replicas started later) follow it (``serving/admin_state.py``); the answer says how
many replicas applied it.

Errors follow RFC 9457 (``application/problem+json``): invalid JSON or fields 422 naming the field,
k out of range 422, bodies over ``max_body_bytes`` 413, a non-JSON content type 415, an unknown item
404, a model that fails to load on reload 409. Bad input never reaches a 500.
"""

# No ``from __future__ import annotations`` here, unlike the rest of Towerline: FastAPI reads the
# endpoint annotations at runtime, and Ray ships the ingress class to its replica by value
# (cloudpickle), where string annotations such as "RecommendRequest" can no longer be resolved.
import asyncio
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
from fastapi import Body, Depends, FastAPI, Path as PathParam, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException

from towerline.config import ExperimentConfig, from_dict
from towerline.errors import BundleError, IndexMismatchError, TowerlineError
from towerline.features.contracts import Event
from towerline.marketing.feedback import Feedback
from towerline.marketing.routes import MarketingService, batch_openapi, batch_too_large, marketing_router
from towerline.problems import PROBLEM, problem, validate_and_store  # noqa: F401  (PROBLEM, problem: the names app.py exported)
from towerline.serving import recommender as rec
from towerline.serving.admin import BadSource, TempCopies, allowed_source, default_models_root
from towerline.serving.admin_state import AdminState, AdminStateUnavailable, Desired, Follower
from towerline.serving.campaign_triggers import CampaignTriggers
from towerline.serving.auth import TOKEN_ENV, check_exposure, token_dependency
from towerline.serving.docs import install_docs, install_openapi, problems
from towerline.serving.errors import HttpGuard, install_error_handlers
from towerline.serving.admin_items import admin_items_router
from towerline.serving.history import open_history_store
from towerline.serving.http_models import (
    BatchResponse,
    EventsResponse,  # noqa: F401  (re-exported: the name app.py had)
    HealthResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadedVersion,
    ReloadRequest,
    ReloadResponse,
    ReplicaCount,
    ScoredItem,
    SimilarResponse,
    VersionResponse,
)
from towerline.serving.settings import ServeSettings
from towerline.serving.stages import BatchedStages, HandleStages
from towerline.text import Text, install_safe_logging

log = logging.getLogger(__name__)

ModelRef = tuple[str, Optional[str]]  # (URI pinning one version, index directory or None)
KEEP_VERSIONS = 3  # model versions a stage replica keeps: current, previous, one being loaded


# ----------------------------------------------------------------------------- arguments


class AppArgs(BaseModel):
    """What ``build_app`` needs; the ``args:`` block of ``configs/serve.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias>")
    index_dir: Optional[str] = Field(None, description="FAISS index folder; default: the bundle's index/ or exact search")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI)")
    settings: ServeSettings = ServeSettings()
    experiments: tuple[ExperimentConfig, ...] = Field((), description="experiments (the config's experiments: list)")
    experiment: Optional[str] = Field(None, description="the experiment /recommend assigns arms for; None = no A/B split")
    profiles: Optional[str] = Field(None, description="profiles Parquet (towerline profile) for /users/{id}/profile and /segments")

    @field_validator("experiments", mode="before")
    @classmethod
    def _experiments(cls, v: Any) -> tuple[ExperimentConfig, ...]:
        """YAML/JSON dicts become the same typed ``ExperimentConfig`` the training config holds."""
        return tuple(e if isinstance(e, ExperimentConfig) else from_dict(ExperimentConfig, e, "experiments") for e in v or ())

    @field_validator("model", "index_dir", "profiles")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        """Replicas may run in another working directory: local paths become absolute here."""
        if v is None or v.startswith(("runs:/", "models:/")):
            return v
        return str(Path(v).expanduser().resolve())

    def resolved(self) -> "AppArgs":
        """Absolute history-db path and an absolute sqlite tracking URI, fixed on the driver."""
        tracking = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if tracking and tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////"):
            tracking = "sqlite:///" + str(Path(tracking[len("sqlite:///") :]).resolve())
        db = str(Path(self.settings.history_db).expanduser().resolve())
        feedback = str(Path(self.settings.feedback_db).expanduser().resolve())
        paths = {"history_db": db, "feedback_db": feedback}
        for name in ("api_token_file", "models_root"):  # read in the replica, which may run elsewhere
            value = getattr(self.settings, name)
            if value is not None:
                paths[name] = str(Path(value).expanduser().resolve())
        settings = self.settings.model_copy(update=paths)
        return self.model_copy(update={"tracking_uri": tracking, "settings": settings})


def _use_tracking(uri: str | None) -> None:
    if uri:
        import mlflow

        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)


# Which ingress replica answered: Serve's own replica tag (as in Serve's logs), so an operator can match an
# answer to a replica's log, and a test can tell two replicas behind one port apart.
REPLICA_HEADER = "X-Towerline-Replica"


def _serve_replica_id() -> Optional[str]:
    """Serve's tag of the replica this runs in; None outside a Serve replica (the in-process app)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


def _limit_threads(threads: int) -> None:
    """Replicas share the machine's cores: each uses ``threads`` for torch and FAISS."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


class _Versions:
    """The model versions one stage replica holds, loaded on demand, at most ``KEEP_VERSIONS``."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.states: OrderedDict[ModelRef, rec.ModelState] = OrderedDict()
        self.locks: dict[ModelRef, asyncio.Lock] = {}
        self.copies = TempCopies()  # registry downloads, deleted with their version and at shutdown

    def add(self, ref: ModelRef, state: rec.ModelState) -> None:
        self.states[ref] = state
        self.states.move_to_end(ref)
        self.copies.keep(state.bundle.path)
        while len(self.states) > KEEP_VERSIONS:
            old, dropped = self.states.popitem(last=False)
            self.copies.drop(dropped.bundle.path)
            log.info("dropped model %s", old)

    async def get(self, ref: ModelRef) -> rec.ModelState:
        state = self.states.get(ref)
        if state is not None:
            return state
        lock = self.locks.setdefault(ref, asyncio.Lock())
        async with lock:
            if ref not in self.states:
                uri, index_dir = ref
                self.add(ref, await asyncio.to_thread(rec.load_model, uri, self.settings, index_dir))
            return self.states[ref]


def _by_ref(refs: list[Any]) -> dict[ModelRef, list[int]]:
    """Positions of a batch grouped by model version (almost always one group)."""
    groups: dict[ModelRef, list[int]] = {}
    for pos, ref in enumerate(refs):
        groups.setdefault(tuple(ref), []).append(pos)
    return groups


def _stage_versions(args: AppArgs) -> _Versions:
    """What every model stage replica does first: its threads, tracking URI and the served version."""
    _use_tracking(args.tracking_uri)
    _limit_threads(args.settings.threads)
    versions = _Versions(args.settings)
    state = rec.load_model(args.model, args.settings, args.index_dir)
    versions.add((state.key, args.index_dir), state)
    return versions


# ----------------------------------------------------------------------------- model stages


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Retriever:
    """User tower over the request's history + FAISS top-N, one forward pass per batch."""

    def __init__(self, args: AppArgs) -> None:
        self.settings = args.settings
        self.versions = _stage_versions(args)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: the registry copies it downloaded go with it."""
        versions = getattr(self, "versions", None)
        if versions is not None:
            versions.copies.close()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config`` (``max_batch_size``, ``batch_wait_timeout_s``), changeable without a restart."""
        if "max_batch_size" in config:
            self.top_n.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self.top_n.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    async def prepare(self, ref: ModelRef) -> str:
        """Load ``ref`` beside the current versions (reload calls this before swapping)."""
        return (await self.versions.get(tuple(ref))).key

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def top_n(self, requests: list[tuple[ModelRef, rec.UserHistory]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[Any] = [None] * len(requests)
        for ref, positions in _by_ref([r[0] for r in requests]).items():
            state = await self.versions.get(ref)
            found = rec.retrieve(state, self.settings, [requests[p][1] for p in positions])
            for p, cands in zip(positions, found):
                out[p] = cands
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Ranker:
    """Scores each user's candidates with the bundle's trained ranker, one batched call per version."""

    def __init__(self, args: AppArgs) -> None:
        self.settings = args.settings
        self.versions = _stage_versions(args)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: the registry copies it downloaded go with it."""
        versions = getattr(self, "versions", None)
        if versions is not None:
            versions.copies.close()

    def reconfigure(self, config: dict[str, Any]) -> None:
        if "max_batch_size" in config:
            self.rank.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self.rank.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    async def prepare(self, ref: ModelRef) -> str:
        return (await self.versions.get(tuple(ref))).key

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def rank(
        self, requests: list[tuple[ModelRef, rec.UserHistory, tuple[np.ndarray, np.ndarray]]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[Any] = [None] * len(requests)
        for ref, positions in _by_ref([r[0] for r in requests]).items():
            state = await self.versions.get(ref)
            ranked = rec.rank(state, [requests[p][1] for p in positions], [requests[p][2] for p in positions])
            for p, r in zip(positions, ranked):
                out[p] = r
        return out


# ----------------------------------------------------------------------------- HTTP contract
# Request/response models: serving/http_models.py; errors and the one status table: serving/errors.py;
# bearer tokens: serving/auth.py; what a reload may load: serving/admin.py; docs: serving/docs.py.

BodyGuard = HttpGuard  # the middleware's earlier name

EVENTS_EXAMPLE = [
    {"user_id": "u000001", "item_id": "i00042", "event_type": "view", "timestamp": 1714564800, "event_id": "e-1"},
    {"user_id": "u000001", "item_id": "i00042", "event_type": "purchase", "value": 19.9,
     "timestamp": "2024-05-01T12:05:00Z", "event_id": "e-2"},
]
RELOAD_EXAMPLES = {
    "alias": {"summary": "the version an alias points to now", "value": {"model": "models:/towerline-retriever@champion"}},
    "again": {"summary": "the URI the app started with, again (a moved alias)", "value": {}},
}
SECURED_STATUSES = (401, 403)


def _statuses(path: str, method: str, secured: bool) -> tuple[int, ...]:
    """The problem statuses an operation can answer (what the OpenAPI document lists for it)."""
    out = [422, 500, 503]
    if method == "post":
        out += [413, 415]
    if secured:
        out += list(SECURED_STATUSES)
    if path in ("/items/{item_id}/similar", "/users/{user_id}/profile", "/audiences"):
        out.append(404)
    if path == "/admin/reload":
        out.append(409)
    return tuple(sorted(set(out)))


def _document_problems(doc: dict[str, Any]) -> dict[str, Any]:
    """Every operation's problem+json responses, from ``_statuses``."""
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's HTTPValidationError: the real 422 is a Problem
            for status, entry in problems(*_statuses(path, method, bool(op.get("security")))).items():
                responses[str(status)] = entry
    return doc


def build_http_app(replica: "IngressReplica") -> FastAPI:
    """The FastAPI app of one ingress replica: routes, auth, errors and docs closed over ``replica``.

    A plain function of a plain object, so tests build the same app in-process (``TestClient``)
    that Serve runs in the replica.
    """
    settings = replica.settings
    app = FastAPI(
        title="Towerline",
        description="Two-tower retrieval, ranking and business rules over a trained bundle. Errors are RFC 9457 "
                    "problem+json; writes and admin need `Authorization: Bearer <token>` when the server has a token "
                    f"({TOKEN_ENV} or api_token_file).",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    replica_id = getattr(replica, "replica_id", None)
    app.add_middleware(HttpGuard, max_bytes=settings.max_body_bytes,
                       headers=((REPLICA_HEADER, replica_id),) if replica_id else ())
    check = token_dependency(replica.token)
    write = [Depends(check)]
    read = [Depends(check)] if settings.require_token_for_reads else []

    @app.post("/recommend", response_model=RecommendResponse, tags=["recommendations"], dependencies=read,
              summary="Top-k items for a user",
              description="User tower over the user's history (training history + events posted since) -> top-N -> "
                          "ranker -> business rules. Unknown or non-consenting users get popular items with "
                          "fallback: true (not an error).")
    async def recommend(req: RecommendRequest) -> Any:
        return await replica.recommend(req)

    @app.get("/items/{item_id}/similar", response_model=SimilarResponse, tags=["recommendations"], dependencies=read,
             summary="Items similar to an item", description="Nearest items by the item tower; 404 for an unknown item.")
    async def similar(item_id: Annotated[Text, PathParam(min_length=1, max_length=256, examples=["i00003"])],
                      k: int = Query(10, ge=1, le=200, description="number of items, 1-200")) -> Any:
        state = replica.state
        items = rec.similar_items(state, settings, item_id, min(k, settings.max_k))
        return SimilarResponse(item_id=item_id, items=[ScoredItem(item_id=i, score=s) for i, s in items],
                               model_version=state.model_version)

    @app.post("/events", response_model=BatchResponse, tags=["events"], dependencies=write,
              summary="Append behaviour events to the online history",
              description=f"A batch of at most max_batch ({settings.max_batch}) events, idempotent on event_id. Each "
                          "event is validated and stored on its own: bad ones are rejected (the first few spelled "
                          "out, all counted by reason) and the others stored. The next /recommend sees them.",
              openapi_extra=batch_openapi("Event", settings.max_batch, EVENTS_EXAMPLE))
    async def events(body: list[Any] = Body(...)) -> Any:
        return await replica.events(body)

    @app.get("/healthz", response_model=HealthResponse, tags=["admin"], summary="Liveness",
             description="ok and the model version serving now; never needs a token.")
    async def healthz() -> Any:
        return HealthResponse(status="ok", model_version=replica.state.model_version, model_key=replica.state.key)

    @app.get("/version", response_model=VersionResponse, tags=["admin"], dependencies=read,
             summary="The model serving now", description="Model name, version, alias, index kind and item count.")
    async def version() -> Any:
        state = replica.state
        b = state.bundle
        return VersionResponse(model_name=b.model_name, model_version=b.model_version, model_alias=b.model_alias,
                               model_key=state.key, index_kind=state.index_kind, item_count=state.n_items - 2)

    app.include_router(marketing_router(replica.marketing, lambda: replica.state.bundle, read=read, write=write,
                                        max_batch=settings.max_batch))
    app.include_router(admin_items_router(replica.add_items, dependencies=write), tags=["admin"])

    @app.post("/admin/reload", response_model=ReloadResponse, tags=["admin"], dependencies=write,
              summary="Load a model version and swap it in",
              description="Loads a registry version (models:/, runs:/) or a bundle folder under models_root beside "
                          "the one serving and swaps them with no failed request. Any other path is 422 (one answer "
                          "for every reason); a version that fails to load is 409 and the old one keeps serving.")
    async def reload(req: Optional[ReloadRequest] = Body(None, openapi_examples=RELOAD_EXAMPLES)) -> Any:
        return await replica.reload(req or ReloadRequest())

    install_docs(app, app.title)
    install_openapi(app, {"Event": Event, "Feedback": Feedback}, _document_problems)
    return app


# ----------------------------------------------------------------------------- ingress


class IngressReplica:
    """HTTP in, JSON out: the ``Recommender`` with batched local stages or deployment handles.

    A plain class (the ``Ingress`` deployment below is this class under Serve's decorators), so the
    FastAPI app it builds can be tested in-process with ``stages=LocalStages(...)``: ``serve.batch``
    needs a replica context.
    """

    def __init__(self, args: AppArgs, retriever: Any = None, ranker: Any = None, *, stages: Any = None,
                 shared: Optional[Follower] = None) -> None:
        install_safe_logging()  # before anything logs a request's content
        _use_tracking(args.tracking_uri)
        _limit_threads(args.settings.threads)
        self.args = args
        self.settings = args.settings
        self.replica_id = _serve_replica_id()
        self.token = check_exposure(args.settings)  # the replica refuses to start exposed, as the CLI does
        self.models_root = args.settings.models_root or default_models_root(args.model)
        self.copies = TempCopies()
        if stages is not None:
            self.stages = stages
        elif args.settings.stage_placement == "deployments":
            if retriever is None:
                raise ValueError("stage_placement='deployments' needs the Retriever deployment bound (build_app does it)")
            self.stages = HandleStages(retriever, ranker)
        else:
            self.stages = BatchedStages(args.settings)
        # what the app's admin writes decided so far (a replica started after a reload serves that), else --model
        self.shared = shared
        published = shared.state if shared is not None else None
        state = self._state_for(published) if published else rec.load_model(args.model, args.settings, args.index_dir)
        self.desired: Desired = published or {"model": state.key, "index_dir": args.index_dir, "items": []}
        self.copies.keep(state.bundle.path)
        self.recommender = rec.Recommender(state, args.settings, open_history_store(args.settings), self.stages)
        self.store = self.recommender.store
        self.reload_lock = asyncio.Lock()
        self.marketing = MarketingService(args.experiments, args.experiment, args.settings.feedback_db, args.profiles)
        # signup campaigns named in the settings: messaged from /events by a background worker
        self.campaign_triggers = CampaignTriggers.from_settings(args.settings, self.recommender, self.marketing.profiles)
        # an arm with its own model is loaded beside the served one; a model that fails to load
        # stops the start-up, since serving that arm with another model would void the experiment
        self.arm_models: dict[str, rec.ModelState] = {
            arm.name: rec.load_model(arm.model, args.settings, None) for arm in self.marketing.arms_with_models()
        }
        for arm_state in self.arm_models.values():
            self.copies.keep(arm_state.bundle.path)
        if shared is not None:  # from now on this replica follows every admin write, wherever it arrived
            shared.start(self.desired, self._apply, self.reload_lock)

    @property
    def state(self) -> rec.ModelState:
        """The version serving now (swapped whole by reload)."""
        return self.recommender.state

    def asgi_app(self) -> FastAPI:
        return build_http_app(self)

    def close(self) -> None:
        """Delete the registry copies this replica made (Serve calls ``__del__`` at shutdown)."""
        self.copies.close()

    def __del__(self) -> None:
        copies = getattr(self, "copies", None)
        if copies is not None:
            copies.close()

    async def recommend(self, req: RecommendRequest) -> Any:
        if req.k > self.settings.max_k:
            return problem(422, "Unprocessable Content", f"body.k: must be at most {self.settings.max_k}",
                           errors=[{"field": "k", "location": "body.k", "message": f"must be at most {self.settings.max_k}"}])
        arm = self.marketing.arm_of(req.user_id)
        result = await self.recommender.recommend_async(
            req.user_id, req.k, req.exclude, req.context.model_dump(exclude_none=True),
            **rec.arm_request(arm, self.arm_models),  # the arm's own model, or popular items for a popular arm
        )
        return RecommendResponse(
            items=[ScoredItem(item_id=i, score=s) for i, s in result.items],
            model_version=result.model_version,
            arm=arm.name if arm else "default",
            fallback=result.fallback,
        )

    async def events(self, body: list[Any]) -> Any:
        """Validate each event on its own, store the valid ones, summarise the rest."""
        if len(body) > self.settings.max_batch:
            return batch_too_large(len(body), self.settings.max_batch, "events")
        batch = await validate_and_store(body, Event, self.store.append)
        if self.campaign_triggers is not None and batch.valid:
            self.campaign_triggers.submit(batch.valid)  # queued, never waited on, never an error here
        return BatchResponse(**batch.as_response())

    async def reload(self, req: ReloadRequest) -> Any:
        try:
            uri = allowed_source(req.model, self.models_root) if req.model else self.args.model
            index_dir = allowed_source(req.index_dir, self.models_root, index=True) if req.index_dir else None
        except BadSource as e:
            return problem(422, "Unprocessable Content", str(e), instance="/admin/reload")
        async with self.reload_lock:
            old = self.state
            new: Optional[rec.ModelState] = None
            try:
                new = await asyncio.to_thread(rec.load_model, uri, self.settings, index_dir)
                await self._prepare(new)
            except Exception as e:  # TowerlineError (bad bundle, index) or a stage failing: the old version stays
                error_id = uuid.uuid4().hex[:16]
                if isinstance(e, TowerlineError):
                    log.warning("reload %s of %a failed, still serving %s: %s", error_id, uri, old.key, e)
                else:
                    log.exception("reload %s of %a failed in a model stage, still serving %s", error_id, uri, old.key)
                if new is not None:
                    self.copies.drop(new.bundle.path)
                return problem(409, "Conflict", f"the model could not be loaded ({_reload_reason(e)}); still serving "
                               f"{old.key}; the server log has the cause under error id {error_id}",
                               model_key=old.key, error_id=error_id, instance="/admin/reload")
            desired = {"model": new.key, "index_dir": index_dir, "items": []}  # the version pinned, not the alias
            if not await self._publish(desired, expected=False):
                self.copies.drop(new.bundle.path)
                return problem(503, "Service Unavailable", "the app's admin state is unreachable, so the other replicas "
                               f"would not follow; nothing changed, still serving {old.key}; try again",
                               instance="/admin/reload", headers={"Retry-After": str(self.settings.retry_after_s)})
            self._swap(new, desired)
        replicas = await self._confirm()
        log.info("reloaded: %s -> %s (%d of %d replicas)", old.key, new.key, replicas.applied, replicas.replicas)
        return ReloadResponse(previous=ReloadedVersion(model_key=old.key, model_version=old.model_version),
                              current=ReloadedVersion(model_key=new.key, model_version=new.model_version,
                                                      index_kind=new.index_kind),
                              replicas=replicas)

    async def add_items(self, rows: list[dict[str, Any]]) -> tuple[rec.AddedItems, int, str, ReplicaCount]:
        """Cold-start items into the served version (``rec.add_items``), swapped whole like a reload,
        then added by every replica. The rows are published onto the state this replica serves only
        (``expected``): when another admin write got there first, it catches up and adds them again."""
        if self.settings.stage_placement == "deployments":
            raise TowerlineError("cold items live in the ingress's state; the Retriever deployments reload by key "
                                 "and would not have them: serve with stage_placement='ingress' or retrain")
        for _attempt in range(3):
            async with self.reload_lock:
                if self.shared is not None:
                    await self._unless_unreachable(self.shared.catch_up(self._apply))
                new, added = await asyncio.to_thread(rec.add_items, self.state, rows)
                if new is self.state:  # every id known already: nothing to publish
                    break
                desired = {**self.desired, "items": [*self.desired["items"], rows]}
                published = await self._publish(desired, expected=True)
                if published is None:
                    continue  # another replica's write came first: catch up, then add onto it
                if not published:
                    raise AdminStateUnavailable("the app's admin state is unreachable, so the other replicas would "
                                                "not follow; nothing changed; try again")
                self._swap(new, desired)
                break
        else:
            raise TowerlineError("other admin writes kept arriving while these items were added; send them again")
        return added, new.n_items - 2, new.key, await self._confirm()

    # --------------------------------------------------------------- admin state shared by the replicas

    def _state_for(self, desired: Desired) -> rec.ModelState:
        """The ``ModelState`` serving ``desired`` (blocking: runs in a thread). When it is the version
        served now plus more item batches, only those are added; otherwise the version is loaded."""
        served = getattr(self, "desired", None)
        same = (served is not None and (desired["model"], desired["index_dir"]) == (served["model"], served["index_dir"])
                and desired["items"][: len(served["items"])] == served["items"])
        state = self.state if same else rec.load_model(desired["model"], self.settings, desired["index_dir"])
        try:
            for rows in desired["items"][len(served["items"]) if same else 0 :]:
                state, _ = rec.add_items(state, rows)
        except Exception:
            if not same:
                self.copies.drop(state.bundle.path)  # the registry copy just downloaded
            raise
        return state

    async def _apply(self, desired: Desired) -> None:
        """Serve ``desired`` (what another replica published); the follower holds ``reload_lock``."""
        new = await asyncio.to_thread(self._state_for, desired)
        if new is not self.state:
            await self._prepare(new)
        self._swap(new, desired)

    async def _prepare(self, state: rec.ModelState) -> None:
        prepare = getattr(self.stages, "prepare", None)  # LocalStages (tests) has nothing to warm
        if prepare is not None:
            await prepare(state)

    def _swap(self, new: rec.ModelState, desired: Desired) -> None:
        """Serve ``new`` from the next request on; the old version's registry copy goes (every artifact
        is in memory: requests in flight are unaffected)."""
        old = self.recommender.state
        self.copies.keep(new.bundle.path)
        self.recommender.state = new
        self.desired = desired
        self.copies.drop(old.bundle.path)

    async def _publish(self, desired: Desired, *, expected: bool) -> Optional[bool]:
        """True: published (or nothing to publish to); None: another write came first (``expected``);
        False: the admin state is unreachable."""
        if self.shared is None:
            return True
        try:
            return True if await self.shared.publish(desired, expected=expected) else None
        except Exception as e:
            log.warning("admin state unreachable: %s", e)
            return False

    async def _unless_unreachable(self, step: Any) -> None:
        try:
            await step
        except Exception as e:
            raise AdminStateUnavailable("the app's admin state is unreachable or this replica could not catch up "
                                        "with it; nothing changed; try again") from e

    async def _confirm(self) -> ReplicaCount:
        """How many live replicas serve this replica's state now (waiting a few seconds for them)."""
        if self.shared is None:
            return ReplicaCount(replicas=1, applied=1)
        try:
            return ReplicaCount(**await self.shared.confirm())
        except Exception as e:
            log.warning("admin state unreachable after publishing: %s", e)
            return ReplicaCount(replicas=1, applied=1)


def _reload_reason(error: BaseException) -> str:
    """A reload failure in words that name no path, PID or tracking URI."""
    if isinstance(error, IndexMismatchError):
        return "its index does not match its manifest or the model"
    if isinstance(error, BundleError):
        return "it is not in the registry, or its files are missing or fail their checksums"
    if isinstance(error, TowerlineError):
        return "it breaks the bundle format"
    return "a model stage could not load it"


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress()
class Ingress(IngressReplica):
    """The ingress deployment: ``IngressReplica`` in a Serve replica, following the app's ``AdminState``."""

    async def __init__(self, args: AppArgs, retriever: Any = None, ranker: Any = None, admin_state: Any = None) -> None:
        """Async (Serve awaits it): the admin state published so far is read before the model loads."""
        s = args.settings
        shared = None if admin_state is None else await Follower.connect(admin_state, s.admin_poll_s, s.admin_sync_timeout_s)
        IngressReplica.__init__(self, args, retriever, ranker, shared=shared)

    def __serve_build_asgi_app__(self) -> Any:
        """The FastAPI app, built per replica so routes close over this replica's state."""
        return self.asgi_app()


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    """The application graph; ``serve run configs/serve.yaml`` calls this with the ``args:`` block.

    ``args`` may be a dict (Serve passes one because this module's annotations are strings).
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    from towerline.serving.shedding import ingress_options

    args = args.resolved()
    s = args.settings
    # replicas, bounded queues (503 + Retry-After), health checks and the drain on stop: shedding.py
    ingress = Ingress.options(**ingress_options(s))
    admin = AdminState.bind(max(3.0, 6 * s.admin_poll_s))  # what admin writes decided, followed by every replica
    if s.stage_placement != "deployments":
        return ingress.bind(args, admin_state=admin)  # the model stages run batched inside the ingress
    retriever = Retriever.options(
        num_replicas=s.retriever_replicas,
        user_config={"max_batch_size": s.retriever_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
    ).bind(args)
    if s.rank_stage == "never":
        return ingress.bind(args, retriever, admin_state=admin)
    ranker = Ranker.options(
        num_replicas=s.ranker_replicas,
        user_config={"max_batch_size": s.ranker_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
    ).bind(args)
    return ingress.bind(args, retriever, ranker, admin_state=admin)
