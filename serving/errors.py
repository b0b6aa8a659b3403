"""Every error the HTTP service answers, in one place: which status each error type gets, and the
problem+json (RFC 9457) body it gets it with.

- ``STATUS``: the one table from Towerline's error types to HTTP statuses, looked up along the
  exception's MRO, so a new subclass inherits its parent's status until it is given its own.
- Request validation: 422 naming each field (at most ``MAX_FIELD_ERRORS`` of them).
- ``AuthError`` (``serving.auth``): 401/403 with ``WWW-Authenticate: Bearer``.
- ``HttpGuard`` (ASGI middleware, outermost): 413 for bodies over ``max_body_bytes``, 415 for a
  non-JSON body, and for anything unexpected a 500 whose body holds only an opaque ``error_id``; the
  log line with the traceback carries the same id. No exception text, path or PID reaches a client.
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from towerline.errors import BundleError, ConfigError, DataValidationError, IndexMismatchError, TowerlineError
from towerline.problems import PROBLEM, field_path, problem
from towerline.serving.auth import AuthError
from towerline.serving.recommender import UnknownItemError
from towerline.text import safe_text

log = logging.getLogger(__name__)

MAX_FIELD_ERRORS = 20  # a 422 lists this many bad fields and counts the rest

# The one table: error type -> HTTP status (looked up along the MRO; TowerlineError is the fallback).
STATUS: dict[type[TowerlineError], int] = {
    TowerlineError: 422,  # the user can fix it by changing the request
    DataValidationError: 422,
    ConfigError: 422,
    UnknownItemError: 404,
    BundleError: 409,  # a model that cannot be loaded: the served one stays (reload)
    IndexMismatchError: 409,
}


def status_for(error: type[BaseException] | BaseException) -> int:
    """The status of a Towerline error type (or instance) from ``STATUS``; 500 for anything else."""
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        if base in STATUS:
            return STATUS[base]
    return 500


TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}  # RFC 9110's names (http.HTTPStatus has older ones)


def title_of(status: int) -> str:
    if status in TITLES:
        return TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def validation_problem(request_path: str, errors: list[dict[str, Any]]) -> JSONResponse:
    """422 naming every bad field (``errors``: pydantic/FastAPI error dicts)."""
    listed = []
    for err in errors[:MAX_FIELD_ERRORS]:
        if err["type"] == "json_invalid":  # loc is ("body", <character offset>)
            at = err["loc"][1] if len(err["loc"]) > 1 else "?"
            reason = safe_text((err.get("ctx") or {}).get("error", ""), 100)
            listed.append({"field": "body", "location": "body", "message": f"invalid JSON at character {at}: {reason}"})
        else:
            listed.append({"field": field_path(err["loc"][1:]) or field_path(err["loc"]), "location": field_path(err["loc"]),
                           "message": err["msg"]})
    detail = "; ".join(f"{e['location']}: {e['message']}" for e in listed)
    if len(errors) > MAX_FIELD_ERRORS:
        detail += f"; and {len(errors) - MAX_FIELD_ERRORS} more"
    return problem(422, title_of(422), detail, errors=listed, error_count=len(errors), instance=request_path)


def install_error_handlers(app: FastAPI) -> None:
    """Validation, HTTP, auth and Towerline errors as problem+json (the 500 is ``HttpGuard``'s)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(request.url.path, list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else title_of(exc.status_code)
        return problem(exc.status_code, title_of(exc.status_code), detail, instance=request.url.path,
                       headers=getattr(exc, "headers", None))

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        return problem(exc.status, title_of(exc.status), exc.detail, instance=request.url.path,
                       headers={"WWW-Authenticate": exc.challenge})

    @app.exception_handler(TowerlineError)
    async def _towerline(request: Request, exc: TowerlineError) -> JSONResponse:
        status = status_for(exc)
        return problem(status, title_of(status), str(exc), instance=request.url.path)


def internal_error(path: str, exc: BaseException) -> JSONResponse:
    """The opaque 500: an id in the body, the traceback with the same id in the log."""
    error_id = uuid.uuid4().hex[:16]
    log.error("unhandled error %s on %a", error_id, path, exc_info=exc)
    return problem(500, title_of(500), f"the server could not answer this request; quote error id {error_id} "
                   "to the operator", error_id=error_id, instance=path)


class HttpGuard:
    """ASGI middleware, outermost: 413 for bodies over ``max_bytes``, 415 for a non-JSON body on
    POST/PUT/PATCH, and the opaque 500 for any exception the app lets through.

    It reads the whole body before the app sees it (at most ``max_bytes``), so a chunked upload
    without Content-Length is cut off just as a declared one is, and the app's own parser never
    holds more than the limit.
    """

    def __init__(self, app: Any, max_bytes: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]  # on every answer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.headers:
                    message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._read_body(scope, receive, tracking_send)
                if receive is None:
                    return
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # the one place an unexpected error becomes an answer
            if started:  # the status is on the wire already: all that is left is the log line
                log.error("error after the response started on %a", scope.get("path"), exc_info=exc)
                return
            await internal_error(scope.get("path", ""), exc)(scope, receive, send)

    async def _read_body(self, scope: dict, receive: Any, send: Any) -> Any:
        """A ``receive`` that replays the body, or None when a 413/415 (or a disconnect) ended the request."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._reply(scope, receive, send, 413,
                              f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes} bytes; "
                              "send smaller batches")
            return None
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reply(scope, receive, send, 413,
                                  f"request body exceeds the limit of {self.max_bytes} bytes; send smaller batches")
                return None
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and not (media == "application/json" or media.endswith("+json")):
            await self._reply(scope, receive, send, 415,
                              f"content type {safe_text(media, 80) or '(none)'!r} is not accepted; send the body as "
                              "application/json")
            return None
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay

    async def _reply(self, scope: dict, receive: Any, send: Any, status: int, detail: str) -> None:
        extra = {"limit": self.max_bytes} if status == 413 else {}
        await problem(status, title_of(status), detail, instance=scope.get("path"), **extra)(scope, receive, send)


__all__ = ["PROBLEM", "STATUS", "HttpGuard", "install_error_handlers", "internal_error", "status_for", "validation_problem"]
