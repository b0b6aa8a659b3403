"""The OpenAPI document and the pages that show it, with no request leaving the machine.

FastAPI's ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from a CDN, so behind a firewall (or on
a laptop on a train) both pages are blank. The assets ship in the ``fastapi-offline`` wheel (Swagger
UI bundle and CSS, ReDoc standalone, MIT); this module serves them from ``/docs/assets/`` and builds
both pages around them. The ``root_path`` Serve sets for an app under a route prefix (``/ab``) is
honoured, so the pages work wherever the app is mounted.

``install_openapi`` then makes the document say what the service really answers: every operation
lists its problem+json errors (``PROBLEM_STATUSES``) with the ``Problem`` schema and an example, and
the batch endpoints document their items (``Event``, ``Feedback``) although they validate row by
row so that one bad row does not reject a batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

from towerline.problems import PROBLEM, Problem

log = logging.getLogger(__name__)

ASSETS_URL = "/docs/assets"
ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}

TAGS = [
    {"name": "recommendations", "description": "Top-k items for a user, similar items."},
    {"name": "events", "description": "Behaviour events into the online history store (needs the API token)."},
    {"name": "marketing", "description": "Profiles, segments, audiences and A/B feedback."},
    {"name": "admin", "description": "Model reload and service information."},
]

PROBLEM_TEXT = {
    401: "no bearer token (Authorization: Bearer <token>) on an endpoint that needs one",
    403: "a bearer token that is not the server's API token",
    404: "an id the model or the loaded data does not hold",
    409: "the requested model could not be loaded; the served version keeps serving",
    413: "the body is over max_body_bytes, or a batch holds more records than max_batch",
    415: "a body that is not application/json",
    422: "invalid JSON, or a field that breaks its type or range (each one named in errors)",
    500: "an unexpected error: the body holds only an error_id, which the server log carries",
    503: "the service cannot take the request now; retry after the Retry-After header",
}
PROBLEM_EXAMPLE = {
    401: {"title": "Unauthorized", "detail": "this endpoint needs the API token: send 'Authorization: Bearer <token>'"},
    403: {"title": "Forbidden", "detail": "the bearer token is not this server's API token"},
    404: {"title": "Not Found", "detail": "item 'i99999' is not in the model's catalogue"},
    409: {"title": "Conflict", "detail": "the model could not be loaded (its index does not match its manifest); still serving models:/towerline-retriever/2"},
    413: {"title": "Content Too Large", "detail": "a batch of 20000 records exceeds the limit of 10000 per request; send smaller batches", "limit": 10000},
    415: {"title": "Unsupported Media Type", "detail": "content type 'text/plain' is not accepted; send the body as application/json"},
    422: {"title": "Unprocessable Content", "detail": "body.k: Input should be a valid integer",
          "errors": [{"field": "k", "location": "body.k", "message": "Input should be a valid integer"}]},
    500: {"title": "Internal Server Error", "detail": "the server could not answer this request; quote error id 3f9c2a1b7d4e6f80 to the operator",
          "error_id": "3f9c2a1b7d4e6f80"},
    503: {"title": "Service Unavailable", "detail": "too many requests in flight; retry shortly"},
}


def asset_dir() -> Path:
    """The folder of the packaged Swagger UI and ReDoc assets (the ``fastapi-offline`` wheel)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for a route: each status as problem+json with the ``Problem`` schema."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        example = {"type": "about:blank", "status": status, **PROBLEM_EXAMPLE[status], "instance": "/recommend"}
        out[status] = {
            "description": PROBLEM_TEXT[status],
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}, "example": example}},
        }
    return out


def install_docs(app: FastAPI, title: str) -> None:
    """``/docs`` (Swagger UI), ``/redoc`` and their assets, all served by the app itself.

    An environment installed before ``fastapi-offline`` became a dependency still serves: its pages
    load the assets from FastAPI's CDN, with a warning saying what to install.
    """
    try:
        folder = asset_dir()
    except ImportError:
        log.warning("fastapi-offline is not installed: /docs and /redoc load their assets from a CDN "
                    "(pip install fastapi-offline, or reinstall towerline)")
        app.get("/docs", include_in_schema=False)(_cdn_page(app, title, get_swagger_ui_html))
        app.get("/redoc", include_in_schema=False)(_cdn_page(app, title, get_redoc_html))
        return

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSET_TYPES:
            raise HTTPException(404, f"no documentation asset named {name!r}")
        return FileResponse(folder / name, media_type=ASSET_TYPES[name],
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{title} - Swagger UI",
                                   swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{title} - ReDoc",
                              redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)


def _cdn_page(app: FastAPI, title: str, page: Callable[..., HTMLResponse]) -> Callable[[Request], Any]:
    async def show(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return page(openapi_url=f"{root}{app.openapi_url}", title=title)

    return show


def install_openapi(app: FastAPI, schemas: dict[str, type],
                    finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Generate the document once, with ``Problem`` and ``schemas`` (models only referenced by
    ``openapi_extra``, such as the batch items) in its components; ``finish`` edits it last (the
    ingress lists each operation's problem statuses there)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                          tags=TAGS)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, model in {"Problem": Problem, **schemas}.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for sub_name, sub in schema.pop("$defs", {}).items():
                components.setdefault(sub_name, sub)
            components[name] = schema
        if finish is not None:
            doc = finish(doc)
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's default 422, replaced by Problem
            if not _referenced(doc, unused):
                components.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _referenced(doc: dict[str, Any], name: str) -> bool:
    ref = f"#/components/schemas/{name}"
    text = str({k: v for k, v in doc.items() if k != "components"})
    return ref in text


def batch_body(item: str, max_items: int, examples: list[Any]) -> dict[str, Any]:
    """``openapi_extra`` for a batch endpoint: an array of ``item`` (a components schema), ``max_items`` long."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}, "maxItems": max_items},
        "examples": {f"example{i + 1}": {"value": v} for i, v in enumerate(examples)},
    }}}}


