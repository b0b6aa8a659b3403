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
corrupt index) never replaces the one serving. One ingress replica is the default; with several,
each reloads on its own ``/admin/reload`` call (or redeploy with ``serve deploy``, which Serve rolls
out replica by replica).

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
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from towerline.errors import TowerlineError
from towerline.features.contracts import Event
from towerline.config import ExperimentConfig, from_dict
from towerline.marketing.routes import MarketingService, marketing_router
from towerline.problems import field_path, record_problems
from towerline.serving import recommender as rec
from towerline.serving.history import open_history_store
from towerline.serving.settings import ServeSettings
from towerline.serving.stages import BatchedStages, HandleStages

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
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
        settings = self.settings.model_copy(update={"history_db": db, "feedback_db": feedback})
        return self.model_copy(update={"tracking_uri": tracking, "settings": settings})


def _use_tracking(uri: str | None) -> None:
    if uri:
        import mlflow

        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)


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

    def add(self, ref: ModelRef, state: rec.ModelState) -> None:
        self.states[ref] = state
        self.states.move_to_end(ref)
        while len(self.states) > KEEP_VERSIONS:
            old, _ = self.states.popitem(last=False)
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


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=256)
    k: int = Field(10, ge=1, le=200, description="number of items, 1-200")
    exclude: list[str] = Field(default_factory=list, max_length=10_000, description="item ids never to return")
    context: dict[str, Any] = Field(default_factory=dict, description='request context, e.g. {"consent": false}')


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: Optional[str]
    arm: str = Field(description='the experiment arm that served the request; "default" without an experiment')
    fallback: bool = Field(description="true: popular items, the user could not be personalised")


class SimilarResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: Optional[str]


class EventsResponse(BaseModel):
    accepted: int
    duplicate: int
    rejected: list[str]


class VersionResponse(BaseModel):
    model_name: Optional[str]
    model_version: Optional[str]
    model_alias: Optional[str]
    model_key: str
    index_kind: str
    item_count: int


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="default: the URI the app started with (follows a moved alias)")
    index_dir: Optional[str] = None


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem details response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


class BodyGuard:
    """ASGI middleware: 413 for bodies over ``max_bytes``, 415 for a non-JSON body on POST.

    It reads the whole body before the app sees it (at most ``max_bytes``), so a chunked upload
    without Content-Length is cut off just as a declared one is, and the app's own parser never
    holds more than the limit.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._reply(scope, receive, send, 413, "Content Too Large",
                              f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes} bytes; "
                              "send smaller batches")
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reply(scope, receive, send, 413, "Content Too Large",
                                  f"request body exceeds the limit of {self.max_bytes} bytes; send smaller batches")
                return
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and not (media == "application/json" or media.endswith("+json")):
            await self._reply(scope, receive, send, 415, "Unsupported Media Type",
                              f"content type {media or '(none)'!r} is not accepted; send the body as "
                              "application/json")
            return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reply(scope: dict, receive: Any, send: Any, status: int, title: str, detail: str) -> None:
        await problem(status, title, detail, instance=scope.get("path"))(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            if err["type"] == "json_invalid":  # loc is ("body", <character offset>)
                at = err["loc"][1] if len(err["loc"]) > 1 else "?"
                reason = (err.get("ctx") or {}).get("error", "")
                errors.append({"field": "body", "location": "body", "message": f"invalid JSON at character {at}: {reason}"})
            else:
                errors.append({"field": field_path(err["loc"][1:]) or field_path(err["loc"]), "location": field_path(err["loc"]),
                               "message": err["msg"]})
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors)
        return problem(422, "Unprocessable Content", detail, errors=errors, instance=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), str(exc.detail), instance=request.url.path)

    @app.exception_handler(rec.UnknownItemError)
    async def _unknown_item(request: Request, exc: rec.UnknownItemError) -> JSONResponse:
        return problem(404, "Not Found", str(exc), instance=request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem(500, "Internal Server Error", f"{type(exc).__name__}: {exc}", instance=request.url.path)


# ----------------------------------------------------------------------------- ingress


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """HTTP in, JSON out: the ``Recommender`` with batched local stages or deployment handles."""

    def __init__(self, args: AppArgs, retriever: Any = None, ranker: Any = None) -> None:
        _use_tracking(args.tracking_uri)
        _limit_threads(args.settings.threads)
        self.args = args
        self.settings = args.settings
        if args.settings.stage_placement == "deployments":
            if retriever is None:
                raise ValueError("stage_placement='deployments' needs the Retriever deployment bound (build_app does it)")
            self.stages: BatchedStages | HandleStages = HandleStages(retriever, ranker)
        else:
            self.stages = BatchedStages(args.settings)
        state = rec.load_model(args.model, args.settings, args.index_dir)
        self.recommender = rec.Recommender(state, args.settings, open_history_store(args.settings), self.stages)
        self.store = self.recommender.store
        self.reload_lock = asyncio.Lock()
        self.marketing = MarketingService(args.experiments, args.experiment, args.settings.feedback_db, args.profiles)
        # an arm with its own model is loaded beside the served one; a model that fails to load
        # stops the start-up, since serving that arm with another model would void the experiment
        self.arm_models: dict[str, rec.ModelState] = {
            arm.name: rec.load_model(arm.model, args.settings, None) for arm in self.marketing.arms_with_models()
        }

    @property
    def state(self) -> rec.ModelState:
        """The version serving now (swapped whole by reload)."""
        return self.recommender.state

    def __serve_build_asgi_app__(self) -> Any:
        """The FastAPI app, built per replica so routes close over this replica's state."""
        app = FastAPI(
            title="Towerline",
            description="Two-tower retrieval, ranking and business rules over a trained bundle.",
            version="1",
        )
        _install_error_handlers(app)
        app.add_middleware(BodyGuard, max_bytes=self.settings.max_body_bytes)

        @app.post("/recommend", response_model=RecommendResponse)
        async def recommend(req: RecommendRequest) -> Any:
            return await self.recommend(req)

        @app.get("/items/{item_id}/similar", response_model=SimilarResponse)
        async def similar(item_id: str, k: int = Query(10, ge=1, le=200)) -> Any:
            state = self.state
            items = rec.similar_items(state, self.settings, item_id, min(k, self.settings.max_k))
            return SimilarResponse(item_id=item_id, items=[ScoredItem(item_id=i, score=s) for i, s in items],
                                   model_version=state.model_version)

        @app.post("/events", response_model=EventsResponse)
        async def events(body: list[dict[str, Any]] = Body(..., max_length=100_000)) -> Any:
            valid: list[Event] = []
            rejected: list[str] = []
            for pos, raw in enumerate(body):
                try:
                    valid.append(Event.model_validate(raw))
                except ValidationError as e:
                    rejected.append(record_problems(pos, e))
            result = await asyncio.to_thread(self.store.append, valid) if valid else None
            return EventsResponse(
                accepted=result.accepted if result else 0,
                duplicate=result.duplicate if result else 0,
                rejected=rejected + (result.rejected if result else []),
            )

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            return {"status": "ok", "model_version": self.state.model_version, "model_key": self.state.key}

        @app.get("/version", response_model=VersionResponse)
        async def version() -> Any:
            b = self.state.bundle
            return VersionResponse(model_name=b.model_name, model_version=b.model_version, model_alias=b.model_alias,
                                   model_key=self.state.key, index_kind=self.state.index_kind,
                                   item_count=self.state.n_items - 2)

        app.include_router(marketing_router(self.marketing, lambda: self.state.bundle))

        @app.post("/admin/reload")
        async def reload(req: Optional[ReloadRequest] = None) -> Any:
            return await self.reload(req or ReloadRequest())

        return app

    async def recommend(self, req: RecommendRequest) -> Any:
        if req.k > self.settings.max_k:
            return problem(422, "Unprocessable Content", f"body.k: must be at most {self.settings.max_k}",
                           errors=[{"field": "k", "location": "body.k", "message": f"must be at most {self.settings.max_k}"}])
        arm = self.marketing.arm_of(req.user_id)
        result = await self.recommender.recommend_async(
            req.user_id, req.k, req.exclude, req.context,
            state=self.arm_models.get(arm.name) if arm else None,
            popular_only=arm is not None and arm.rules == "popular",  # the non-personalised arm of an experiment
        )
        return RecommendResponse(
            items=[ScoredItem(item_id=i, score=s) for i, s in result.items],
            model_version=result.model_version,
            arm=arm.name if arm else "default",
            fallback=result.fallback,
        )

    async def reload(self, req: ReloadRequest) -> Any:
        uri = req.model or self.args.model
        index_dir = AppArgs._absolute(req.index_dir)
        async with self.reload_lock:
            old = self.state
            try:
                new = await asyncio.to_thread(rec.load_model, uri, self.settings, index_dir)
                await self.stages.prepare(new)
            except TowerlineError as e:
                log.warning("reload of %s failed, still serving %s: %s", uri, old.key, e)
                return problem(409, "Reload Failed", f"{e}; still serving {old.key}", model_key=old.key)
            except Exception as e:  # a stage failed to load it: same outcome, the old version stays
                log.exception("reload of %s failed in a model stage", uri)
                return problem(409, "Reload Failed", f"{type(e).__name__}: {e}; still serving {old.key}", model_key=old.key)
            self.recommender.state = new
        log.info("reloaded: %s -> %s", old.key, new.key)
        return {"previous": {"model_key": old.key, "model_version": old.model_version},
                "current": {"model_key": new.key, "model_version": new.model_version, "index_kind": new.index_kind}}


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
    if s.stage_placement != "deployments":
        return ingress.bind(args)  # the model stages run batched inside the ingress: nothing else to deploy
    retriever = Retriever.options(
        num_replicas=s.retriever_replicas,
        user_config={"max_batch_size": s.retriever_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
    ).bind(args)
    if s.rank_stage == "never":
        return ingress.bind(args, retriever)
    ranker = Ranker.options(
        num_replicas=s.ranker_replicas,
        user_config={"max_batch_size": s.ranker_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
    ).bind(args)
    return ingress.bind(args, retriever, ranker)
