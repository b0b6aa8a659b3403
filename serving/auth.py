"""Who may write: a bearer token on the write and admin endpoints, and where the server may listen without one.

The token comes from the environment variable ``TOWERLINE_API_TOKEN`` or from the file that the serve
setting ``api_token_file`` names (the variable wins when both are set; a file keeps the secret out of
process listings and shell history and is what a cluster's replicas can all read). It is compared in
constant time (``hmac.compare_digest``), so response timing says nothing about how much of a guess
was right.

- Writes and admin (``POST /events``, ``/feedback``, ``/audiences``, ``/admin/*``) need the token; a
  missing one is 401, a wrong one 403, both problem+json with ``WWW-Authenticate: Bearer``.
- Reads (``/recommend``, ``/items/.../similar``, profiles, segments, ``/version``) stay open unless
  ``require_token_for_reads``; ``/healthz`` and the docs are always open (load balancers, people).
- Without a configured token the server starts only on a loopback host (127.0.0.1, ::1, localhost),
  and there writes are open: what can reach the port is this machine's own processes, which is what
  the tests, the quickstart and ``serve --check`` run. Anywhere else ``check_exposure`` refuses to
  start with a ``ConfigError`` naming both ways to set a token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Optional

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from towerline.errors import ConfigError

if TYPE_CHECKING:
    from towerline.serving.settings import ServeSettings

log = logging.getLogger(__name__)

TOKEN_ENV = "TOWERLINE_API_TOKEN"
MIN_TOKEN_CHARS = 16  # a shorter secret is guessable; `openssl rand -hex 32` gives 64
LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses only this machine can reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_api_token(settings: "ServeSettings") -> Optional[str]:
    """The configured token (``$TOWERLINE_API_TOKEN``, else ``api_token_file``), None when neither is set."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    where = f"${TOKEN_ENV}"
    if not token and settings.api_token_file:
        where = f"api_token_file {settings.api_token_file}"
        try:
            token = Path(settings.api_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"serve setting 'api_token_file': cannot read {settings.api_token_file} ({e.__class__.__name__}); "
                              "write the token into that file, readable by the server only") from None
        if not token:
            raise ConfigError(f"serve setting 'api_token_file': {settings.api_token_file} is empty")
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
        raise ConfigError(f"the API token from {where} must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                          "(e.g. `openssl rand -hex 32`)")
    return token


def check_exposure(settings: "ServeSettings") -> Optional[str]:
    """The token to require, or ``ConfigError`` when the server would listen beyond loopback without one."""
    token = load_api_token(settings)
    if token is None and not is_loopback(settings.host):
        raise ConfigError(
            f"refusing to serve on {settings.host} without an API token: anyone who reaches the port could post "
            f"events and reload the model; set {TOKEN_ENV} or the serve setting api_token_file, or serve on 127.0.0.1"
        )
    if token is None:
        log.info("no API token configured: writes are open to this machine only (%s)", settings.host)
    return token


def token_matches(presented: str, token: str) -> bool:
    """Constant-time comparison of the presented bearer token with the configured one."""
    return hmac.compare_digest(presented.encode("utf-8", "replace"), token.encode("utf-8"))


# ----------------------------------------------------------------------------- the FastAPI dependency


class AuthError(Exception):
    """A request without (401) or with a wrong (403) bearer token; ``serving.errors`` answers it."""

    def __init__(self, status: int, detail: str, challenge: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.challenge = challenge


def bearer_scheme() -> HTTPBearer:
    """The scheme the OpenAPI document declares (``components.securitySchemes.bearerAuth``)."""
    return HTTPBearer(auto_error=False, scheme_name="bearerAuth",
                      description=f"the server's API token ({TOKEN_ENV} or the serve setting api_token_file)")


def token_dependency(token: Optional[str]) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that lets a request through only with ``Authorization: Bearer <token>``.

    With ``token`` None (loopback, nothing configured) every request passes; the operation still
    declares the scheme, so the OpenAPI document is the same with and without a token.
    """
    scheme = bearer_scheme()

    async def require_token(credentials: Optional[HTTPAuthorizationCredentials] = Security(scheme)) -> None:
        if token is None:
            return
        if credentials is None:
            raise AuthError(401, "this endpoint needs the API token: send 'Authorization: Bearer <token>'",
                            'Bearer realm="towerline"')
        if not token_matches(credentials.credentials, token):
            raise AuthError(403, "the bearer token is not this server's API token",
                            'Bearer realm="towerline", error="invalid_token"')

    return require_token
