"""The request and response bodies of the serving endpoints, each field typed as strictly as the
stores and the model need (``towerline.text``): strict integers, bounded timestamps, finite floats,
encodable text, unknown fields rejected by name.

No ``from __future__ import annotations``: FastAPI reads these annotations at runtime in the replica.
"""

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from towerline.text import Text

Id = Annotated[Text, Field(min_length=1, max_length=256)]

USER_EXAMPLE = "u000001"


class RecommendContext(BaseModel):
    """What the page knows about the request; today only consent."""

    model_config = ConfigDict(extra="forbid")

    consent: Optional[StrictBool] = Field(None, description="false: no personalisation (popular items, fallback: true)")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user_id": USER_EXAMPLE, "k": 5, "exclude": ["i00042"]}]})

    user_id: Id
    k: StrictInt = Field(10, ge=1, le=200, description="number of items, 1-200 (at most the server's max_k)")
    exclude: list[Id] = Field(default_factory=list, max_length=10_000, description="item ids never to return")
    context: RecommendContext = Field(default_factory=RecommendContext, description='request context, e.g. {"consent": false}')


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"item_id": "i00017", "score": 3.21}, {"item_id": "i00003", "score": 2.87}],
        "model_version": "3", "arm": "default", "fallback": False}]})

    items: list[ScoredItem]
    model_version: Optional[str]
    arm: str = Field(description='the experiment arm that served the request; "default" without an experiment')
    fallback: bool = Field(description="true: popular items, the user could not be personalised")


class SimilarResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "item_id": "i00003", "items": [{"item_id": "i00011", "score": 0.93}], "model_version": "3"}]})

    item_id: str
    items: list[ScoredItem]
    model_version: Optional[str]


class BatchResponse(BaseModel):
    """What a batch endpoint (``/events``, ``/feedback``) stored and why it refused the rest."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "accepted": 2, "duplicate": 1, "rejected": ["event 3: field 'timestamp': Value error, must be between 1970-01-01 and 2100-01-01 (epoch seconds 0..4102444800)"],
        "rejected_count": 1, "rejected_by_reason": {"timestamp: value_error": 1}}]})

    accepted: int = Field(description="records stored now")
    duplicate: int = Field(description="records stored before (same event_id and content): not stored twice")
    rejected: list[str] = Field(description="the first rejected records, one line each naming the record's position and fields")
    rejected_count: int = Field(0, description="all rejected records")
    rejected_by_reason: dict[str, int] = Field(default_factory=dict, description="rejected records per reason ('field: error type')")


EventsResponse = BatchResponse  # the name the endpoint had before the summary fields


class VersionResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model_name": "towerline-retriever", "model_version": "3", "model_alias": "champion",
        "model_key": "models:/towerline-retriever/3", "index_kind": "flat", "item_count": 1000}]})

    model_name: Optional[str]
    model_version: Optional[str]
    model_alias: Optional[str]
    model_key: str
    index_kind: str
    item_count: int


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])
    model_version: Optional[str]
    model_key: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "models:/towerline-retriever@champion"}]})

    model: Optional[Annotated[Text, Field(min_length=1, max_length=1024)]] = Field(
        None, description="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/bundle, or a bundle folder "
        "under the server's models_root; default: the URI the app started with (follows a moved alias)")
    index_dir: Optional[Annotated[Text, Field(min_length=1, max_length=1024)]] = Field(
        None, description="an index folder under the server's models_root; default: the bundle's index/ or exact search")


class ReloadedVersion(BaseModel):
    model_key: str
    model_version: Optional[str]
    index_kind: Optional[str] = None


class ReplicaCount(BaseModel):
    """How far an admin write reached: the live ingress replicas and how many serve it now."""

    replicas: int = Field(description="live ingress replicas (a heartbeat in the last few seconds)")
    applied: int = Field(description="replicas that serve the change now (this one included)")
    failed: int = Field(0, description="replicas that could not apply it: they keep serving what they had and retry")


class ReloadResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "previous": {"model_key": "models:/towerline-retriever/2", "model_version": "2"},
        "current": {"model_key": "models:/towerline-retriever/3", "model_version": "3", "index_kind": "flat"},
        "replicas": {"replicas": 2, "applied": 2, "failed": 0}}]})

    previous: ReloadedVersion
    current: ReloadedVersion
    replicas: ReplicaCount


def openapi_examples(*examples: Any) -> dict[str, dict[str, Any]]:
    """``Body(openapi_examples=...)`` from plain values: {"example1": {"value": ...}, ...}."""
    return {f"example{i + 1}": {"value": v} for i, v in enumerate(examples)}


