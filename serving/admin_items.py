"""``POST /admin/items``: cold-start items, servable the moment they arrive, without retraining.

A router factory (FastAPI ``APIRouter``) so that the ingress mounts it with one line and the route
is tested on its own. The body is a list of catalogue rows (the items contract of
``features.contracts``); each new id gets an attribute-only vector from the item tower and a row in
the index (``recommender.add_items``), and the ingress swaps the whole ``ModelState`` as a reload
does, so a request sees either the old catalogue or the new one, never half of each. Every ingress
replica adds the same rows (``serving/admin_state.py``); a later reload serves that version as
trained, without the items added before it.

Auth: this is an admin (write) endpoint; it must sit behind the admin bearer-token dependency the
ingress gives ``/admin/reload`` (pass it as ``dependencies=`` to ``admin_items_router``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Optional

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from towerline.errors import TowerlineError
from towerline.serving.admin_state import AdminStateUnavailable
from towerline.serving.http_models import ReplicaCount
from towerline.serving.recommender import AddedItems
from towerline.text import Money, Text

log = logging.getLogger(__name__)

MAX_ITEMS_PER_CALL = 10_000  # rows per request; a whole catalogue reload goes in several calls


class NewItem(BaseModel):
    """One catalogue row: the items contract (``features.contracts``)."""

    model_config = ConfigDict(extra="forbid")

    item_id: Text = Field(min_length=1, max_length=256)
    attributes: list[Text] = Field(default_factory=list, max_length=256)  # tokens, e.g. "category:c3", "brand:b7"
    price: Optional[Money] = None
    in_stock: StrictBool = True
    title: Optional[Text] = Field(default=None, max_length=1000)


class AddItemsResponse(BaseModel):
    added: list[str]  # new ids, servable now
    known: list[str]  # already in the model: left with their trained vectors
    without_attributes: list[str]  # added, but no attribute the model knows: scored 0 until retrained
    item_count: int  # catalogue size now (reserved rows excluded)
    model_key: str
    replicas: ReplicaCount  # the ingress replicas that serve the new items now


def admin_items_router(
    add_items: Callable[[list[dict[str, Any]]], Awaitable[tuple[AddedItems, int, str, ReplicaCount]]],
    dependencies: Sequence[Any] = (),
) -> APIRouter:
    """The ``/admin/items`` route over ``add_items(rows) -> (AddedItems, item_count, model_key, replicas)``,
    the ingress's method that builds the new state, swaps it in and has every replica follow
    (``IngressReplica.add_items``)."""
    router = APIRouter(dependencies=list(dependencies))

    @router.post("/admin/items", response_model=AddItemsResponse, summary="Add cold-start items to the served catalogue",
                 description="Each new item id gets the item tower's attribute-only vector and a row in the index, "
                             "swapped in whole like a reload (no retraining); known ids are left alone and listed. "
                             "409 for a version with a ranker or remote model stages.")
    async def post_items(body: list[NewItem] = Body(..., min_length=1, max_length=MAX_ITEMS_PER_CALL, openapi_examples={
        "one cold item": {"summary": "a new item with attributes only",
                          "value": [{"item_id": "i99999", "attributes": ["category:c3", "brand:b7"], "price": 19.9}]},
    })) -> Any:
        try:
            added, count, key, replicas = await add_items([item.model_dump() for item in body])
        except TowerlineError as e:  # e.g. a ranker or remote stages that cannot hold cold items
            log.warning("POST /admin/items refused: %s", e)
            status = 503 if isinstance(e, AdminStateUnavailable) else 409  # 503: nothing changed, try again
            return JSONResponse({"type": "about:blank", "title": "Items Not Added", "status": status, "detail": str(e)},
                                status_code=status, media_type="application/problem+json")
        return AddItemsResponse(added=added.added, known=added.known, without_attributes=added.without_attributes,
                                item_count=count, model_key=key, replicas=replicas)

    return router
